"""Runner decode speed against llama.cpp's own llama-bench (tg128) on the same file and threads.

llama-bench is built from the llama.cpp that llama-cpp-python vendors (its sdist), with the same
compiler flags as `make setup`; pass its path. Both sides run in fresh processes, interleaved,
`--rounds` times; medians are compared.

    python bench/runner_speed.py --llama-bench ~/llama-bench-build/bin/llama-bench BUILD... [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeqwen.benchmark import BenchConfig, run_one
from edgeqwen.home import resolve_build


def llama_bench_tg(binary: str, model: Path, threads: int, n: int) -> float:
    p = subprocess.run([binary, "-m", str(model), "-p", "0", "-n", str(n), "-t", str(threads), "-r", "1",
                        "-o", "json"], capture_output=True, text=True, check=True)
    return float(json.loads(p.stdout)[0]["avg_ts"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="+")
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(f"| build | threads | llama-bench tg{args.tokens} (median) | edgeqwen runner (median) | ratio |")
    print("|---|---|---|---|---|")
    for b in args.builds:
        path, m = resolve_build(b)
        model = path / m["file"] if path.is_dir() else path
        ref, ours = [], []
        # a 1-token prompt, like llama-bench's tg test that starts from an empty context
        cfg = BenchConfig(prompt_tokens=1, gen_tokens=args.tokens, repeats=1)
        for _ in range(args.rounds):
            ref.append(llama_bench_tg(args.llama_bench, model, args.threads, args.tokens))
            row = run_one(b, args.threads, cfg)
            if row["status"] != "ok":
                sys.exit(f"{b}: {row['error']}")
            ours.append(row["tg"]["mean"])
        r, o = statistics.median(ref), statistics.median(ours)
        print(f"| {Path(b).name} | {args.threads} | {r:.2f} ({', '.join(f'{x:.1f}' for x in ref)}) | "
              f"{o:.2f} ({', '.join(f'{x:.1f}' for x in ours)}) | {o / r:.3f} |", flush=True)


if __name__ == "__main__":
    main()
