"""`edgeqwen fit`: the smallest memory a build runs in at full speed, measured under real memory limits.

Peak RSS is the wrong figure for "fits": it counts clean page-cache pages of the mapped file, which
the kernel can drop and re-read, and repacked copies of weights that a lean load does without. So
fit runs the build (fresh process, short prefill and decode) inside memory cgroups (memlimit.py) and
bisects on the limit: the answer is the smallest limit, to `resolution`, at which it loads and decodes
at >= `fraction` of its unlimited speed. Three unlimited runs give the speed (their median) and the upper
bound; plan's prediction, where it has one, gives the first bracket.

Decode speed on these VMs moves by 10-30% from minute to minute, and one wrong "too slow" sends the bisection
the wrong way for good (it raised min RAM above the unlimited peak RSS). So a too-slow probe is measured again
(up to RETRIES times, the fastest attempt counts) when noise can explain it: its cgroup never reached the limit
(nothing was reclaimed, so memory cannot have slowed it), or it missed the bar narrowly (within NEAR_MISS)
with too few major page faults to account for the time it lost, even at FAULT_S each (a 1.5B q4_0 missed by 13%
with 4 faults in 96 tokens). A probe that paged enough to explain its loss, or was stopped at its time budget,
is judged once: near its real need a 7B decodes at 91-99% of the bar with hundreds of major faults, and
retrying those would let luck pass them.
"""
from __future__ import annotations

import logging
import time

from .bench import SCHEMA, BenchConfig, build_fields, limited_row, run_one
from .memlimit import read_ahead_kb
from .plan import predicted_min_ram_for_row

_log = logging.getLogger("edgeqwen")
FIT_CONFIG = BenchConfig(prompt_tokens=64, gen_tokens=48, repeats=2, n_ctx=4096, empty_tg=False)
RETRIES = 2
BASELINE_RUNS = 3
# the most three unlimited runs may disagree, (fastest - slowest) / median: quiet runs here moved by 10-30%
BASELINE_SPREAD = 0.40
NEAR_MISS = 0.85   # share of the bar
FAULT_S = 0.01     # an upper bound on one major fault: an 8 MiB read-ahead window from a cloud disk


def _noise_can_explain(row: dict, limit: int, bar: float, tokens: int) -> bool:
    """A too-slow decode of `tokens` that finished, in a cgroup whose usage never came within 1 MiB of its limit
    (v1 and v2 report the high-water mark, so the limit cannot have caused it), or close to the bar with fewer
    major faults than it would take to lose the time it lost."""
    if row.get("status") != "too-slow" or not row.get("tg"):
        return False
    peak, tg, faults = row.get("cgroup_peak"), row["tg"]["mean"], row.get("major_faults")
    lost_s = tokens * (1 / tg - 1 / bar)
    return ((peak is not None and peak < limit - (1 << 20))
            or (tg >= NEAR_MISS * bar and faults is not None and faults * FAULT_S < lost_s))


def _check_baseline(build: str, runs: list[dict], base_tg: float) -> None:
    """Refuse to bisect against a baseline taken on a busy machine, or whose runs disagree by more than
    BASELINE_SPREAD: a fit once took 0.87 / 0.88 / 1.36 tok/s (another job on the cores) as the bar and reported a
    min RAM against it; the same build decoded at 27 tok/s minutes later."""
    from ..errors import RunnerError
    from .busy import busy_line
    busy = [r for r in runs if r.get("busy")]
    if busy:
        raise RunnerError(f"fit {build}: the machine is busy ({busy_line(busy[0])} during an unlimited run); "
                          "stop what else runs and try again")
    speeds = [r["tg"]["mean"] for r in runs]
    spread = (max(speeds) - min(speeds)) / base_tg if base_tg > 0 else float("inf")
    if spread > BASELINE_SPREAD:
        raise RunnerError(f"fit {build}: the unlimited runs disagree ({', '.join(f'{x:.2f}' for x in speeds)} tok/s, "
                          f"{spread:.0%} apart, more than {BASELINE_SPREAD:.0%}): something else is using the machine; "
                          "try again when it is quiet")


def _passes(row: dict, base_tg: float, fraction: float) -> bool:
    return row.get("status") == "ok" and row["tg"]["mean"] >= fraction * base_tg


def fit(build: str, threads: int, fp: dict, lean: bool = False, fraction: float = 0.9,
        resolution: int = 64 << 20, device: tuple[str, dict] | None = None, cfg: BenchConfig = FIT_CONFIG,
        kv: str | None = None) -> dict:
    """A `fit` row: min_ram (bytes), decode at that limit, the unlimited speed and peak RSS, every probe.
    kv: the KV cache type (GGUF; None: tuned, else f16)."""
    cfg = BenchConfig(**{**cfg.__dict__, "lean": lean, "kv": kv or cfg.kv})
    t0 = time.time()
    runs = []
    for _ in range(BASELINE_RUNS):
        base = run_one(build, threads, cfg)
        if base.get("status") != "ok":
            from ..errors import RunnerError
            raise RunnerError(f"{build} does not run even without a limit: {base.get('error')}")
        runs.append(base)
    # the bar every probe is judged against: one lucky-fast unlimited run made even a 4 GiB limit "too slow"
    # for a 1.5B (and a slow one lets a thrashing probe pass), so the median of three
    runs.sort(key=lambda r: r["tg"]["mean"])
    base = runs[len(runs) // 2]
    base_tg = base["tg"]["mean"]
    _check_baseline(build, runs, base_tg)
    peak = max(max(r.get("peak_rss_sampled") or 0, r.get("max_rss") or 0) for r in runs)
    probes = []
    tokens = cfg.gen_tokens * cfg.repeats

    def probe(limit: int) -> dict:
        r = limited_row(build, threads, cfg, fp, limit, {**base, "status": "ok"}, slow_fraction=fraction)
        attempts = 1
        while not _passes(r, base_tg, fraction) and _noise_can_explain(r, limit, fraction * base_tg, tokens) \
                and attempts <= RETRIES:
            _log.info("fit %s: %.2f GiB too slow (%.1f tok/s), which noise can explain; measuring again",
                      build, limit / 2**30, r["tg"]["mean"])
            again = limited_row(build, threads, cfg, fp, limit, {**base, "status": "ok"}, slow_fraction=fraction)
            attempts += 1
            if _passes(again, base_tg, fraction) or (again.get("tg") and again["tg"]["mean"] > r["tg"]["mean"]):
                r = again
        ok = _passes(r, base_tg, fraction)
        probes.append({"limit": limit, "status": r["status"], "tg": (r.get("tg") or {}).get("mean"),
                       "major_faults": r.get("major_faults"), "cgroup_peak": r.get("cgroup_peak"), "pass": ok,
                       "attempts": attempts})
        _log.info("fit %s%s: %.2f GiB -> %s%s", build, " (lean)" if lean else "", limit / 2**30, r["status"],
                  f", {r['tg']['mean']:.1f} tok/s" if r.get("tg") else "")
        return r
    model, fields = build_fields(build)
    top = _round(int(peak * 1.15) + (64 << 20))
    lo, hi, best = 64 << 20, top, None
    guess = predicted_min_ram_for_row({"build": fields, "lean": lean, "mapped": base.get("mapped"),
                                       "config": {"n_ctx": cfg.n_ctx, "prompt_tokens": cfg.prompt_tokens}})
    if guess and guess * 1.1 < top:
        # plan's min RAM brackets the answer when it is within 10%: two probes there instead of a halving
        # down from 64 MiB (a 7B probe that thrashes runs for minutes). Each bound is still measured.
        for limit in (_round(int(guess * 1.1)), _round(int(guess * 0.9))):
            r = probe(limit)
            if not _passes(r, base_tg, fraction):
                lo = limit
                break
            hi, best = limit, r
    if best is None:
        best = probe(hi)
        while not _passes(best, base_tg, fraction):   # rare: the peak was undersampled
            lo = max(lo, hi)
            hi *= 2
            if hi > 4 * peak + (1 << 30):
                raise RuntimeError(f"{build}: no limit up to {hi / 2**30:.1f} GiB runs at full speed")
            best = probe(hi)
    while hi - lo > max(resolution, hi // 50):
        mid = _round((lo + hi) // 2)
        if mid in (lo, hi):
            break
        r = probe(mid)
        if _passes(r, base_tg, fraction):
            hi, best = mid, r
        else:
            lo = mid
    row = {"schema": SCHEMA, "kind": "fit", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "device": fp, "build": fields, "threads": threads, "lean": lean, "fraction": fraction,
           "resolution": resolution, "min_ram": hi, "tg_at_min": best["tg"]["mean"], "baseline_tg": base_tg,
           "baseline_runs": [r["tg"]["mean"] for r in runs],
           "peak_rss_unlimited": peak, "released_bytes": base.get("released_bytes"), "mapped": base.get("mapped"),
           "probes": probes,
           "seconds": round(time.time() - t0, 1), "read_ahead_kb": read_ahead_kb(model),
           "config": {"prompt_tokens": cfg.prompt_tokens, "gen_tokens": cfg.gen_tokens, "repeats": cfg.repeats,
                      "n_ctx": cfg.n_ctx},
           **({"kv": base["kv"]} if base.get("kv") else {})}
    if device:
        name, prof = device
        usable = int(prof["ram_gib"] * prof.get("usable_fraction", 0.8) * 2**30)
        r = probe(usable)
        row["device_check"] = {"profile": name, "usable": usable, "fits": _passes(r, base_tg, fraction),
                               "status": r["status"], "tg": (r.get("tg") or {}).get("mean"),
                               "headroom": usable - hi}
    import hashlib
    row["id"] = hashlib.sha256(f"{fp.get('device_id')}|{fields['sha256']}|fit|{lean}|{row['time']}".encode()
                               ).hexdigest()[:16]
    return row


def _round(n: int) -> int:
    return -(-n // (16 << 20)) * (16 << 20)   # 16 MiB steps
