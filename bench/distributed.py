"""One model over several processes with llama.cpp's RPC backend, each inside a memory limit (a benchmark).

    python -m bench.distributed BUILD [BUILD...] [--limit 3G] [--workers 2] [--repeats 2] [--out bench/DISTRIBUTED.md]
    python -m bench.distributed --plan-only bench/DISTRIBUTED.md   # only regenerate the plan section

For each build, on this machine, with 2 threads per process:
  1. alone: one process, no limit (the speed to compare against);
  2. alone inside --limit: the proof that one such device could not hold it (oom-killed or too slow);
  3. split: this process and --workers `edgeqwen worker` processes, every one in its own memory cgroup of
     --limit, the layers in equal shares (--split 1,1,...); each process's cgroup peak is recorded;
  4. greedy tokens alone and split (32 tokens from one prompt, --lean on both: the same kernels): identical or not.
--limit defaults to what a 4 GB Raspberry Pi 5 leaves a model (its profile's usable RAM). The processes share
this machine's 2 cores and talk over loopback, so the split's speed here has no network latency in it: see plan
--devices for a LAN's.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

from edgeqwen.measure.bench import BenchConfig, run_one
from edgeqwen.measure.hw import device_label, fingerprint
from edgeqwen.measure.memlimit import MemoryCgroup, parse_size
from edgeqwen.measure.claims import usable_ram
from edgeqwen.measure.plan import load_devices

from bench.common import write_text
from bench.harness import Worker


def gib(b) -> str:
    return f"{b / 2**30:.2f}" if b else "-"


def greedy(build: str, workers: list[str], split: str | None, limit: int | None) -> str:
    # --lean on both sides: the workers' CPU backend has no repacked (interleaved) weight layouts, so a normal
    # load here would run different kernels (another summation order) on its own layers than the workers do
    cmd = [sys.executable, "-m", "edgeqwen.cli", "run", build, "The three primary colours are", "--raw", "-t", "0",
           "-n", "32", "--json", "--threads", "2", "--lean"]
    if workers:
        cmd += ["--workers", ",".join(workers), "--split", split]
    with MemoryCgroup(limit) if limit else contextlib.nullcontext() as cg:
        p = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cg.enter if limit else None)
    if p.returncode:
        return f"(failed: {(p.stderr.strip().splitlines() or ['?'])[-1]})"
    return json.loads(p.stdout)["text"]


def start_workers(n: int, limit: int) -> tuple[list, list]:
    groups, workers = [], []
    for _ in range(n):
        cg = MemoryCgroup(limit).__enter__()
        groups.append(cg)
        workers.append(Worker("--threads", "2", preexec_fn=cg.enter))
    return workers, groups


PLAN_MARK = "## What plan predicts for real devices"
POOLS = [("7b", "3xraspberry-pi-5-4gb"), ("7b", "2xraspberry-pi-5-8gb"), ("72b", "8xraspberry-pi-5-8gb"),
         ("72b", "4xraspberry-pi-5-16gb"), ("72b", "4xx86-laptop-ddr5-16gb"), ("72b", "3xx86-laptop-ddr5-16gb")]


def plan_section() -> str:
    """`edgeqwen plan SIZE q4 --devices POOL` for the pools people ask about (a prediction, not a measurement)."""
    from edgeqwen.measure.plan import describe_pool, parse_pool, plan_pool
    out = [PLAN_MARK, "", "Predictions (`edgeqwen plan SIZE q4 --devices POOL`), not measurements: per-device min RAM "
           "from the same per-tensor model as `plan`, layers in proportion to each device's free RAM, and a "
           "pipeline decode estimate with an assumed LAN (its model is printed with it).", ""]
    profiles = load_devices()
    for size, pool in POOLS:
        out += [f"`edgeqwen plan {size} q4 --devices {pool}`", "", "```",
                describe_pool(plan_pool(size, "q4", parse_pool(pool, profiles))), "```", ""]
    return "\n".join(out)


def replace_plan_section(path: Path) -> None:
    text = path.read_text()
    text = text.split(PLAN_MARK)[0].rstrip() + "\n\n" + plan_section()
    write_text(path, text)


def main():
    if sys.argv[1:2] == ["--plan-only"]:
        replace_plan_section(Path(sys.argv[2]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("builds", nargs="+")
    ap.add_argument("--limit", help="memory limit per process (default: a 4 GB Pi 5's usable RAM)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    limit = parse_size(a.limit) if a.limit else usable_ram(load_devices()["raspberry-pi-5-4gb"])
    fp = fingerprint(bandwidth=False)
    cfg = BenchConfig(prompt_tokens=a.prompt, gen_tokens=a.tokens, repeats=a.repeats, n_ctx=1024)
    split = ",".join(["1"] * (a.workers + 1))
    lines = []
    for b in a.builds:
        print(f"{b}: alone", file=sys.stderr)
        alone = run_one(b, 2, cfg)
        print(f"{b}: alone in {gib(limit)} GiB", file=sys.stderr)
        budget = 2 * alone.get("wall_s", 600) + 30
        alone_lim = run_one(b, 2, cfg, timeout=budget, memory_limit=limit)
        print(f"{b}: split over {a.workers} workers", file=sys.stderr)
        workers, groups = start_workers(a.workers, limit)
        try:
            eps = [w.ep for w in workers]
            dcfg = BenchConfig(**{**cfg.__dict__, "workers": eps, "split": [1.0] * (a.workers + 1)})
            t0 = time.time()
            split_res = run_one(b, 2, dcfg, memory_limit=limit)
            split_res["wall_s"] = time.time() - t0
            worker_peaks = [cg.peak() for cg in groups]
            worker_ooms = [cg.oom_kills() for cg in groups]
            same = greedy(b, [], None, None)
            split_text = greedy(b, eps, split, limit)
        finally:
            for w in workers:
                w.stop()
            for cg in groups:
                cg.__exit__(None, None, None)

        def speed(r):
            return (f"{r['pp']['mean']:.1f} | {r['tg']['mean']:.2f}" if r.get("status") == "ok"
                    else f"- | - ({r.get('status')}: {r.get('error', '')[:80]})")
        peaks = " / ".join([gib(split_res.get("cgroup_peak"))] + [gib(p) for p in worker_peaks])
        lines += [
            f"| {b} | one process, no limit | - | {speed(alone)} | {gib(alone.get('max_rss'))} (RSS) |",
            f"| {b} | one process in {gib(limit)} GiB | {gib(limit)} | {speed(alone_lim)} | "
            f"{gib(alone_lim.get('cgroup_peak'))} |",
            f"| {b} | this process + {a.workers} workers, split {split} | {gib(limit)} each | {speed(split_res)} | "
            f"{peaks} (OOM kills in workers: {sum(worker_ooms)}) |"]
        if alone.get("status") == "ok" and split_res.get("status") == "ok":
            lines.append(f"| {b} | split / alone | | {split_res['pp']['mean'] / alone['pp']['mean']:.2f}x | "
                         f"{split_res['tg']['mean'] / alone['tg']['mean']:.2f}x | |")
        lines.append(f"| {b} | greedy 32 tokens identical (alone vs split) | | "
                     f"{'yes' if same == split_text else 'NO'} | | |")
        print("\n".join(lines[-5:]), file=sys.stderr)
    head = ["# One model over several processes (llama.cpp RPC), each inside a memory limit", "",
            f"Generated by `python -m bench.distributed {' '.join(sys.argv[1:])}` on {device_label(fp)} "
            f"({time.strftime('%Y-%m-%d')}). Every process has 2 threads; they share this machine's cores and talk "
            "over loopback, so the split's figures carry the RPC protocol's cost but no network latency "
            "(plan --devices models a LAN's). Peaks are the memory cgroups' own maximum usage (page cache of the "
            "mmapped file included), in the order this process / worker 1 / worker 2: this process reads the whole "
            "file to send the workers their layers, so its cgroup keeps as much of it cached as the limit allows and "
            "its peak can sit at the limit; what matters is that it ran with no OOM kill. "
            f"pp{a.prompt} and tg{a.tokens}: edgeqwen bench's prefill and decode, {a.repeats} repeats.", "",
            "| build | setup | limit GiB | pp t/s | tg t/s | peak GiB |", "|---|---|---|---|---|---|"]
    text = "\n".join(head + lines) + "\n\n" + plan_section()
    print(text)
    if a.out:
        write_text(a.out, text)


if __name__ == "__main__":
    main()
