"""`edgeqwen bench`: load time, prefill and decode tok/s, TTFT and peak RSS per build and thread count.

Each (build, threads) runs in a fresh child process so its peak RSS is its own. The child only
consumes the runner's response stream: the numbers are the ones the runner reports.
"""
from __future__ import annotations

import hashlib
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..formats import DEFAULT, model_path
from ..home import resolve_build

SCHEMA = 1
CHAT_PROMPT = [{"role": "user", "content": "Hi! Can you suggest three names for a small bakery?"}]


@dataclass
class BenchConfig:
    prompt_tokens: int = 512
    gen_tokens: int = 128
    repeats: int = 3
    n_ctx: int = 4096
    seed: int = 0
    lean: bool = False        # no repacked / prepacked second copy of the weights (less memory, maybe slower)
    workers: list[str] = field(default_factory=list)   # llama.cpp RPC workers HOST:PORT (several devices)
    split: list[float] | None = None                    # layer shares: this machine, then each worker
    empty_tg: bool = True     # also decode from an empty context: llama-bench's tgN (tg is after the prompt)
    draft: str | None = None  # speculative decoding: a draft build, or "lookup"
    draft_max: int = 8
    kv: str | None = None     # the KV cache type (GGUF): f16 or q8_0; None: tuned, else f16
    flash_attn: bool | None = None   # None: tuned, else on
    tuned: bool = True        # use `edgeqwen tune`'s stored settings for what is not given
    spin: bool = True         # llama.cpp's threads spin while they wait (False: they sleep; a busy machine)


def mean_sd(xs: list[float]) -> dict:
    xs = [float(x) for x in xs]
    return {"mean": statistics.fmean(xs) if xs else 0.0,
            "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs), "values": xs}


# --- the child process -------------------------------------------------------------------------

REPEAT_DONE = "# repeat done"   # the child's progress line on stdout; its last line is the result


def worker(build: str, threads: int, cfg: BenchConfig) -> dict:
    """Runs in the child: load the build, then measure it."""
    from ..process import max_rss_bytes
    from ..formats.load import load_runner
    options, s = tuned_settings(build, threads, cfg)
    runner = load_runner(build, options)
    out = measure(runner, cfg, on_repeat=lambda: print(REPEAT_DONE, flush=True))
    # what it ran with: every row says so (a tuned setting, a flag, or the runner's default)
    out["settings"] = {"threads": threads, "flash_attn": getattr(runner, "flash_attn", None),
                       "kv": getattr(runner, "kv", None), "spin": getattr(runner, "spin", None),
                       "tuned": s is not None}
    runner.close()
    # The kernel's high-water mark, no sampling thread: on 2 vCPUs a thread waking every 20 ms preempts one of
    # the two compute threads while the measurement runs, and no sample can exceed VmHWM anyway.
    out["max_rss"] = max_rss_bytes()
    return out


def tuned_settings(build: str, threads: int | None, cfg: BenchConfig):
    """(how the child loads BUILD: the config's options, `edgeqwen tune`'s stored settings filling what they leave
    unset unless turned off; those settings or None). A bench measures what it was asked: never the busy-machine
    switch."""
    from ..formats.gguf.rpc import parse_workers
    from ..formats.load import LoadOptions
    from .tuned import with_tuned
    # isolate=False: this child is already the process a lost worker may abort; the parent reports it
    split = tuple(cfg.split) if cfg.split else None
    options = LoadOptions(threads=threads, n_ctx=cfg.n_ctx, lean=cfg.lean, isolate=False, split=split,
                          workers=tuple(parse_workers(",".join(cfg.workers))) or None, draft=cfg.draft,
                          draft_max=cfg.draft_max, kv=cfg.kv, flash_attn=cfg.flash_attn, spin=cfg.spin)
    return with_tuned(build, options, now=False) if cfg.tuned else (options, None)


def default_threads(build: str, cfg: BenchConfig) -> list[int]:
    """--threads not given: the tuned count, else the physical cores."""
    from ..process import physical_cores
    options, _ = tuned_settings(build, None, cfg)
    return [options.threads or physical_cores()]


def measure(runner, cfg: BenchConfig, on_repeat=None) -> dict:
    """Warm up, then `repeats` x (random prompt -> gen tokens greedy, EOS off: pp and tg at that depth; one
    token -> gen tokens: tg from an empty context; chat-prompt TTFT).

    Every number is read off the runner's response stream.
    """
    import random

    from ..runner import Sampling
    rng = random.Random(cfg.seed)
    vocab = runner.regular_vocab  # the build's own ordinary tokens: no special ids in random prompts
    greedy = Sampling(max_tokens=cfg.gen_tokens, temperature=0, ignore_eos=True)
    chat_tokens = runner.tokenize(runner.apply_chat_template(CHAT_PROMPT)) if runner.chat_template else None
    # Warm up at the measured prompt length, as llama-bench does: the first prefill of a size touches
    # its compute buffers for the first time (measured 3-14% slower), which is not its speed.
    list(runner.stream([rng.randrange(vocab) for _ in range(cfg.prompt_tokens)],
                       Sampling(max_tokens=8, temperature=0, ignore_eos=True)))
    pp, tg, pp_c, tg_c, ttft, tg0 = [], [], [], [], [], []
    spec = {"drafted": 0, "accepted": 0, "rounds": 0}
    last = None
    import resource
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    for _ in range(cfg.repeats):
        prompt = [rng.randrange(vocab) for _ in range(cfg.prompt_tokens)]
        last = list(runner.stream(prompt, greedy))[-1]
        pp.append(last.prompt_tps)
        tg.append(last.generation_tps)
        c = last.counters
        for k in spec:   # speculative decoding's own counts, over the decode after the prompt
            spec[k] += (c.get("speculative") or {}).get(k, 0)
        if c.get("t_prompt_ms"):
            pp_c.append(c["n_prompt"] / c["t_prompt_ms"] * 1000)
        if c.get("t_eval_ms"):
            tg_c.append(c["n_eval"] / c["t_eval_ms"] * 1000)
        if cfg.empty_tg:   # one prompt token that differs from the last prompt's first: no KV reuse
            first = (prompt[0] + 1 + rng.randrange(vocab - 1)) % vocab if prompt else rng.randrange(vocab)
            tg0.append(list(runner.stream([first], greedy))[-1].generation_tps)
        if chat_tokens:  # differs from the random prompt at token 0: no KV reuse
            first = next(iter(runner.stream(chat_tokens, Sampling(max_tokens=1, temperature=0))))
            ttft.append(first.ttft_s)
        if on_repeat:
            on_repeat()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults0
    return {"backend": runner.backend, "load_s": runner.load_s, "n_ctx": runner.n_ctx,
            "major_faults": faults, "major_faults_per_token": faults / max(1, cfg.repeats * cfg.gen_tokens),
            "pp": mean_sd(pp), "tg": mean_sd(tg), "tg_empty": mean_sd(tg0) if tg0 else None, "ttft_s": mean_sd(ttft),
            "counters": {"pp": mean_sd(pp_c), "tg": mean_sd(tg_c)}, "stream_peak_rss": last.peak_rss,
            "released_bytes": getattr(runner, "released", 0), "mapped": getattr(runner, "mapped", True),
            "hugepage_bytes": getattr(runner, "hugepages", 0),   # weights asked into huge pages (hugepages.py)
            **({"kv": runner.kv} if getattr(runner, "kv", "f16") != "f16" else {}),
            **({"speculative": dict(spec, draft=runner.draft_name(), draft_max=cfg.draft_max,
                                    acceptance=spec["accepted"] / spec["drafted"] if spec["drafted"] else 0.0)}
               if cfg.draft else {})}


# --- the parent ----------------------------------------------------------------------------------

def weight_bytes_per_token(model: Path) -> tuple[int, int, dict]:
    """Bytes of weights one decode step reads, and the file's tensor bytes; plus shape facts for the KV cache.

    token_embd is read one row per token unless it doubles as the output (tied embeddings).
    """
    import gguf

    from ..formats.gguf.info import read_gguf_info
    info = read_gguf_info(model)
    names = {t.name: t.n_bytes for t in info.tensors}
    total = sum(names.values())
    per_token = total - (names.get("token_embd.weight", 0) if "output.weight" in names else 0)
    shape = {"n_layer": info.get(gguf.Keys.LLM.BLOCK_COUNT), "n_head": info.get(gguf.Keys.Attention.HEAD_COUNT),
             "n_head_kv": info.get(gguf.Keys.Attention.HEAD_COUNT_KV),
             "n_embd": info.get(gguf.Keys.LLM.EMBEDDING_LENGTH)}
    return per_token, total, shape


def kv_bytes_per_position(shape: dict, bytes_per_elem: int = 2) -> int:
    head_dim = shape["n_embd"] // shape["n_head"]
    return 2 * shape["n_layer"] * shape["n_head_kv"] * head_dim * bytes_per_elem  # K and V, f16


def run_one(build: str, threads: int, cfg: BenchConfig, timeout: float = 3600, on_repeat=None,
            memory_limit: int | None = None) -> dict:
    """One fresh child process; its stdout carries a line per repeat, then the result as JSON.

    memory_limit: run the child in a memory cgroup of that many bytes, after evicting the model's pages
    from the page cache so the child is charged for every page it reads. The row records the machine's load
    before and during the run, and is marked busy when other processes took the CPU (busy.py).
    """
    from .busy import Watch, idle_look, load_fields
    before = idle_look()
    with Watch() as during:
        row = _run_child(build, threads, cfg, timeout, on_repeat, memory_limit)
    return {**row, **load_fields(before, during)}


def _run_child(build: str, threads: int, cfg: BenchConfig, timeout: float, on_repeat,
               memory_limit: int | None) -> dict:
    import contextlib
    import tempfile
    import threading

    from .memlimit import MemoryCgroup, drop_page_cache
    cmd = [sys.executable, "-m", "edgeqwen.measure.bench", build, str(threads), json.dumps(cfg.__dict__)]
    cg = MemoryCgroup(memory_limit) if memory_limit else contextlib.nullcontext()
    if memory_limit:
        drop_page_cache(model_files(build))
    t0 = time.time()
    with tempfile.TemporaryFile(mode="w+") as err, cg:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                             preexec_fn=cg.enter if memory_limit else None)
        timer = threading.Timer(timeout, p.kill)
        timer.start()
        lines = []
        try:
            for line in p.stdout:
                if line.strip() == REPEAT_DONE:
                    if on_repeat:
                        on_repeat()
                elif line.strip():
                    lines.append(line)
            rc = p.wait()
        finally:
            timed_out = not timer.is_alive()
            timer.cancel()
            if p.poll() is None:
                p.kill()
                p.wait()
        err.seek(0)
        stderr = err.read()
        limited = {"memory_limit": memory_limit, "cgroup_peak": cg.peak(), "oom_kills": cg.oom_kills()} \
            if memory_limit else {}
    if limited.get("oom_kills"):
        return {"status": "oom-killed", "error": "killed by the kernel's OOM killer inside a "
                f"{memory_limit / 2**30:.2f} GiB memory limit", **limited}
    if timed_out:
        return {"status": "too-slow" if memory_limit else "failed", "error": f"timed out after {timeout:.0f} s",
                **limited}
    if rc == 0:
        try:
            return {"status": "ok", **json.loads(lines[-1]), "wall_s": time.time() - t0, **limited}
        except (IndexError, ValueError):
            return {"status": "failed", "error": "the benchmark child printed no result", **limited}
    if rc == -9:
        return {"status": "oom", "error": "killed (SIGKILL: out of memory?)", **limited}
    last = (stderr.strip().splitlines() or [f"exit code {rc}"])[-1]
    return {"status": "failed", "error": last[:300], **limited}


def model_files(build: str) -> list[Path]:
    """The files a build's runner maps (what a memory limit must hold)."""
    from ..formats import hashed_paths
    path, manifest = resolve_build(build)
    return [p for p in hashed_paths(path, manifest) if p.exists()] if path.is_dir() else [path]


def build_fields(build: str) -> tuple[Path, dict]:
    """(model file, the row's "build" object): what every result row says about the build it measured."""
    path, manifest = resolve_build(build)
    manifest = manifest or {}
    model = model_path(path, manifest)
    return model, {"name": manifest.get("name", model.stem), "format": manifest.get("format", DEFAULT.name),
                   "quant": manifest.get("quant"), "recipe": (manifest.get("recipe") or {}).get("name"),
                   "size": (manifest.get("recipe") or {}).get("size"), "synthetic": bool(manifest.get("synthetic")),
                   "file_size": manifest.get("file_size") or (model.stat().st_size if model.exists() else None),
                   "sha256": manifest.get("sha256"), "config": manifest.get("config")}


def make_row(build: str, threads: int, cfg: BenchConfig, fp: dict, result: dict) -> dict:
    model, fields = build_fields(build)
    row = {
        "schema": SCHEMA, "kind": "bench", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": fp,
        "build": fields,
        "threads": threads, "prompt_tokens": cfg.prompt_tokens, "gen_tokens": cfg.gen_tokens,
        "repeats": cfg.repeats, "lean": cfg.lean, **result,
    }
    from .hw import thermal
    if after := thermal():   # the fingerprint holds the state before; a board that heated up says so here
        row["thermal_after"] = after
    if cfg.workers:   # several devices: who took part, in what shares, and what each used (when it is local)
        from ..formats.gguf.rpc import parse_endpoint, worker_peak_memory
        row.update(workers=cfg.workers, split=cfg.split,
                   worker_peak_rss={w: worker_peak_memory(parse_endpoint(w)) for w in cfg.workers})
    if result.get("status") == "ok" and model.suffix == ".gguf":
        per_token, total, shape = weight_bytes_per_token(model)
        kv = kv_bytes_per_position(shape) * (cfg.prompt_tokens + cfg.gen_tokens / 2)
        row["bytes_per_token"] = int(per_token + kv)
        bw = fp.get("bandwidth_gbs")
        if bw:
            row["roofline_tps"] = bw * 1e9 / row["bytes_per_token"]
            row["roofline_frac"] = row["tg"]["mean"] / row["roofline_tps"]
    key = f"{fp.get('device_id')}|{row['build']['sha256'] or row['build']['name']}|{threads}|{row['time']}"
    row["id"] = hashlib.sha256(key.encode()).hexdigest()[:16]
    return row


SLOW_FRACTION = 0.5   # under a memory limit, decode below this fraction of the unlimited speed is "too-slow"


def bench(builds: list[str], threads: list[int], cfg: BenchConfig, fp: dict, out: Path | None = None,
          progress=None, memory_limit: int | None = None) -> list[dict]:
    """Measure every build at every thread count; rows are appended to out as they come. progress(row) per row.

    With memory_limit, each build also runs inside a memory cgroup of that size, after an unlimited run that
    gives the speed it is judged against; both rows are recorded."""
    from ..progress import bar
    for b in builds:
        resolve_build(b)  # fail on a bad name before measuring anything
    runs = 2 if memory_limit else 1
    per_build = {b: threads or default_threads(b, cfg) for b in builds}   # threads None: tuned, else all cores
    with bar("bench", sum(map(len, per_build.values())) * cfg.repeats * runs, unit="repeat") as upd:
        rows = []
        for b in builds:
            for t in per_build[b]:
                base = _emit(make_row(b, t, cfg, fp, run_one(b, t, cfg, on_repeat=lambda: upd(1))), out, progress)
                rows.append(base)
                if memory_limit:
                    rows.append(_emit(limited_row(b, t, cfg, fp, memory_limit, base, lambda: upd(1)), out, progress))
    return rows


def limited_row(b: str, t: int, cfg: BenchConfig, fp: dict, limit: int, base: dict, on_repeat=None,
                slow_fraction: float = SLOW_FRACTION) -> dict:
    """One run inside a memory limit, judged against an unlimited row of the same build."""
    # a thrashing run is too slow by definition: stop it at twice the unlimited run's wall time
    budget = 2 * base.get("wall_s", 600) + 30 if base.get("status") == "ok" else 3600
    res = run_one(b, t, cfg, timeout=budget, on_repeat=on_repeat, memory_limit=limit)
    row = make_row(b, t, cfg, fp, res)
    if base.get("status") == "ok":
        row["baseline_tg"] = base["tg"]["mean"]
        if row["status"] == "ok" and row["tg"]["mean"] < slow_fraction * base["tg"]["mean"]:
            row["status"] = "too-slow"
            row["error"] = (f"decode {row['tg']['mean']:.1f} tok/s, below {slow_fraction:.0%} of "
                            f"{base['tg']['mean']:.1f}")
    return row


def _emit(row: dict, out: Path | None, progress) -> dict:
    if out:
        with open(out, "a") as f:  # append: earlier results are never overwritten
            f.write(json.dumps(row) + "\n")
    if progress:
        progress(row)
    return row


def parse_threads(spec: str | None) -> list[int]:
    if not spec:
        from ..process import physical_cores
        return [physical_cores()]
    try:
        ts = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--threads {spec!r}: give numbers separated by commas, e.g. 1,2,4") from None
    from ..process import MAX_THREADS
    if not ts or min(ts) < 1 or max(ts) > MAX_THREADS:
        raise UsageError(f"--threads {spec!r}: thread counts must be between 1 and {MAX_THREADS}")
    return ts


if __name__ == "__main__":
    from ..errors import EdgeqwenError
    try:
        print(json.dumps(worker(sys.argv[1], int(sys.argv[2]), BenchConfig(**json.loads(sys.argv[3])))))
    except EdgeqwenError as e:   # one line for the parent's failure row, not a traceback
        print(str(e), file=sys.stderr)
        sys.exit(1)
