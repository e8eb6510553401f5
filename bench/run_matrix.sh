#!/usr/bin/env bash
# The hardware results matrix for this machine: builds, then `edgeqwen bench` rows appended to
# bench/results/<device id>.jsonl, then bench/RESULTS.md regenerated from every committed row.
#   0.5B: real weights (../shared/models/make_real.py) when available; 1.5B and 7B: synthetic.
#   q4_k_m, q4_0, q8_0 x 1 and 2 threads.
# SIZES, QUANTS, THREADS and REPEATS can be overridden from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
EQ=${EQ:-.venv/bin/edgeqwen}
PY=${PY:-.venv/bin/python}
QUANTS=${QUANTS:-q4_k_m q4_0 q8_0}
THREADS=${THREADS:-1,2}
SHARED=../shared
tok=()
[ -d "$SHARED/fixtures/qwen2-tokenizer" ] && tok=(--tokenizer "$SHARED/fixtures/qwen2-tokenizer")
mkdir -p bench/results
out=bench/results/$($PY -c 'from edgeqwen.measure.hw import fingerprint; print(fingerprint(bandwidth=False)["device_id"])').jsonl

builds_for() {  # size -> build names (building what is missing)
  local size=$1
  for q in $QUANTS; do
    if [ "$size" = 0.5b ] && [ -f "$SHARED/models/make_real.py" ]; then
      real=$($PY "$SHARED/models/make_real.py" 0.5b | tail -n1)
      $EQ build 0.5b "$q" --source "$real" --name "qwen2-0.5b-real-$q" >&2
      echo "qwen2-0.5b-real-$q"
    else
      $EQ build "$size" "$q" --synthetic "${tok[@]}" >&2
      echo "qwen2-$size-$q-synthetic"
    fi
  done
}

for size in ${SIZES:-0.5b 1.5b 7b}; do
  repeats=${REPEATS:-3}
  [ "$size" = 7b ] && repeats=${REPEATS_7B:-2}   # 7B at 1 thread takes minutes per repeat
  mapfile -t names < <(builds_for "$size")
  # a failed build is a row of its own (exit 1): the matrix goes on
  $EQ bench "${names[@]}" --threads "$THREADS" --repeats "$repeats" --out "$out" || true
done
$PY -m bench.make_results
