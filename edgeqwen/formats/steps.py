"""What every format's builder uses: the request, the disk and RAM checks, and one `step` (timer, peak memory, progress
bar, and the manifest's record of them). build.py runs the builders; they import from here, never from it."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..checkpoints import Checkpoint
from ..errors import BuildError, UsageError
from ..process import PeakRSS, Timer, human_bytes
from ..progress import bar
from ..recipes import Recipe

# Bits per weight by quant, for the disk preflight (upper bounds; exact size is known only after).
_BPW = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q6_k": 6.6, "q5_k_m": 5.7, "q5_k_s": 5.6, "q5_0": 5.5,
        "q5_1": 6, "q4_k_m": 4.9, "q4_k_s": 4.6, "q4_0": 4.6, "q4_1": 5, "iq4_nl": 4.6, "iq4_xs": 4.3}


@dataclass
class BuildRequest:
    recipe: Recipe
    quant: str
    source: Path | None = None         # a local Hugging Face folder
    synthetic: bool = False
    seed: int = 0
    tokenizer: Path | None = None      # for --synthetic: a folder with tokenizer.json
    out: Path | None = None
    name: str | None = None
    force: bool = False
    threads: int | None = None
    keep_intermediate: bool = False
    smoke: bool = True
    format: str | None = None          # a formats-table row's name; by default the quant name decides
    group_size: int | None = None      # MLX quantization groups (default 64)
    role: str | None = None            # "reference": made by eval, and `gc` may remove it once unused


def note(log: Callable[[str], None] | None, msg: str) -> None:
    """A build's progress message, to the caller's log (None: silent)."""
    if log:
        log(msg)


@contextlib.contextmanager
def step(manifest: dict, key: str, label: str, total: int):
    """One timed step of a build: yields the progress bar's update function; records the step's seconds and peak
    RSS in the manifest under key."""
    with Timer() as t, PeakRSS() as rss, bar(label, total) as upd:
        yield upd
    manifest["timings_s"][key] = round(t.seconds, 2)
    manifest["peak_rss_bytes"][key] = rss.peak


def available_ram() -> int:
    """Memory a build may use: EDGEQWEN_RAM_BUDGET (e.g. 8G) if set, else what the OS says is available."""
    import psutil
    budget = os.environ.get("EDGEQWEN_RAM_BUDGET")
    if budget:
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
        b = budget.strip().upper().removesuffix("B")
        try:
            return int(float(b[:-1]) * units[b[-1]]) if b and b[-1] in units else int(b)
        except ValueError:
            raise UsageError(f"EDGEQWEN_RAM_BUDGET={budget!r}: give bytes or a size such as 8G") from None
    return psutil.virtual_memory().available


def check_ram(need: int, what: str) -> None:
    have = available_ram()
    if need > have:
        raise BuildError(f"{what} needs about {human_bytes(need)} of RAM; {human_bytes(have)} is available")


def estimate_bytes(ckpt: Checkpoint, quant: str) -> int:
    n = sum(t.n_elements for t in ckpt.tensors.values())
    return int(n * _BPW.get(quant, 8.5) / 8) + (16 << 20)


def check_disk(path: Path, need: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.environ.get("EDGEQWEN_SKIP_DISK_CHECK"):  # for filesystems that misreport free space
        return
    free = shutil.disk_usage(path).free
    if free < need * 1.05:
        raise BuildError(f"not enough disk space at {path}: need {human_bytes(need)}, {human_bytes(free)} free")


def disk_guard(fn):
    try:
        return fn()
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise BuildError(f"disk full while writing ({e.strerror}); the partial build was removed") from None
        raise
