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
set -euo pipefail
PY=${PYTHON:-python3}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
CACHE=${EDGEQWEN_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgeqwen/wheels}

arch=$(uname -m)
cc_bin=${CC:-cc}
cc_id=$($cc_bin --version 2>/dev/null | head -n1 || echo unknown)
flags=""
if [[ "$arch" == x86_64 ]] && [[ "$cc_id" != *clang* ]] && $cc_bin --version 2>/dev/null | grep -qi 'gcc\|free software foundation'; then
  flags="-fno-tree-dse -fno-dse"
fi
# Optimise for this machine (AVX-512/AMX here, NEON/dotprod on a Pi). Set explicitly because
# ggml turns it off whenever SOURCE_DATE_EPOCH is set, which wheel builds can do.
# GGML_RPC: llama.cpp's RPC backend, for `edgeqwen worker` and --workers (several devices).
cmake_args=${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_RPC=ON}
# A native build is only good for this CPU: its model and flags are part of the cache key.
cpu_id=$( (grep -m1 -E '^(model name|flags|Features)' /proc/cpuinfo; grep -m1 -E '^(flags|Features)' /proc/cpuinfo) 2>/dev/null \
          || sysctl -n machdep.cpu.brand_string 2>/dev/null || uname -m)
key=$(printf '%s|%s|%s|%s|%s|%s' "$VERSION" "$arch" "$cc_id" "$flags" "$cmake_args" "$cpu_id" | { sha256sum 2>/dev/null || shasum -a 256; } | cut -c1-16)
dir="$CACHE/llama_cpp_python-$VERSION-$key"

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
