"""The one progress display: a tqdm bar on stderr when it is a terminal, silence otherwise.

Every long step (hashing, synthetic weights, convert, quantize, ONNX export, eval windows, bench
repeats) goes through `bar`; tqdm ends its line when the bar closes, so the next message starts clean.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager


@contextmanager
def bar(label: str, total: float | None, unit: str = "B"):
    """with bar("convert", nbytes) as update: update(n) ..."""
    from tqdm.auto import tqdm
    byte = unit == "B"
    t = tqdm(total=total, desc=label, unit=unit, unit_scale=byte, unit_divisor=1024 if byte else 1000,
             file=sys.stderr, disable=not _interactive(), leave=True, dynamic_ncols=True)
    try:
        yield t.update
    finally:
        t.close()


def _interactive() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
