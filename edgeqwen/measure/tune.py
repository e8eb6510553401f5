"""`edgeqwen tune BUILD`: this machine's best llama.cpp settings for one build, measured, stored, then used.

Every candidate (flash attention on/off x threads 1..cores x KV cache f16/q8_0, the q8_0 cache only with flash
attention, as llama.cpp requires) is measured as a bench child
process would be (bench.run_one): prefill of a prompt, decode from an empty context and decode after the prompt
(at depth). The winner has the best geometric mean of the three figures' ratios to llama.cpp's defaults here
(flash attention on, all cores, f16 cache), so none of the three is traded away for another unseen. It is
stored per device id and build sha256 in tune.json under edgeqwen's home; run, chat, serve and bench load a
build with its tuned settings unless a flag says otherwise (`--no-tune`, or the setting given explicitly).

A shared machine is planned for too: with one other process busy on a core (a hog tune starts itself), decode is
measured again at every thread count, with llama.cpp's threads spinning while they wait for each other (the
default) and sleeping (OpenMP's passive wait policy); the best of those is stored beside the winner, and run,
chat and serve load with it when other processes hold a core at load time (tuned.for_now).
"""
from __future__ import annotations

import contextlib
import itertools
import math
import subprocess
import sys
import time

from ..errors import UsageError
from .tuned import store, tune_file

DEFAULTS = {"flash_attn": True, "kv": "f16"}   # plus threads = all cores: the runner's own defaults


def candidates(cores: int, threads: list[int] | None = None) -> list[dict]:
    ts = threads or list(range(1, cores + 1))
    # a quantized V cache needs flash attention in llama.cpp: that pair is not a candidate
    return [{"threads": t, "flash_attn": fa, "kv": kv}
            for t, fa, kv in itertools.product(ts, (True, False), ("f16", "q8_0")) if fa or kv == "f16"]


def score(m: dict, base: dict) -> float:
    """Geometric mean of prefill, empty-context decode and decode-at-depth, each against the defaults'."""
    return math.exp(sum(math.log(m[k] / base[k]) for k in ("pp", "tg_empty", "tg_depth")) / 3)


def tune(build: str, depth: int = 1024, gen_tokens: int = 64, repeats: int = 2, threads: list[int] | None = None,
         hog_phase: bool = True, say=print) -> dict:
    """Measure every candidate for BUILD on this machine; store and return the winner."""
    from ..formats import detect
    from ..home import resolve_build
    from ..process import physical_cores
    from .bench import BenchConfig, run_one
    from .hw import fingerprint
    path, manifest = resolve_build(build)
    if not detect(path, manifest).tune or not (manifest or {}).get("sha256"):
        raise UsageError(f"tune measures llama.cpp's settings: {build} is not a GGUF build with a manifest")
    cores = physical_cores()
    fp = fingerprint(bandwidth=False)
    default = {"threads": cores, **DEFAULTS}
    todo = candidates(cores, threads)
    if default not in todo:
        todo.insert(0, default)
    measured = []
    say(f"tuning {manifest['name']} on {fp['device_id']}: {len(todo)} settings x (prefill {depth}, decode "
        f"{gen_tokens} from empty and at depth {depth}), {repeats} repeats each")
    for s in todo:
        cfg = BenchConfig(prompt_tokens=depth, gen_tokens=gen_tokens, repeats=repeats, n_ctx=depth + gen_tokens + 64,
                          kv=s["kv"], flash_attn=s["flash_attn"], tuned=False)
        row = run_one(str(path), s["threads"], cfg)
        if row.get("status", "ok") != "ok" or "pp" not in row:
            say(f"  {_label(s)}: failed ({row.get('error', '?')})")
            continue
        m = {**s, "pp": row["pp"]["mean"], "tg_empty": row["tg_empty"]["mean"], "tg_depth": row["tg"]["mean"],
             "busy": bool(row.get("busy"))}
        measured.append(m)
        say(f"  {_label(s)}: pp {m['pp']:.1f}, tg {m['tg_empty']:.1f}, tg@d{depth} {m['tg_depth']:.1f} tok/s"
            + ("  (machine busy: not trusted)" if m["busy"] else ""))
    base = next((m for m in measured if all(m[k] == v for k, v in default.items())), None)
    if base is None:
        raise UsageError("tune: the default settings did not run; nothing to compare against")
    quiet = [m for m in measured if not m["busy"]] or measured
    best = max(quiet, key=lambda m: score(m, base))
    settings = {k: best[k] for k in ("threads", "flash_attn", "kv")}
    for m in measured:
        m["score"] = score(m, base)
    say(f"best: {_label(settings)} ({score(best, base):.3f}x llama.cpp's defaults, geometric mean of the three)")
    beside = []
    if cores > 1 and hog_phase:
        busy, beside = _beside_a_hog(path, settings, best, base, cores, threads, gen_tokens, repeats, say)
        if busy:
            settings["busy"] = busy
    store(manifest["sha256"], fp["device_id"], settings, measured, beside)
    say(f"stored in {tune_file()}")
    return {"settings": settings, "measured": measured, "beside_hog": beside, "score": score(best, base)}


@contextlib.contextmanager
def hog():
    """One other process keeping a core busy for the length of the block: the shared machine tune plans for."""
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)   # running before the measurement's own idle look
        yield p
    finally:
        p.kill()
        p.wait()


def _beside_a_hog(path, settings, best, base, cores, threads, gen_tokens, repeats, say) -> tuple[dict | None,
                                                                                                 list[dict]]:
    """Decode beside one busy process, at every thread count, spinning and sleeping: the best, and all."""
    from ..formats.gguf.runner import has_openmp
    from .bench import BenchConfig, run_one
    waits = (True, False) if has_openmp() else (True,)   # without OpenMP the passive policy means nothing
    todo = [{"threads": t, "spin": w} for t in sorted(set(threads or range(1, cores + 1)) | {cores}) for w in waits]
    say(f"beside one busy process (a hog on one core): {len(todo)} settings x decode {gen_tokens} tokens")
    out = []
    with hog():
        for c in todo:
            cfg = BenchConfig(prompt_tokens=64, gen_tokens=gen_tokens, repeats=repeats, n_ctx=64 + gen_tokens + 64,
                              kv=settings["kv"], flash_attn=settings["flash_attn"], tuned=False, spin=c["spin"])
            row = run_one(str(path), c["threads"], cfg)
            if row.get("status", "ok") != "ok" or not row.get("tg_empty"):
                say(f"  threads {c['threads']}, {_wait(c['spin'])}: failed ({row.get('error', '?')})")
                continue
            m = {**c, "tg_empty": row["tg_empty"]["mean"], "others": (row.get("load") or {}).get("others_during")}
            out.append(m)
            say(f"  threads {c['threads']}, {_wait(c['spin'])}: tg {m['tg_empty']:.1f} tok/s "
                f"({m['tg_empty'] / best['tg_empty']:.2f}x idle)")
    if not out:
        return None, out
    top = max(out, key=lambda m: m["tg_empty"])
    dflt = next((m for m in out if m["threads"] == base["threads"] and m["spin"]), None)
    say(f"beside a hog: threads {top['threads']}, {_wait(top['spin'])}: {top['tg_empty']:.1f} tok/s, "
        f"{top['tg_empty'] / best['tg_empty']:.2f}x the idle {best['tg_empty']:.1f}"
        + (f" (llama.cpp's defaults there: {dflt['tg_empty']:.1f}, {dflt['tg_empty'] / best['tg_empty']:.2f}x)"
           if dflt else ""))
    return {"threads": top["threads"], "spin": top["spin"]}, out


def _wait(spin: bool) -> str:
    return "threads spin" if spin else "threads sleep"


def _label(s: dict) -> str:
    return f"threads {s['threads']}, flash attention {'on' if s['flash_attn'] else 'off'}, KV {s['kv']}"
