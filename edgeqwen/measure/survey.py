"""`edgeqwen survey`: the device kit. One command a Pi, Mac or laptop owner runs to produce this device's evidence.

It picks the standard matrix that fits this machine (plan's min RAM against what is available, the build's disk
against what is free), builds what is missing, and for each build runs `bench` (all cores and half), `fit` where
a memory cgroup is available, and `eval` where the source is real. Everything lands in OUT/<device-id>.jsonl
(rows `table` merges) and OUT/<device-id>.md (this device's table and the claims' verdicts). A state file records
each finished build, so `--resume` after a kill redoes at most the build it was on.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import psutil

SIZES = ("0.5b", "1.5b", "7b")
QUANTS = ("q4_k_m", "q4_0", "q8_0", "int4")
QUICK_QUANTS = ("q4_k_m",)


@dataclass(frozen=True)
class Item:
    size: str
    quant: str
    file_bytes: int = 0
    disk_bytes: int = 0       # what building it needs at its peak (a GGUF passes through f16)
    bytes_per_token: int = 0

    @property
    def key(self) -> str:
        return f"{self.size}/{self.quant}"


def matrix(sizes, quants, ram_available: int, disk_free: int, apple: bool = False) -> tuple[list[Item], list[str]]:
    """The builds this machine can hold, and one line for each it cannot (never half-writes a build)."""
    from ..errors import UsageError
    from .plan import plan
    quants = tuple(quants) + (("mlx4",) if apple and "mlx4" not in quants else ())
    items, skipped = [], []
    for size in sizes:
        for quant in quants:
            try:
                p = plan(size, quant)
            except UsageError as e:
                skipped.append(f"{size} {quant}: {e}")
                continue
            disk = p.file_bytes * (3 if quant.startswith(("q", "int")) else 2)   # a GGUF passes through f16
            if p.min_ram > ram_available:
                skipped.append(f"{size} {quant}: needs {p.min_ram / 2**30:.1f} GiB of RAM, "
                               f"{ram_available / 2**30:.1f} GiB is available")
            elif disk > disk_free:
                skipped.append(f"{size} {quant}: needs ~{disk / 2**30:.1f} GiB of disk to build, "
                               f"{disk_free / 2**30:.1f} GiB is free")
            else:
                items.append(Item(size, quant, p.file_bytes, disk, p.bytes_per_token))
    return items, skipped


# For the up-front estimate only: the share of copy bandwidth decode reaches (these machines' rows: 25-60%),
# prefill against decode, and how fast a build writes. A guess, said as one; the rows are the measurement.
DECODE_EFFICIENCY = 0.4
PREFILL_OVER_DECODE = 8.0
BUILD_BYTES_PER_S = 60e6
GUESSED_BANDWIDTH_GBS = 10.0   # when the quick pass does not measure it


def expected_seconds(items: list[Item], threads: list[int], cfg, bandwidth_gbs: float | None) -> float:
    """A rough duration for the survey: builds at BUILD_BYTES_PER_S, decode at DECODE_EFFICIENCY of the copy
    bandwidth (half of it at half the cores), prefill PREFILL_OVER_DECODE times that."""
    bw = (bandwidth_gbs or GUESSED_BANDWIDTH_GBS) * 1e9
    total = 0.0
    for it in items:
        total += it.disk_bytes / BUILD_BYTES_PER_S
        for t in threads:
            tg = DECODE_EFFICIENCY * bw / max(it.bytes_per_token, 1) * (t / max(threads))
            per_repeat = 2 * cfg.gen_tokens / tg + cfg.prompt_tokens / (PREFILL_OVER_DECODE * tg)
            total += 5 + (cfg.repeats + 1) * per_repeat   # load, warm-up, repeats
    return total


def _state(path: Path) -> dict:
    from ..schemas import read_cache
    state = read_cache(path, "the survey's progress")
    return state if isinstance(state.get("done"), list) else {"done": []}


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def survey(out: Path, sizes=SIZES, quants=None, sources: dict | None = None, synthetic: bool = False,
           quick: bool = False, resume: bool = False, say=print) -> Path:
    """Run the survey; returns the device's markdown file."""
    from ..formats.build import BuildRequest, build
    from ..errors import BuildError, UsageError
    from ..progress import bar
    from ..recipes import get_recipe
    from .bench import BenchConfig, bench
    from .hw import device_label, fingerprint
    sources = sources or {}
    if not synthetic and not sources:
        raise UsageError("survey needs --synthetic or a --source SIZE=DIR per size (the hub needs a network)")
    check_choices(sizes, quants)   # a name the user got wrong stops the survey before anything is written
    out.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(bandwidth=not quick)
    dev = fp["device_id"]
    rows_file, md_file, state_file = out / f"{dev}.jsonl", out / f"{dev}.md", out / f"{dev}.state.json"
    state = _state(state_file) if resume else {"done": []}
    if not resume:
        rows_file.unlink(missing_ok=True)
    quants = tuple(quants or (QUICK_QUANTS if quick else QUANTS))
    items, skipped = matrix(sizes, quants, psutil.virtual_memory().available, shutil.disk_usage(out).free,
                            apple=bool(fp.get("apple")))
    todo = [i for i in items if i.key not in state["done"]]
    cores = fp["physical_cores"] or 1
    threads = [cores] if quick else sorted({cores, max(1, cores // 2)})
    cfg = BenchConfig(prompt_tokens=64, gen_tokens=16, repeats=1) if quick else BenchConfig()
    say(f"{device_label(fp)}\nsurvey: {len(todo)} build(s) to measure"
        + (f", {len(items) - len(todo)} done before" if len(items) > len(todo) else "")
        + f"; threads {','.join(map(str, threads))}; rows -> {rows_file}")
    if todo:
        secs = expected_seconds(todo, threads, cfg, fp.get("bandwidth_gbs"))
        say(f"will run: {', '.join(f'{i.size} {i.quant}' for i in todo)}; expect roughly {secs / 60:.0f} min "
            f"(a guess from plan's bytes per token{'' if fp.get('bandwidth_gbs') else ' and an assumed 10 GB/s'}) "
            f"and up to {max(i.disk_bytes for i in todo) / 2**30:.1f} GiB of free disk at a time, "
            f"{sum(i.file_bytes for i in todo) / 2**30:.1f} GiB kept")
    for line in skipped:
        say(f"skipped {line}")
    fits = False
    if not quick:
        from .memlimit import MemoryCgroup
        try:
            with MemoryCgroup(256 << 20):
                fits = True
        except UsageError:   # no cgroup here (not root, no delegation): fit is skipped, said once
            say("fit skipped: no memory cgroup available (run as root or with a delegated cgroup)")
    with bar("survey", len(todo), unit="build") as upd:
        for n, item in enumerate(todo, 1):
            say(f"[{n}/{len(todo)}] {item.size} {item.quant}: build, bench"   # a log file sees progress too
                + (", fit" if fits else "") + (", eval" if sources.get(item.size) and not quick else ""))
            recipe = get_recipe(item.size)
            src = sources.get(item.size)
            try:
                folder = build(BuildRequest(recipe=recipe, quant=item.quant, source=Path(src) if src else None,
                                            synthetic=src is None), log=None)
            except BuildError as e:   # the build's own preflight (disk, RAM) knows best: skip it, go on
                say(f"skipped {item.size} {item.quant}: {e}")
                upd(1)
                continue
            bench([str(folder)], threads, cfg, fp, out=rows_file)
            if fits:
                from .fit import fit
                row = fit(str(folder), cores, fp)
                with open(rows_file, "a") as f:
                    f.write(json.dumps(row) + "\n")
            if src is not None and not quick:
                _eval(folder, rows_file)
            state["done"].append(item.key)
            _save_state(state_file, state)
            upd(1)
    if not rows_file.exists() or not rows_file.stat().st_size:
        from ..errors import EdgeqwenError
        why = "; ".join(skipped) or "every build was skipped"
        raise EdgeqwenError(f"the survey measured nothing ({why})")
    write_report(rows_file, md_file, fp)
    return md_file


def check_choices(sizes, quants) -> None:
    """Every size names a recipe and every quant a build of it; an empty list is a usage error too."""
    from ..errors import UsageError
    from ..recipes import get_recipe
    if not sizes:
        raise UsageError("--sizes names no size; e.g. --sizes 0.5b,1.5b")
    if quants is not None and not quants:
        raise UsageError("--quants names no quant; e.g. --quants q4_k_m,q8_0")
    for size in sizes:
        recipe = get_recipe(size)
        for quant in quants or QUANTS:
            recipe.resolve_quant(quant)


def _eval(folder: Path, rows_file: Path) -> None:
    from ..home import read_manifest
    from .evalrows import eval_row, resolve_reference
    from .evaluate import evaluate_files, load_text
    m = read_manifest(folder)
    ref = resolve_reference(folder, m, None)
    model = folder / m["file"]
    for label, res in evaluate_files(model, ref, [load_text("en"), load_text("zh")]):
        with open(rows_file, "a") as f:
            f.write(json.dumps(eval_row(str(folder), m, model, ref, label, res)) + "\n")


def write_report(rows_file: Path, md_file: Path, fp: dict) -> None:
    """The device's own table: its rows, its fingerprint, the claims' verdicts."""
    from .claims import judge, load_claims, render_claims
    from .hw import device_label
    from .plan import load_devices, predicted_rss_for_row
    from .table import load_rows, render_quality, render_rows
    rows = load_rows([rows_file]) if rows_file.exists() else []
    devices = load_devices()
    text = [f"# edgeqwen survey: {device_label(fp)}", "",
            f"Device id `{fp['device_id']}`; fingerprint: " + json.dumps(
                {k: fp.get(k) for k in ("cpu", "arch", "isa", "device", "physical_cores", "ram_total", "os",
                                        "emulated", "apple")}), "",
            render_rows(rows, "md", plan_fn=predicted_rss_for_row) if rows else "(no rows)", ""]
    if any(r.get("kind") == "eval" for r in rows):
        text += ["## Quality", "", render_quality(rows), ""]
    text += ["## Claims", "", render_claims([judge(c, rows, devices) for c in load_claims()])]
    tmp = md_file.with_name(md_file.name + ".tmp")
    tmp.write_text("\n".join(text))
    os.replace(tmp, md_file)
