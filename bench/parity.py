"""Speed parity with the engine underneath (`make parity`): edgeqwen's runner against llama-bench, and
the ONNX runner against a plain onnxruntime-genai Generator loop, on the same files and threads.

llama-bench is built from the llama.cpp that llama-cpp-python vendors, with the same flags as the wheel
(tools/build-llama-tools.sh). Per round, in fresh processes, interleaved: llama-bench `-p 512 -n 128 -d 0,512`
(its defaults otherwise: flash attention auto, batch 2048, ubatch 512), then edgeqwen's bench child twice
(a 512-token prompt then 128 tokens: pp512 and tg128@d512; a 1-token prompt then 128 tokens: tg128).
Medians over the rounds, with the range; ratio = edgeqwen / reference.

    python bench/parity.py BUILD... [--rounds 5] [--threads 2] [--out bench/PARITY.md]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from edgeqwen.benchmark import BenchConfig, run_one  # noqa: E402
from edgeqwen.home import resolve_build  # noqa: E402

GENAI_LOOP = r'''
import sys, time, json, random
import numpy as np, onnxruntime_genai as og
folder, threads, n_prompt, n_gen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cfg = og.Config(folder); cfg.clear_providers()
cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads,
                                                                   "inter_op_num_threads": 1}}}}))
model = og.Model(cfg)
rng = random.Random(0)
def once(n_prompt):
    p = og.GeneratorParams(model)
    p.set_search_options(max_length=n_prompt + n_gen, min_length=n_prompt + n_gen, do_sample=False, batch_size=1)
    g = og.Generator(model, p)
    t0 = time.perf_counter()
    g.append_tokens(np.array([rng.randrange(151643) for _ in range(n_prompt)], dtype=np.int32))
    g.generate_next_token(); t1 = time.perf_counter()
    for _ in range(n_gen - 1):
        g.generate_next_token()
    t2 = time.perf_counter()
    return n_prompt / (t1 - t0), (n_gen - 1) / (t2 - t1)
once(32)
pp, tg = once(n_prompt)
print(json.dumps({"pp": pp, "tg": tg}))
'''


def llama_bench(binary: str, model: Path, threads: int) -> dict:
    p = subprocess.run([binary, "-m", str(model), "-p", "512", "-n", "128", "-d", "0,512", "-t", str(threads),
                        "-r", "1", "-o", "json"], capture_output=True, text=True, check=True)
    out = {}
    for t in json.loads(p.stdout):
        key = ("pp512" if t["n_prompt"] else "tg128") + (f"@d{t['n_depth']}" if t.get("n_depth") else "")
        out[key] = float(t["avg_ts"])
    return {"pp512": out["pp512"], "tg128": out["tg128"], "tg128@d512": out["tg128@d512"]}


def ours(build: str, threads: int) -> dict:
    deep = run_one(build, threads, BenchConfig(prompt_tokens=512, gen_tokens=128, repeats=1))
    empty = run_one(build, threads, BenchConfig(prompt_tokens=1, gen_tokens=128, repeats=1))
    for r in (deep, empty):
        if r["status"] != "ok":
            sys.exit(f"{build}: {r['error']}")
    return {"pp512": deep["pp"]["mean"], "tg128": empty["tg"]["mean"], "tg128@d512": deep["tg"]["mean"]}


def genai(folder: Path, threads: int, n_prompt: int) -> dict:
    p = subprocess.run([sys.executable, "-c", GENAI_LOOP, str(folder), str(threads), str(n_prompt), "128"],
                       capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def onnx_pair(build: str, folder: Path, threads: int) -> tuple[dict, dict]:
    ref_deep, ref_empty = genai(folder, threads, 512), genai(folder, threads, 1)
    o = ours(build, threads)
    return {"pp512": ref_deep["pp"], "tg128": ref_empty["tg"], "tg128@d512": ref_deep["tg"]}, o


def cell(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} [{min(xs):.1f}–{max(xs):.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="+")
    ap.add_argument("--llama-bench", help="default: tools/build-llama-tools.sh's build")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=HERE / "PARITY.md")
    a = ap.parse_args()
    lb = a.llama_bench or subprocess.run([str(HERE.parent / "tools" / "build-llama-tools.sh")], capture_output=True,
                                         text=True, check=True).stdout.strip().splitlines()[-1] + "/llama-bench"
    from edgeqwen.hw import device_label, fingerprint
    rows = []
    for b in a.builds:
        path, m = resolve_build(b)
        ref, got = {k: [] for k in ("pp512", "tg128", "tg128@d512")}, {k: [] for k in ("pp512", "tg128", "tg128@d512")}
        for i in range(a.rounds):
            if m.get("format") == "onnx":
                r, o = onnx_pair(b, path, a.threads)
            else:
                r, o = llama_bench(lb, path / m["file"], a.threads), ours(b, a.threads)
            for k in ref:
                ref[k].append(r[k])
                got[k].append(o[k])
            print(f"{m['name']} round {i}: " + ", ".join(f"{k} {o[k]:.1f}/{r[k]:.1f}" for k in ref), file=sys.stderr)
        rows.append((m, ref, got))
    fp = fingerprint(bandwidth=False)
    lines = ["# Speed parity: edgeqwen's runner against the engine underneath", "",
             f"Generated by `bench/parity.py` (`make parity`) on {time.strftime('%Y-%m-%d')}: {device_label(fp)}, "
             f"{a.threads} threads, {a.rounds} interleaved rounds of fresh processes; medians [range] in tok/s. "
             "Reference: llama-bench from the same vendored llama.cpp and flags (defaults: flash attention auto, "
             "batch 2048, ubatch 512) for GGUF; a plain onnxruntime-genai Generator loop for ONNX. "
             "tg128 starts from an empty context; tg128@d512 after a 512-token prompt.", "",
             "| build | reference | pp512 ours / ref | ratio | tg128 ours / ref | ratio | tg128@d512 ours / ref "
             "| ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for m, ref, got in rows:
        cells = []
        for k in ("pp512", "tg128", "tg128@d512"):
            ratio = statistics.median(got[k]) / statistics.median(ref[k])
            cells += [f"{cell(got[k])} / {cell(ref[k])}", f"**{ratio:.3f}**"]
        refname = "genai Generator" if m.get("format") == "onnx" else "llama-bench"
        lines.append(f"| {m['name']} ({m.get('quant')}) | {refname} | " + " | ".join(cells) + " |")
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
