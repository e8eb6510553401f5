#!/usr/bin/env bash
# The package as a user installs it: build the wheel, install it into a fresh venv outside the checkout
# (llama-cpp-python from the same cached build as make setup), and run the main commands from there.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/edgeqwen-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
"$PY" -m venv "$work/venv"
bin="$work/venv/bin"
"$bin/python" -m pip install -q --upgrade pip
"$bin/python" -m pip wheel -q --no-deps -w "$work/dist" "$repo"
whl=$(ls "$work/dist"/edgeqwen-*.whl)
listing=$(unzip -l "$whl")
echo "wheel: $(basename "$whl") ($(tail -n1 <<<"$listing" | awk '{print $2}') files)"
for f in data/recipes/qwen2-0.5b.toml data/devices.toml data/claims.toml data/eval-en.txt data/published.toml \
         data/apple_chips.toml data/chat.html data/chat.js data/vendor/marked.umd.js data/vendor/purify.min.js \
         data/vendor/VERSIONS.md formats/mlx/runner.py formats/gguf/batch.py serve/tools.py; do
  grep -q "edgeqwen/$f" <<<"$listing" || { echo "edgeqwen/$f is missing from the wheel"; exit 1; }
done
PYTHON="$bin/python" "$repo/tools/install-llama-cpp.sh" >/dev/null
"$bin/python" -m pip install -q "$whl[gguf,onnx,serve]"
cd "$work"   # nothing of the checkout is importable or readable from here
export EDGEQWEN_HOME="$work/home" HF_HUB_OFFLINE=1 EDGEQWEN_RECIPES=
set -x
"$bin/edgeqwen" list
"$bin/edgeqwen" plan 7b q4 --device raspberry-pi-5-8gb
"$bin/edgeqwen" build 0.5b q4 --synthetic --out "$work/b"
"$bin/edgeqwen" run "$work/b" "Hello" -n 4 -t 0
"$bin/edgeqwen" verify "$work/b"
"$bin/edgeqwen" eval "$work/b" --text en --ctx 256 --windows 2
"$bin/edgeqwen" table --help >/dev/null
