#!/usr/bin/env bash
# Install llama-cpp-python into the current Python, compiled with flags that are safe on this CPU.
#
# Why: gcc <= 13.2 declares _tile_loadconfig's operand as 8 bytes, so dead-store elimination
# deletes the stores that fill the AMX tile config in ggml-cpu/amx/mmq.cpp, and every quantized
# model crashes on AMX CPUs (Sapphire Rapids and newer). -fno-tree-dse -fno-dse keeps the stores
# and the AMX speed; other compilers (clang, Apple clang) and other arches need nothing.
#
# Wheels are cached under a key made of the version, arch, compiler and flags, so a wheel built
# with other flags (pip's own cache) is never reused by mistake.
#
# Usage: tools/install-llama-cpp.sh                  build (or reuse) and install into $PYTHON
#        tools/install-llama-cpp.sh --target aarch64 cross-compile a wheel for a Raspberry Pi 5 (Cortex-A76;
#                                                    EDGEQWEN_ARM_ARCH=armv8-a for a Pi 4) and print its path
#        tools/install-llama-cpp.sh --print-flags    print the arch, compiler flags and CMake args, build nothing
set -euo pipefail
PY=${PYTHON:-python3}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
CACHE=${EDGEQWEN_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgeqwen/wheels}
target="" print_flags=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --target) target=${2:-}; shift 2 ;;
    --print-flags) print_flags=1; shift ;;
    *) echo "usage: $0 [--target aarch64] [--print-flags]" >&2; exit 2 ;;
  esac
done
[[ -z "$target" || "$target" == aarch64 ]] || { echo "install-llama-cpp.sh: only --target aarch64 is supported" >&2; exit 2; }

arch=${EDGEQWEN_UNAME_M:-$(uname -m)}   # EDGEQWEN_UNAME_M: see another arch's flags with --print-flags
system=${EDGEQWEN_UNAME_S:-$(uname -s)} # EDGEQWEN_UNAME_S: likewise another system's (Darwin)
cross=0
[[ -n "$target" && "$arch" != "$target" ]] && cross=1
if (( cross )); then
  # Cross-compiling for a Pi on a faster machine: Debian's gcc-aarch64-linux-gnu, no -march=native
  # (this CPU is not the Pi's); the A76's dotprod and fp16 named instead. The result is a wheel
  # with RUNPATH=$ORIGIN and its own libgomp, so it installs on a bare Pi OS Lite.
  cc_bin=aarch64-linux-gnu-gcc
  cc_id=$($cc_bin --version 2>/dev/null | head -n1) || { echo "install-llama-cpp.sh: $cc_bin is missing (apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu patchelf)" >&2; exit 1; }
  flags=""
  arm_arch=${EDGEQWEN_ARM_ARCH:-armv8.2-a+dotprod+fp16}
  cmake_args="-DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ -DCMAKE_FIND_ROOT_PATH=/usr/aarch64-linux-gnu -DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER -DCMAKE_FIND_ROOT_PATH_MODE_LIBRARY=ONLY -DCMAKE_FIND_ROOT_PATH_MODE_INCLUDE=ONLY -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=$arm_arch -DGGML_RPC=ON"
  cpu_id="cross-aarch64"
else
  cc_bin=${CC:-cc}
  cc_id=$($cc_bin --version 2>/dev/null | head -n1 || echo unknown)
  flags=""
  if [[ "$arch" == x86_64 ]] && [[ "$cc_id" != *clang* ]] && $cc_bin --version 2>/dev/null | grep -qi 'gcc\|free software foundation'; then
    flags="-fno-tree-dse -fno-dse"
  fi
  # Optimise for this machine (AVX-512/AMX here, NEON/dotprod on a Pi: -mcpu=native). Set explicitly
  # because ggml turns it off whenever SOURCE_DATE_EPOCH is set, which wheel builds can do.
  # GGML_RPC: llama.cpp's RPC backend, for `edgeqwen worker` and --workers (several devices).
  if [[ "$system" == Darwin && "$arch" == arm64 ]]; then
    # Apple Silicon: llama.cpp's Metal backend (the GPU) with the shader library embedded in the wheel
    cmake_args=${CMAKE_ARGS:--DGGML_METAL=ON -DGGML_METAL_EMBED_LIBRARY=ON -DGGML_NATIVE=ON -DGGML_RPC=ON}
  elif [[ "$system" == Darwin ]]; then
    # Intel Macs: the CPU with Apple's Accelerate BLAS; their GPUs are not what Metal in llama.cpp targets
    cmake_args=${CMAKE_ARGS:--DGGML_METAL=OFF -DGGML_BLAS=ON -DGGML_BLAS_VENDOR=Apple -DGGML_NATIVE=ON -DGGML_RPC=ON}
  else
    cmake_args=${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_RPC=ON}
  fi
  # A native build is only good for this CPU: its model and flags are part of the cache key.
  cpu_id=$( (grep -m1 -E '^(model name|flags|Features)' /proc/cpuinfo; grep -m1 -E '^(flags|Features)' /proc/cpuinfo) 2>/dev/null \
            || sysctl -n machdep.cpu.brand_string 2>/dev/null || uname -m)
fi
if (( print_flags )); then
  printf 'system=%s\narch=%s\ntarget=%s\ncross=%s\ncompiler=%s\nextra_cflags=%s\ncmake_args=%s\n' \
    "$system" "$arch" "${target:-$arch}" "$cross" "$cc_id" "$flags" "$cmake_args"
  exit 0
fi
key=$(printf '%s|%s|%s|%s|%s|%s' "$VERSION" "$arch" "$cc_id" "$flags" "$cmake_args" "$cpu_id" | { sha256sum 2>/dev/null || shasum -a 256; } | cut -c1-16)
dir="$CACHE/llama_cpp_python-$VERSION-$key"

mkdir -p "$CACHE"
exec 8>"$CACHE/.lock-$key"; flock 8   # two builds of one key at once would each take minutes and race at the rename
if (( cross )); then
  whl=$(ls "$dir"/llama_cpp_python-*aarch64.whl 2>/dev/null | head -n1 || true)
  if [[ -z "$whl" ]]; then
    echo "cross-compiling llama-cpp-python $VERSION for aarch64 ($arm_arch); this takes about 6 minutes" >&2
    tmp="$dir.tmp.$$"
    rm -rf "$tmp"; mkdir -p "$tmp/fix"
    CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)} \
      $PY -m pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python -w "$tmp" "llama-cpp-python==$VERSION" >&2
    $PY -c "import wheel" 2>/dev/null || $PY -m pip install -q wheel >&2
    $PY -m wheel unpack -d "$tmp/fix" "$tmp"/llama_cpp_python-*.whl >&2
    lib=$(ls -d "$tmp"/fix/*/llama_cpp/lib)
    cp "$(aarch64-linux-gnu-gcc -print-file-name=libgomp.so.1)" "$lib/"
    for so in "$lib"/*.so*; do patchelf --set-rpath '$ORIGIN' "$so"; done
    # pip tagged it for this machine; it is an aarch64 wheel.
    sed -i 's/^Tag: .*/Tag: py3-none-linux_aarch64/' "$tmp"/fix/*/*.dist-info/WHEEL
    mkdir -p "$tmp/out"
    $PY -m wheel pack -d "$tmp/out" "$tmp"/fix/*/ >&2
    rm -rf "$dir"; mkdir -p "$dir"; mv "$tmp"/out/*.whl "$dir/"; rm -rf "$tmp"
    whl=$(ls "$dir"/llama_cpp_python-*aarch64.whl | head -n1)
  fi
  echo "$whl"
  exit 0
fi

installed=$($PY -c "import importlib.metadata as m; print(m.version('llama_cpp_python'))" 2>/dev/null || true)
stamp=$($PY -c "import sys,os; print(os.path.join(sys.prefix, '.edgeqwen-llama-key'))")
if [[ "$installed" == "$VERSION" ]] && [[ -f "$stamp" ]] && [[ "$(cat "$stamp")" == "$key" ]]; then
  echo "llama-cpp-python $VERSION already installed (build key $key)"
  exit 0
fi

if ! ls "$dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $VERSION (compiler: $cc_id; extra flags: ${flags:-none}); this takes 4-11 minutes" >&2
  tmp="$dir.tmp.$$"
  rm -rf "$tmp"; mkdir -p "$tmp"
  CMAKE_ARGS="$cmake_args" CFLAGS="${CFLAGS:-} $flags" CXXFLAGS="${CXXFLAGS:-} $flags" \
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)} \
    $PY -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python -w "$tmp" "llama-cpp-python==$VERSION"
  rm -rf "$dir"; mv "$tmp" "$dir"   # rename only when complete
fi
$PY -m pip install --no-deps --force-reinstall "$dir"/llama_cpp_python-*.whl
$PY -m pip install 'numpy>=1.20' 'typing-extensions>=4.5' 'diskcache>=5.6.1' 'jinja2>=2.11.3'
echo "$key" > "$stamp"
$PY -c "import llama_cpp; print('llama.cpp CPU features:', llama_cpp.llama_print_system_info().decode().strip())"
