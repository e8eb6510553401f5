"""Speed parity with the engine underneath (`make parity`): edgeqwen's runner against llama-bench, and the ONNX
runner against a plain onnxruntime-genai Generator loop, on the same files and threads.

llama-bench is built from the llama.cpp that llama-cpp-python vendors, with the same flags as the wheel
(tools/build-llama-tools.sh); its defaults otherwise (flash attention auto, batch 2048, ubatch 512). Each test
(pp512, tg128 from an empty context, tg128 at depth 512) is its own pair of fresh processes, one per side,
each running only that test after a warm-up as llama-bench's, which of the two goes first alternating from
round to round. The ratio is taken pair by pair (ours / reference, measured seconds apart) and the table gives
the median of those paired ratios: on these VMs the speed drifts by 10-30% over minutes, and a pair measured
a minute apart (as in one process per side for all three tests) let that drift into the ratio. Raw figures go
to a JSON file beside the table (--json), which --render turns into the table again without measuring.

    python -m bench.parity BUILD... [--rounds 12] [--reps 1] [--threads 2] [--out bench/PARITY.md]
    python -m bench.parity --render bench/results/parity-DEVICE.json [--out bench/PARITY.md]
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


from bench.common import HERE, RESULTS, llama_tool, write_json, write_text
from edgeqwen.measure.bench import BenchConfig, run_one
from edgeqwen.home import resolve_build

GENAI_LOOP = r'''
import sys, time, json, random
import numpy as np, onnxruntime_genai as og
folder = sys.argv[1]
threads, n_prompt, n_gen, reps = (int(x) for x in sys.argv[2:6])
cfg = og.Config(folder); cfg.clear_providers()
cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads,
                                                                   "inter_op_num_threads": 1}}}}))
model = og.Model(cfg)
rng = random.Random(0)
def once(n_prompt, n_gen):
    p = og.GeneratorParams(model)
    p.set_search_options(max_length=n_prompt + n_gen, min_length=n_prompt + n_gen, do_sample=False, batch_size=1)
    g = og.Generator(model, p)
    t0 = time.perf_counter()
    g.append_tokens(np.array([rng.randrange(151643) for _ in range(n_prompt)], dtype=np.int32))
    g.generate_next_token(); t1 = time.perf_counter()
    for _ in range(n_gen - 1):
        g.generate_next_token()
    t2 = time.perf_counter()
    return n_prompt / (t1 - t0), (n_gen - 1) / (t2 - t1) if n_gen > 1 else 0.0
once(n_prompt, 8)  # warm-up at the measured prompt length, as ours and llama-bench do
runs = [once(n_prompt, n_gen) for _ in range(reps)]
print(json.dumps({"pp": sum(p for p, _ in runs) / reps, "tg": sum(t for _, t in runs) / reps}))
'''

# test -> (llama-bench arguments, (prompt, generated tokens) for our bench child and the genai loop, the figure
#          that is the test). tg128 decodes after a one-token prompt: 127 timed steps from an empty context,
#          as llama-bench's 128 single-token decodes are.
TESTS = {
    "pp512": (["-p", "512", "-n", "0"], (512, 1), "pp"),
    "tg128": (["-p", "0", "-n", "128"], (1, 128), "tg"),
    "tg128@d512": (["-p", "0", "-n", "128", "-d", "512"], (512, 128), "tg"),
}
KEYS = tuple(TESTS)
HUGEPAGES = {   # what the JSON's "hugepages" records -> what it means for llama-bench as the reference
    True: " Our runner gives llama.cpp's repacked weights (Q4_0, Q4_K) transparent huge pages "
          "(edgeqwen/formats/hugepages.py); llama-bench with its defaults leaves them in 4 KiB pages, so on repacked "
          "builds the reference is not the engine's best: with glibc's `glibc.malloc.hugetlb=1` its own tg128 "
          "on the real 0.5B q4_0 was 1.037x as fast (median of 6 pairs, AMD EPYC AVX2, 2026-11-26).",
    "all": " Our runner reads the file into memory rather than mapping it and gives all the weights, repacked "
           "copies and the rest, transparent huge pages (edgeqwen/formats/hugepages.py), and collapses onnxruntime's "
           "prepacked weights into huge pages after the session is made; llama-bench with its defaults maps the "
           "file and leaves its repacked copies in 4 KiB pages, and the Generator loop leaves onnxruntime's "
           "memory as it is, so neither reference is the engine's best: with glibc's `glibc.malloc.hugetlb=1` "
           "llama-bench's own tg128 on the real 0.5B q4_0 was 1.037x as fast (median of 6 pairs, AMD EPYC AVX2, "
           "2026-11-26).",
}


def llama_bench(binary: str, model: Path, threads: int, reps: int, test: str) -> float:
    p = subprocess.run([binary, "-m", str(model), *TESTS[test][0], "-t", str(threads), "-r", str(reps),
                        "-o", "json"], capture_output=True, text=True, check=True)
    (row,) = json.loads(p.stdout)
    return float(row["avg_ts"])


def ours(build: str, threads: int, reps: int, test: str) -> float:
    # bench's child: warm-up at the prompt length, then `reps` x (prompt -> tokens); nothing else timed
    _, (n_prompt, n_gen), field = TESTS[test]
    r = run_one(build, threads, BenchConfig(prompt_tokens=n_prompt, gen_tokens=n_gen, repeats=reps, empty_tg=False))
    if r["status"] != "ok":
        sys.exit(f"{build}: {r['error']}")
    return r[field]["mean"]


def genai(folder: Path, threads: int, reps: int, test: str) -> float:
    _, (n_prompt, n_gen), field = TESTS[test]
    p = subprocess.run([sys.executable, "-c", GENAI_LOOP, str(folder), str(threads), str(n_prompt), str(n_gen),
                        str(reps)], capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])[field]


def cell(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} [{min(xs):.1f}–{max(xs):.1f}]"


def measure(builds: list[str], rounds: int, threads: int, lb: str, reps: int = 1, done=None) -> list[dict]:
    """done(entries so far) after each build: a run stopped part-way keeps the builds it finished."""
    out = []
    for b in builds:
        path, m = resolve_build(b)
        entry = {"name": m["name"], "quant": m.get("quant"), "format": m.get("format", "gguf"),
                 "ref": {k: [] for k in KEYS}, "ours": {k: [] for k in KEYS}}
        reference = (functools.partial(genai, path, threads, reps) if entry["format"] == "onnx"
                     else functools.partial(llama_bench, lb, path / m["file"], threads, reps))
        for i in range(rounds):
            for k in KEYS:   # each test its own pair of processes, seconds apart
                if i % 2:
                    o, r = ours(b, threads, reps, k), reference(k)
                else:
                    r, o = reference(k), ours(b, threads, reps, k)
                entry["ref"][k].append(r)
                entry["ours"][k].append(o)
            print(f"{m['name']} round {i}: " + ", ".join(f"{k} {entry['ours'][k][-1]:.1f}/{entry['ref'][k][-1]:.1f}"
                                                         for k in KEYS), file=sys.stderr, flush=True)
        out.append(entry)
        if done:
            done(out)
    return out


def render(data: dict) -> str:
    if data.get("pairing") != "test":
        sys.exit("these figures were paired a round at a time (one process per side for all three tests): "
                 "render them with the parity.py of their commit")
    lines = ["# Speed parity: edgeqwen's runner against the engine underneath", "",
             f"Generated by `python -m bench.parity` (`make parity`) on {data['date']}: {data['device_label']}, "
             f"{data['threads']} threads, {data['rounds']} rounds. In each round every test is its own pair of "
             f"fresh processes, one per side, running only that test ({data.get('reps', 1)} run(s) after a "
             "warm-up at its prompt length), the two sides alternating which goes first. Reference: llama-bench "
             "from the same vendored llama.cpp and flags (defaults: flash attention auto, batch 2048, ubatch 512) "
             "for GGUF; a plain onnxruntime-genai Generator loop for ONNX. tg128 starts from an empty context; "
             "tg128@d512 after a 512-token prompt. Speeds are medians [range] in tok/s; **ratio** is the median "
             "of the per-pair ratios ours / reference (the two measured seconds apart), with their range. "
             "Raw figures: "
             f"`{data['json']}`." + HUGEPAGES.get(data.get("hugepages"), ""), "",
             "| build | reference | pp512 ours / ref | ratio | tg128 ours / ref | ratio | tg128@d512 ours / ref "
             "| ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for e in data["builds"]:
        cells = []
        for k in KEYS:
            ratios = [o / r for o, r in zip(e["ours"][k], e["ref"][k])]
            cells += [f"{cell(e['ours'][k])} / {cell(e['ref'][k])}",
                      f"**{statistics.median(ratios):.3f}** [{min(ratios):.2f}–{max(ratios):.2f}]"]
        refname = "genai Generator" if e["format"] == "onnx" else "llama-bench"
        lines.append(f"| {e['name']} ({e['quant']}) | {refname} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="*")
    ap.add_argument("--llama-bench", help="default: tools/build-llama-tools.sh's build")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--reps", type=int, default=1, help="runs of each test per side and round (averaged)")
    ap.add_argument("--out", type=Path, default=HERE / "PARITY.md")
    ap.add_argument("--json", type=Path, help="raw figures (default: bench/results/parity-DEVICE.json)")
    ap.add_argument("--render", type=Path, metavar="JSON", help="only rewrite the table from a raw-figures file")
    a = ap.parse_args()
    if a.render:
        data = json.loads(a.render.read_text())
    else:
        if not a.builds:
            ap.error("name at least one build")
        lb = a.llama_bench or llama_tool("llama-bench")
        from edgeqwen.measure.hw import device_label, fingerprint
        fp = fingerprint(bandwidth=False)
        dest = a.json or RESULTS / f"parity-{fp['device_id']}.json"
        data = {"date": time.strftime("%Y-%m-%d"), "device_label": device_label(fp), "device_id": fp["device_id"],
                "threads": a.threads, "rounds": a.rounds, "pairing": "test", "reps": a.reps, "hugepages": "all",
                "json": str(dest.relative_to(HERE.parent) if dest.is_relative_to(HERE.parent) else dest),
                "builds": []}

        def save(entries):
            data["builds"] = entries
            write_json(dest, data)
        measure(a.builds, a.rounds, a.threads, lb, a.reps, done=save)
    text = render(data)
    write_text(a.out, text)
    print(text)


if __name__ == "__main__":
    main()
