#!/usr/bin/env bash
# Build llama.cpp's own tools (llama-bench, rpc-server, llama-speculative-simple, llama-server) from the llama.cpp that llama-cpp-python vendors,
# with the flags tools/install-llama-cpp.sh gives the wheel, so `make parity` compares like with like.
# Prints the folder holding the binaries; cached under ~/.cache/edgeqwen/llama-tools/ by the same kind of key.
set -euo pipefail
PY=${PYTHON:-python3}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/edgeqwen/llama-tools
arch=$(uname -m)
cc_bin=${CC:-cc}
cc_id=$($cc_bin --version 2>/dev/null | head -n1 || echo unknown)
flags=""
if [[ "$arch" == x86_64 ]] && [[ "$cc_id" != *clang* ]]; then flags="-fno-tree-dse -fno-dse"; fi   # see install-llama-cpp.sh
cmake_args=${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_RPC=ON}
cpu_id=$( (grep -m1 -E '^(model name|flags|Features)' /proc/cpuinfo; grep -m1 -E '^(flags|Features)' /proc/cpuinfo) 2>/dev/null || uname -m)
key=$(printf '%s|%s|%s|%s|%s|%s' "$VERSION" "$arch" "$cc_id" "$flags" "$cmake_args" "$cpu_id" | sha256sum | cut -c1-16)
out="$CACHE/$VERSION-$key"
if [[ -x "$out/bin/llama-bench" && -x "$out/bin/rpc-server" && -x "$out/bin/llama-speculative-simple" \
      && -x "$out/bin/llama-server" ]]; then
  echo "$out/bin"; exit 0
fi
tmp="$out.tmp.$$"
rm -rf "$tmp"; mkdir -p "$tmp"
$PY -m pip download -q --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$VERSION" >&2
tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
src=$(ls -d "$tmp"/llama_cpp_python-*/vendor/llama.cpp)
# shellcheck disable=SC2086
cmake -S "$src" -B "$tmp/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
      -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" $cmake_args >&2
cmake --build "$tmp/build" --target llama-bench ggml-rpc-server llama-speculative-simple llama-server -j "$(nproc)" >&2
mkdir -p "$tmp/bin"
cp "$tmp/build/bin/llama-bench" "$tmp/bin/"
cp "$tmp/build/bin/ggml-rpc-server" "$tmp/bin/rpc-server"
cp "$tmp/build/bin/llama-speculative-simple" "$tmp/bin/"
cp "$tmp/build/bin/llama-server" "$tmp/bin/"   # serve's concurrency anchor (bench/serve_bench.py)
rm -rf "$tmp/build" "$tmp"/llama_cpp_python-*
rm -rf "$out"; mv "$tmp" "$out"
echo "$out/bin"
