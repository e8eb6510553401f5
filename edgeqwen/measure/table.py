"""Results table: merge bench (and eval) rows from many machines, render md/csv/html, judge claims."""
from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path

from ..errors import UsageError
from ..formats import DEFAULT


def load_rows(files: list[Path]) -> list[dict]:
    """Rows from JSONL files, deduplicated by id (the same row merged twice counts once)."""
    seen, rows = set(), []
    for f in files:
        try:
            lines = Path(f).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise UsageError(f"{f}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError:
            raise UsageError(f"{f}: not a text file of JSON lines") from None
        from ..schemas import check_row
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                raise UsageError(f"{f}:{n}: not a JSON line") from None
            if isinstance(row, dict) and row.get("schema") != 1:
                raise UsageError(f"{f}:{n}: unknown schema {row.get('schema')!r}")
            check_row(row, f"{f}:{n}")
            _check_device_story(row.get("device") or {}, f"{f}:{n}")
            rid = row.get("id") or json.dumps(row, sort_keys=True)
            if rid not in seen:
                seen.add(rid)
                rows.append(row)
    return rows


# What hw reports on each kind of board: a row naming one must come from that architecture (a survey file edited
# to pass an x86 run off as a Pi is refused, not merged).
BOARD_ARCH = {"Raspberry Pi": ("aarch64", "arm64", "armv7l", "armv8l"), "Apple M": ("arm64", "aarch64")}


def _check_device_story(fp: dict, where: str) -> None:
    for board, arches in BOARD_ARCH.items():
        named = board in str(fp.get("device", "")) or str(fp.get("cpu", "")).startswith(board)
        if named and fp.get("arch") not in arches:
            raise UsageError(f"{where}: the row claims a {board} but was measured on {fp.get('arch')!r}; "
                             "hw never reports that, so the row is refused")


def latest_fits(rows: list[dict]) -> list[dict]:
    """`fit` rows, only the newest per device, build name, load mode and speed fraction: rows are appended,
    never rewritten, so a later fit of the same build (e.g. after fit learned to re-measure noise), or of the
    build made again under its name (e.g. by a newer exporter), supersedes."""
    newest: dict[tuple, dict] = {}
    for r in rows:
        if r.get("kind") != "fit":
            continue
        key = (r["device"].get("device_id"), r["build"].get("name") or r["build"].get("sha256"), r["lean"],
               r.get("fraction"))
        if key not in newest or r["time"] > newest[key]["time"]:
            newest[key] = r
    return list(newest.values())


def _gib(b) -> str:
    return f"{b / 2**30:.2f}" if b else "-"


def _ms(x) -> str:
    return f"{x * 1000:.0f}" if x else "-"


def _ts(d) -> str:
    """mean ± sd over the repeats; one run has no spread, so it says n=1 instead of a ± 0.00 it did not measure."""
    if not d or not d.get("n"):
        return "-"
    return f"{d['mean']:.2f} (n=1)" if d["n"] == 1 else f"{d['mean']:.2f} ± {d.get('sd', 0):.2f}"


COLUMNS = ["model", "quant", "backend", "file GiB", "threads", "pp t/s", "tg t/s", "tg@d t/s", "TTFT ms", "load s",
           "peak RSS GiB", "plan RSS GiB", "roofline %", "status"]


def columns_for(rows: list[dict]) -> list[str]:
    """COLUMNS with llama-bench's test names when the rows ran one test shape (pp512, tg128, tg128@d512):
    tg is decode from an empty context, tg@d decode after the prompt (rows older than tg_empty show -)."""
    shapes = {(r.get("prompt_tokens"), r.get("gen_tokens")) for r in rows}
    if len(shapes) != 1 or None in next(iter(shapes)):
        return COLUMNS
    p, g = next(iter(shapes))
    names = {"pp t/s": f"pp{p} t/s", "tg t/s": f"tg{g} t/s", "tg@d t/s": f"tg{g}@d{p} t/s"}
    return [names.get(c, c) for c in COLUMNS]


QUALITY = ["PPL en", "PPL zh", "KL en / zh", "top-1 en / zh"]


def quality_index(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """Latest eval row per build name and text."""
    out: dict[str, dict[str, dict]] = {}
    # a row with a quantized KV cache measured the cache's cost, not the build's: not this table's figure
    for r in sorted((r for r in rows if r.get("kind") == "eval" and r.get("kv", "f16") == "f16"),
                    key=lambda r: r["time"]):
        out.setdefault(r["build"]["name"], {})[r["text"]] = r
    return out


def quality_lookup(rows: list[dict]):
    """build -> its latest eval rows per text: by the file's sha256 (the same file scores the same, whatever the
    build was named where the eval ran), else by the build name."""
    q = quality_index(rows)
    by_sha = {next(iter(per.values()))["build"].get("sha256"): per for per in q.values()}
    by_sha.pop(None, None)
    return lambda build: by_sha.get(build.get("sha256")) or q.get(build["name"], {})


def quality_cells(q: dict[str, dict]) -> list[str]:
    en, zh = q.get("en", {}), q.get("zh", {})

    def pair(key, fmt):
        vals = [fmt(d[key]) if key in d else "-" for d in (en, zh)]
        return " / ".join(vals)
    return [f"{en['ppl']:.3f}" if en else "-", f"{zh['ppl']:.3f}" if zh else "-",
            pair("kl_mean", lambda x: f"{x:.4f}"), pair("top1", lambda x: f"{100 * x:.1f}%")]


def bench_cells(row: dict, plan_rss=None) -> list[str]:
    b = row["build"]
    model = (b.get("recipe") or b["name"]) + (" (synthetic)" if b.get("synthetic") else "")
    ok = row.get("status") == "ok"
    peak = max(row.get("peak_rss_sampled") or 0, row.get("max_rss") or 0) if ok else None
    if row["device"].get("emulated"):   # ran, under an emulator: a correctness result, never a speed
        return [model, b.get("quant") or "-", row.get("backend", "-"), _gib(b.get("file_size")), str(row["threads"]),
                *["emulated"] * 5, "-", "-", "-", _status(row)]
    backend = row.get("backend", "-")
    spec = row.get("speculative")   # speculative decoding: the draft and how often it hit (schemas checked it)
    if spec:
        backend += f" + draft {spec['draft']} ({100 * spec.get('acceptance', 0):.0f}% accepted)"
    if row.get("kv", "f16") != "f16":
        backend += f" (KV {row['kv']})"
    return [model, b.get("quant") or "-", backend, _gib(b.get("file_size")), str(row["threads"]),
            _ts(row.get("pp")) if ok else "-", _ts(row.get("tg_empty")) if ok else "-",
            _ts(row.get("tg")) if ok else "-",
            _ms((row.get("ttft_s") or {}).get("mean")) if ok else "-",
            f"{row['load_s']:.2f}" if ok else "-", _gib(peak) if ok else "-",
            _gib(plan_rss) if plan_rss else "-",
            f"{100 * row['roofline_frac']:.0f}" if ok and row.get("roofline_frac") else "-",
            _status(row)]


def _status(row: dict) -> str:
    s = row.get("status", "?") if row.get("status") == "ok" else f"{row.get('status')}: {row.get('error', '')}"
    notes = [f"in {row['memory_limit'] / 2**30:.2f} GiB limit"] if row.get("memory_limit") else []
    if row["device"].get("emulated"):
        notes.append(f"emulated ({row['device'].get('emulator', '?')}): runs, speed not measured")
    if row.get("workers"):
        notes.append(f"with {len(row['workers'])} RPC worker(s), split {row.get('split') or 'by free memory'}")
    if row.get("lean"):
        notes.append("lean")
    if row.get("busy"):   # measured beside other work: shown, never a verdict (claims.py)
        from .busy import busy_line
        notes.append(f"BUSY: {busy_line(row)}")
    from .hw import throttled
    if throttled(row):
        notes.append("THROTTLED: the firmware capped the clock during the run")
    return s + (f" ({', '.join(notes)})" if notes else "")


def _sort_key(row):
    b = row["build"]
    return (b.get("recipe") or "", b.get("quant") or "", row.get("backend", ""), row["threads"])


def group_by_device(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("kind") == "bench":
            out.setdefault(r["device"].get("device_id") or "unknown device", []).append(r)
    return out


def device_title(fp: dict) -> str:
    from .hw import device_label
    isa = " ".join(fp.get("isa") or []) or "-"
    bw = f", {fp['bandwidth_gbs']} GB/s measured copy bandwidth" if fp.get("bandwidth_gbs") else ""
    return f"{device_label(fp)} ({fp.get('arch')}; {isa}{bw})"


def render_rows(rows: list[dict], fmt: str = "md", plan_fn=None) -> str:
    """The table for these rows, grouped by device; plan_fn(row) -> predicted RSS bytes or None.

    Quality columns appear when eval rows exist, joined on the build file's sha256 (the same file scores the
    same, whatever its build was named on the machine that ran the eval), else on the build name.
    """
    groups = group_by_device(rows)
    quality = quality_index(rows)
    quality_of = quality_lookup(rows)
    extra = QUALITY if quality else []
    columns = columns_for([r for rs in groups.values() for r in rs]) + extra

    def cells_of(r):
        c = bench_cells(r, plan_fn(r) if plan_fn else None)
        if not quality:
            return c
        return c + quality_cells(quality_of(r["build"]))
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["device"] + columns)
        for rs in groups.values():
            label = device_title(rs[0]["device"])
            for r in sorted(rs, key=_sort_key):
                w.writerow([label] + cells_of(r))
        return buf.getvalue()
    parts = []
    for rs in groups.values():
        cells = [cells_of(r) for r in sorted(rs, key=_sort_key)]
        title = device_title(rs[0]["device"])
        if fmt == "html":
            head = "".join(f"<th>{html.escape(c)}</th>" for c in columns_for(rs) + extra)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells)
            parts.append(f"<h3>{html.escape(title)}</h3>\n<table><tr>{head}</tr>{body}</table>")
        elif fmt == "md":
            cols = columns_for(rs) + extra
            lines = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(c) + " |" for c in cells]
            parts.append("\n".join(lines))
        else:
            raise UsageError(f"unknown format {fmt!r}; choose md, csv or html")
    if quality:
        parts.append(render_quality(rows, fmt))
    return "\n\n".join(parts) + "\n"


def render_quality(rows: list[dict], fmt: str = "md") -> str:
    """Every build's latest eval per text, bench rows or not: one line per build, a group of columns per
    text, least KL first so the ordering of quants can be read down the table."""
    q = quality_index(rows)
    texts = sorted({t for per in q.values() for t in per}, key=lambda t: (t not in ("en", "zh"), t))
    sizes = {r["build"]["name"]: r["build"].get("file_size") for r in rows if r.get("kind") == "bench"}
    head = ["build", "format", "file MiB", "reference"] + [c for t in texts for c in (f"PPL {t} (ref)", f"KL {t} (p99)",
                                                                          f"top-1 {t}")]

    def mean_kl(per):
        kls = [r["kl_mean"] for r in per.values() if "kl_mean" in r]
        return sum(kls) / len(kls) if kls else float("inf")
    body = []
    for name, per in sorted(q.items(), key=lambda kv: (mean_kl(kv[1]), kv[0])):
        b = next(iter(per.values()))["build"]
        size = b.get("file_size") or sizes.get(name)
        ref = next((r["reference"] for r in per.values() if r.get("reference")), None)
        row = [name + (" (synthetic)" if b.get("synthetic") else ""), b.get("format") or DEFAULT.name,
               f"{size / 2**20:.0f}" if size else "-", Path(ref).parent.name if ref else "-"]
        for t in texts:
            r = per.get(t)
            if r is None:
                row += ["-", "-", "-"]
                continue
            rp = f" ({r['ref_ppl']:.3f})" if "ref_ppl" in r else ""
            kl = f"{r['kl_mean']:.4f} ({r['kl_p99']:.3f})" if "kl_mean" in r else "-"
            row += [f"{r['ppl']:.3f}{rp}", kl, f"{100 * r['top1']:.1f}%" if "top1" in r else "-"]
        body.append(row)
    if fmt == "csv":
        return "\n".join(",".join(x) for x in [head] + body)
    if fmt == "html":
        return "<h3>Quality</h3><table>" + "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in [head] + body) + "</table>"
    scored = sorted({f"{t} {r['tokens_scored']}" for per in q.values() for t, r in per.items() if "tokens_scored" in r})
    return "\n".join(["### Quality (eval rows)", "",
                      f"Tokens scored per text: {', '.join(scored)}. KL is KL(reference || build) in nats per token.",
                      "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(row) + " |" for row in body])


def plot(rows: list[dict], out: Path) -> None:
    """Decode tok/s against peak RSS: one panel per model size (each with its own memory axis), colour per
    quant, marker per backend and device, and a legend instead of per-point labels."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install matplotlib") from None
    ok = [r for r in rows if r.get("kind", "bench") == "bench" and r.get("status") == "ok"
          and not r["device"].get("emulated")]
    if not ok:
        raise UsageError("--plot: no successful bench rows to plot (emulated rows have no speed)")
    sizes = sorted({r["build"].get("size") or r["build"]["name"] for r in ok}, key=_size_order)
    quants = sorted({r["build"].get("quant") or "?" for r in ok})
    series = sorted({(r.get("backend") or r["build"].get("format", DEFAULT.name), r["device"].get("cpu", "?")[:32])
                     for r in ok})
    colours = {q: plt.get_cmap("tab20")(i % 20) for i, q in enumerate(quants)}
    markers = {s: "osD^v<>Px*"[i % 10] for i, s in enumerate(series)}
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes) + 2.8, 4.6), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for r in (r for r in ok if (r["build"].get("size") or r["build"]["name"]) == size):
            x = max(r.get("peak_rss_sampled") or 0, r.get("max_rss") or 0) / 2**30
            key = (r.get("backend") or r["build"].get("format", DEFAULT.name), r["device"].get("cpu", "?")[:32])
            ax.scatter(x, r["tg"]["mean"], color=colours[r["build"].get("quant") or "?"], marker=markers[key], s=36,
                       edgecolors="black", linewidths=0.4, alpha=0.85)
        ax.set_title(f"{size}")
        ax.set_xlabel("peak RSS (GiB)")
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
    axes[0][0].set_ylabel("decode tok/s")
    handles = [Line2D([], [], linestyle="", marker="s", color=colours[q], label=q) for q in quants]
    handles += [Line2D([], [], linestyle="", marker=markers[s], color="grey", markeredgecolor="black",
                       label=f"{s[0]} · {s[1]}") for s in series]
    fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
    fig.suptitle("edgeqwen: decode speed against peak memory")
    fig.tight_layout(rect=(0, 0, 1 - 2.6 / (4.2 * len(sizes) + 2.8), 1))
    out = Path(out)
    if not out.parent.is_dir():
        raise UsageError(f"--plot {out}: the folder {out.parent} does not exist")
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)


def fit_plot(rows: list[dict], out: Path, sizes: tuple[str, ...] = ("1.5b", "7b")) -> bool:
    """Decode tok/s against the memory limit, from `fit` rows' probes: one panel per size, colour per quant,
    solid for normal loads and dashed for lean, hollow markers for probes below 90% of unlimited speed and
    crosses on the axis for those that were OOM-killed or did not finish. False when there is nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fits = [r for r in latest_fits(rows) if not r["device"].get("emulated")
            and (r["build"].get("size") or "").lower() in sizes]
    shown = [s for s in sizes if any(r["build"]["size"].lower() == s for r in fits)]
    if not shown:
        return False
    quants = sorted({r["build"].get("quant") or "?" for r in fits})
    colours = {q: plt.get_cmap("tab10")(i % 10) for i, q in enumerate(quants)}
    fig, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 4.6), squeeze=False)
    for ax, size in zip(axes[0], shown):
        for r in sorted((r for r in fits if r["build"]["size"].lower() == size), key=lambda r: r["time"]):
            q, c = r["build"].get("quant") or "?", colours[r["build"].get("quant") or "?"]
            style = "--" if r["lean"] else "-"
            probes = sorted(r["probes"], key=lambda p: p["limit"])
            pts = [(p["limit"] / 2**30, p["tg"] or 0.0, p["pass"]) for p in probes]
            ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], style, color=c, alpha=0.7,
                    label=f"{q}{' lean' if r['lean'] else ''}: min {r['min_ram'] / 2**30:.2f} GiB")
            for x, y, ok in pts:
                ax.plot(x, y, "x" if not y else "o", color=c, markerfacecolor=c if ok else "white", markersize=6)
            ax.axvline(r["min_ram"] / 2**30, color=c, linestyle=style, linewidth=0.6, alpha=0.5)
        cpus = sorted({r["device"].get("cpu", "?")[:40] for r in fits if r["build"]["size"].lower() == size})
        ax.set_title(f"{size} ({'; '.join(cpus)})", fontsize=9)
        ax.set_xlabel("memory limit (GiB)")
        ax.set_ylabel("decode tok/s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("edgeqwen fit: decode speed against the memory limit (filled: >= 90% of unlimited)")
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return True


def _size_order(s: str) -> float:
    try:
        return float(str(s).lower().rstrip("b"))
    except ValueError:
        return 1e9
