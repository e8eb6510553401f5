"""`edgeqwen tune BUILD`: this machine's best llama.cpp settings for one build, measured, stored, then used.

Every candidate (flash attention on/off x threads 1..cores x KV cache f16/q8_0, the q8_0 cache only with flash
attention, as llama.cpp requires) is measured as a bench child
process would be (bench.run_one): prefill of a prompt, decode from an empty context and decode after the prompt
(at depth). The winner has the best geometric mean of the three figures' ratios to llama.cpp's defaults here
(flash attention on, all cores, f16 cache), so none of the three is traded away for another unseen. It is
stored per device id and build sha256 in tune.json under edgeqwen's home; run, chat, serve and bench load a
build with its tuned settings unless a flag says otherwise (`--no-tune`, or the setting given explicitly).
"""
from __future__ import annotations

import itertools
import math

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
         say=print) -> dict:
    """Measure every candidate for BUILD on this machine; store and return the winner."""
    from ..formats import detect
    from ..home import resolve_build
    from ..process import physical_cores
    from .bench import BenchConfig, run_one
    from .hw import fingerprint
    path, manifest = resolve_build(build)
    if detect(path, manifest).name != "gguf" or not (manifest or {}).get("sha256"):
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
    store(manifest["sha256"], fp["device_id"], settings, measured)
    say(f"best: {_label(settings)} ({score(best, base):.3f}x llama.cpp's defaults, geometric mean of the three); "
        f"stored in {tune_file()}")
    return {"settings": settings, "measured": measured, "score": score(best, base)}


def _label(s: dict) -> str:
    return f"threads {s['threads']}, flash attention {'on' if s['flash_attn'] else 'off'}, KV {s['kv']}"
