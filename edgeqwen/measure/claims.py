"""Claims as data (edgeqwen/data/claims.toml), judged against measured rows: PASS or FAIL; without a row,
PREDICTED PASS / FAIL (±e%) where plan's prediction for that device has a known error (calibrate.py), else UNTESTED."""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import UsageError


def claims_file():
    from ..resources import data
    return data("claims.toml")


def load_claims(path: Path | None = None) -> list[dict]:
    from ..recipes import load_toml
    path = path or claims_file()
    data = load_toml(path, "claims")
    claims = data.get("claim", [])
    if not isinstance(claims, list):
        raise UsageError(f"{path}: claims are [[claim]] tables")
    from ..schemas import Claim, check
    for i, c in enumerate(claims, 1):
        who = c.get("id", f"#{i}") if isinstance(c, dict) else f"#{i}"
        check(Claim, c, f"{path}: claim {who}", "the claim", "a table")
    return claims


def row_matches_device(row: dict, profile: dict) -> bool:
    """A row is from such a device: its name and CPU match, and its RAM (an emulator's RAM is the host's)."""
    fp, m = row["device"], profile.get("match", {})
    if not m:
        return False
    for key in ("device", "cpu"):
        if key in m and not re.search(m[key], fp.get(key, "")):
            return False
    ram = fp.get("ram_total", 0) / 2**30
    if "ram_gib" in m and not fp.get("emulated") and abs(ram - m["ram_gib"]) > 0.1 * m["ram_gib"]:
        return False
    return True


def peak_rss(row: dict) -> int:
    return max(row.get("peak_rss_sampled") or 0, row.get("max_rss") or 0)


def judge(claim: dict, rows: list[dict], devices: dict) -> dict:
    """The verdict and the row that decides it (the best matching row), or UNTESTED with a prediction."""
    from .hw import throttled
    from .plan import plan, verdict
    profile = devices.get(claim["device"])
    if profile is None:
        raise UsageError(f"claim {claim['id']}: unknown device {claim['device']!r}; see edgeqwen plan --device list")
    from ..recipes import DEFAULT_ALIASES
    quant = DEFAULT_ALIASES.get(claim["quant"], claim["quant"])
    ctx = claim.get("ctx", 4096)
    same = [r for r in rows if r.get("kind") == "bench" and r["build"].get("size") == claim["model"]
            and r["build"].get("quant") == quant and row_matches_device(r, profile)]
    # An emulated run proves the build runs on that ISA (at any context), never how fast: kept apart, never a
    # verdict on speed.
    # A run on a busy machine (busy.py) measured the other processes as much as the build: never a verdict.
    matching = [r for r in same if not r["device"].get("emulated") and not r.get("busy") and not throttled(r)
                and (r.get("n_ctx") or 4096) >= ctx]
    emulated = [r for r in same if r["device"].get("emulated") and r.get("status") == "ok"]
    min_tps, max_rss = claim.get("min_decode_tps"), claim.get("max_peak_rss_gib")

    def ok(r):
        return (r.get("status") == "ok" and (min_tps is None or r["tg"]["mean"] >= min_tps)
                and (max_rss is None or peak_rss(r) <= max_rss * 2**30))
    out = {"claim": claim, "emulated_row": emulated[-1] if emulated else None}
    if claim.get("fits"):
        _judge_fit(claim, quant, rows, profile, out, matching, ok)
    elif matching:
        passing = [r for r in matching if ok(r)]
        best = max(passing or matching, key=lambda r: r["tg"]["mean"] if r.get("status") == "ok" else -1)
        out.update(verdict="PASS" if passing else "FAIL", row=best)
    else:
        out["verdict"] = "UNTESTED"
    # The prediction beside a measurement uses the bandwidth that machine measured (each row's device records
    # it), never a profile's fixed figure from another day or VM: a ceiling below its own measurement is a lie.
    measured_bw = sorted(r["device"]["bandwidth_gbs"] for r in matching if r["device"].get("bandwidth_gbs"))
    if measured_bw:
        profile = {**profile, "bandwidth_gbs": measured_bw[len(measured_bw) // 2]}
    try:
        p = plan(claim["model"], quant, ctx=ctx, amx=bool(profile.get("amx")))
        v = verdict(p, profile, claim["device"])
        need = p.min_ram if claim.get("fits") else p.peak_ram
        fits = need <= (max_rss * 2**30 if max_rss else v["budget"])
        fast = min_tps is None or v["expected_tps"] >= min_tps
        out["prediction"] = {"verdict": "PASS" if fits and fast else "FAIL", "peak_ram": need,
                             "expected_tps": v["expected_tps"], "ceiling_tps": v["ceiling_tps"], "error": v["error"],
                             "bandwidth_gbs": profile["bandwidth_gbs"], "measured_bandwidth": bool(measured_bw)}
        # nothing measured, but a prediction whose error is known: a third kind of verdict, never a PASS
        # (of speed: the error is decode's; a memory-only claim stays UNTESTED until a fit row exists)
        if out["verdict"] == "UNTESTED" and v["error"] is not None and min_tps is not None:
            out["verdict"] = f"PREDICTED {out['prediction']['verdict']} (±{v['error']:.0%})"
    except UsageError:
        pass
    return out


def usable_ram(profile: dict) -> int:
    return int(profile["ram_gib"] * profile.get("usable_fraction", 0.8) * 2**30)


def _judge_fit(claim, quant, rows, profile, out, matching, ok) -> dict:
    """fits = true: memory from a `fit` row (measured min RAM <= the device's usable RAM, on whatever CPU it was
    measured under a memory limit); speed, if the claim asks for one, only from a row of that device."""
    from .table import latest_fits
    fits = [r for r in latest_fits(rows) if r["build"].get("size") == claim["model"]
            and r["build"].get("quant") == quant]
    if not fits:
        out["verdict"] = "UNTESTED"
        return out
    best = min(fits, key=lambda r: r["min_ram"])
    mem_ok = best["min_ram"] <= usable_ram(profile)
    out["fit_row"] = best
    if not mem_ok:
        out["verdict"] = "FAIL"
    elif claim.get("min_decode_tps") is None:
        out["verdict"] = "PASS"
    elif matching:
        passing = [r for r in matching if ok(r)]
        out.update(verdict="PASS" if passing else "FAIL", row=max(passing or matching, key=lambda r: r.get("tg", {})
                                                                  .get("mean", -1)))
    else:
        out["verdict"] = "UNTESTED"   # it fits, but its speed on that device is unmeasured
    return out


def render_claims(results: list[dict]) -> str:
    lines = ["| claim | verdict | deciding row | plan predicts |", "|---|---|---|---|"]
    for r in results:
        c = r["claim"]
        row, fit = r.get("row"), r.get("fit_row")
        if row:
            tg = f"{row['tg']['mean']:.1f} tok/s" if row.get("status") == "ok" else row.get("status")
            dec = (f"{row['build']['name']}, {row['threads']} threads: {tg}, "
                   f"{peak_rss(row) / 2**30:.2f} GiB ({row['device']['cpu']})")
        else:
            dec = "no measurement on this device"
            if r.get("emulated_row"):
                e = r["emulated_row"]
                dec = (f"runs on ARM (emulated, correctness): {e['build']['name']} under "
                       f"{e['device'].get('emulator', 'an emulator')}; speed on the device UNTESTED")
        if fit:
            dec = (f"fits: min RAM {fit['min_ram'] / 2**30:.2f} GiB ({fit['build']['name']}"
                   f"{', lean' if fit.get('lean') else ''}), measured under a memory limit on "
                   f"{fit['device'].get('cpu', '?')}; " + ("speed: " + dec if c.get("min_decode_tps") else "no speed "
                                                          "condition"))
        p = r.get("prediction")
        err = f" ±{p['error']:.0%}" if p and p.get("error") is not None else ""
        bw = f" at the rows' {p['bandwidth_gbs']:.1f} GB/s" if p and p.get("measured_bandwidth") else ""
        pred = (f"{p['verdict']}: {p['peak_ram'] / 2**30:.1f} GiB, ~{p['expected_tps']:.1f}{err} tok/s "
                f"(ceiling {p['ceiling_tps']:.1f}{bw})") if p else "-"
        lines.append(f"| {c.get('text', c['id'])} | **{r['verdict']}** | {dec} | {pred} |")
    return "\n".join(lines) + "\n"
