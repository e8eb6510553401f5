"""Plan's decode prediction checked against what people have published for devices we do not hold.

data/published.toml holds sourced measurements (Raspberry Pi 4/5, Apple M-series, x86 machines). Decode is bound
by memory bandwidth: tok/s ~ efficiency x bandwidth / bytes read per token. The efficiency is fitted per backend
group (llama.cpp on the CPU, Ollama included; llama.cpp on Metal; MLX) and device class (pi, apple, x86) as the
median of measured / ceiling over the published decode rows, and the error it carries is measured by leaving each
row out in turn (leave-one-out). Rows marked ambiguous (unknown quant, mixed prefill into decode, an unnamed
device) are kept in the file and left out of the fit.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from functools import lru_cache

# Ollama is llama.cpp underneath: the same kernels on the same device
GROUP = {"llama.cpp CPU": "cpu", "Ollama": "cpu", "llama.cpp Metal": "metal", "Ollama Metal": "metal", "MLX": "mlx"}
# A row whose source printed no file size: a Qwen2.5 0.5B/1.5B/7B gets plan's exact size for its quant; any other
# model its parameters x the bits per weight plan gives the 7B in that quant (our quant names for the published).
QUANT = {"Q4_K_M": "q4_k_m", "Q4_0": "q4_0", "Q8_0": "q8_0", "F16": "f16", "4bit": "mlx4", "8bit": "mlx8"}
QWEN_SIZES = {"qwen2.5:0.5b": "0.5b", "qwen2.5:1.5b": "1.5b", "qwen2.5:7b": "7b", "qwen 2.5 7b": "7b",
              "qwen2.5-7b-instruct": "7b"}


def is_decode(test: str) -> bool:
    t = test.lower()
    return "prompt" not in t and "pp" not in t.split()[0] and (t.startswith("tg") or "eval" in t or "generation" in t)


@dataclass(frozen=True)
class Point:
    row: dict
    group: str
    cls: str
    bandwidth: float        # GB/s
    bytes_per_token: float
    rated: bool             # the bandwidth is the CPU's rated figure, not the machine's known one

    @property
    def ratio(self) -> float:   # measured / the bandwidth ceiling
        return self.row["tok_s"] * self.bytes_per_token / (self.bandwidth * 1e9)


@lru_cache(maxsize=1)
def published() -> dict:
    from ..recipes import load_toml
    from ..resources import data
    from ..schemas import PublishedRow, check
    d = load_toml(data("published.toml"), "published measurements")
    for i, r in enumerate(d.get("row", [])):
        check(PublishedRow, r, f"published.toml row {i + 1} ({r.get('device', '?')})", "a published row", "a table")
    return d


def _bandwidth(row: dict, table: dict) -> tuple[float, bool] | None:
    if row.get("bandwidth_gbs"):
        return float(row["bandwidth_gbs"]), False
    chip = row.get("chip", "")
    if chip.startswith("Apple"):
        from .hw import apple_chips
        c = apple_chips().get(chip)
        return (float(c["bandwidth_gbs"]), False) if c else None
    for key, b in table.items():
        if chip.startswith(key):
            return float(b["gbs"]), bool(b.get("rated"))
    return None


def _bytes(row: dict, plan_fn) -> float | None:
    if row.get("file_gib"):
        return row["file_gib"] * 2**30
    quant = QUANT.get(row["quant"])
    if quant is None or plan_fn is None:
        return None
    size = QWEN_SIZES.get(row["model"].lower())
    if size:
        return plan_fn(size, quant).file_bytes
    p = plan_fn("7b", quant)
    return row["params_b"] * 1e9 * p.file_bytes / p.params


def points(plan_fn=None) -> list[Point]:
    """The published decode rows usable for the fit. plan_fn(size, quant): plan's prediction, for file sizes the
    sources did not print (passed in: plan imports this module). Without it only rows with a printed size."""
    d = published()
    out = []
    for r in d.get("row", []):
        if r.get("ambiguous") or not is_decode(r["test"]) or r["backend"] not in GROUP:
            continue
        bw, nbytes = _bandwidth(r, d.get("bandwidth", {})), _bytes(r, plan_fn)
        if bw and nbytes:
            out.append(Point(r, GROUP[r["backend"]], subclass(r), bw[0], nbytes, bw[1]))
    return out


def subclass(row: dict) -> str:
    """The class a published row is fitted in: a Pi 4's Cortex-A72 runs out of compute before bandwidth, and the
    wide Pro/Max/Ultra chips reach a smaller share of their bandwidth than the base M-series (both seen in the
    leave-one-out errors of one class for each: Pi 4 rows 45-174% over, M1 Max rows 85-168% over)."""
    chip = row.get("chip", "")
    if row["device_class"] == "pi":
        return "pi4" if chip.startswith("BCM2711") else "pi5"
    if row["device_class"] == "apple":
        return "apple-pro" if any(w in chip for w in ("Pro", "Max", "Ultra")) else "apple"
    return row["device_class"]


def efficiency(pts: list[Point], group: str, cls: str) -> float | None:
    same = [p.ratio for p in pts if p.group == group and p.cls == cls]
    return statistics.median(same) if same else None


def leave_one_out(pts: list[Point]) -> list[tuple[Point, float]]:
    """(point, relative error of its prediction from the others of its group and class)."""
    out = []
    for i, p in enumerate(pts):
        rest = [q for j, q in enumerate(pts) if j != i]
        e = efficiency(rest, p.group, p.cls)
        if e is not None:
            out.append((p, e / p.ratio - 1))
    return out


def error_table(loo: list[tuple[Point, float]]) -> dict[tuple[str, str], dict]:
    """Per (group, class): rows, fitted efficiency, median and worst |error|, and bias (mean signed error)."""
    pts = [p for p, _ in loo]
    out = {}
    for key in sorted({(p.group, p.cls) for p in pts}):
        errs = [e for p, e in loo if (p.group, p.cls) == key]
        out[key] = {"n": len(errs), "efficiency": efficiency(pts, *key),
                    "median_abs": statistics.median(abs(e) for e in errs), "worst_abs": max(abs(e) for e in errs),
                    "bias": statistics.mean(errs)}
    return out


def render_error_table(loo: list[tuple[Point, float]]) -> str:
    table = error_table(loo)
    lines = ["| backend | device class | rows | fitted efficiency | median abs. error | worst abs. error | bias |",
             "|---|---|---|---|---|---|---|"]
    allerr = [abs(e) for _, e in loo]
    for (g, c), t in table.items():
        lines.append(f"| {g} | {c} | {t['n']} | {t['efficiency']:.2f} | {t['median_abs']:.0%} | "
                     f"{t['worst_abs']:.0%} | {t['bias']:+.0%} |")
    lines.append(f"| all | all | {len(allerr)} | | {statistics.median(allerr):.0%} | {max(allerr):.0%} | |")
    return "\n".join(lines) + "\n"


def device_class(name: str) -> str | None:
    """A devices.toml profile's class, by its name."""
    if name.startswith("raspberry-pi-4"):
        return "pi4"
    if name.startswith("raspberry-pi-5"):
        return "pi5"
    if name.startswith("apple"):
        return "apple-pro" if any(w in name for w in ("-pro", "-max", "-ultra")) else "apple"
    if name.startswith("x86"):
        return "x86"
    return None


@lru_cache(maxsize=1)
def _table(plan_fn) -> dict:
    return error_table(leave_one_out(points(plan_fn)))


def calibrated(name: str, backend: str = "llama.cpp", plan_fn=None) -> dict | None:
    """The fitted efficiency for a device profile and backend, with its leave-one-out median and worst error;
    None where no published rows of that kind exist. On a Mac llama.cpp runs on Metal."""
    cls = device_class(name)
    if cls is None:
        return None
    group = "mlx" if backend == "mlx-lm" else "metal" if cls.startswith("apple") else "cpu"
    t = _table(plan_fn).get((group, cls))
    if not t:
        return None
    return {"group": group, "class": cls, **t}
