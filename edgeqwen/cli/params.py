"""Argument types with their ranges, shared by every command (checked by click, at the boundary, once)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import click

from ..process import MAX_THREADS


class Finite(click.FloatRange):
    """A float in a range that is also finite (click's FloatRange lets NaN through: every comparison is False)."""

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v


THREADS = click.IntRange(1, MAX_THREADS)
CTX = click.IntRange(16, 1 << 20)               # and at most the model's own, checked when it loads
MAX_TOKENS = click.IntRange(1, 1 << 20)
TEMPERATURE = Finite(0.0, 100.0)
TOP_P = Finite(0.0, 1.0, min_open=True)


class OutFile(click.Path):
    """A file a command appends rows to (or writes), checked before the work starts: not a folder, in a folder that
    exists, and writable (a fit or bench that ran for minutes must not fail at its first write)."""

    def __init__(self):
        super().__init__(dir_okay=False, path_type=Path)

    def convert(self, value, param, ctx):
        p = super().convert(value, param, ctx)
        parent = p.parent if str(p.parent) else Path(".")
        if p.is_dir():
            self.fail(f"{p} is a folder; give a file", param, ctx)
        if parent.exists() and not parent.is_dir():
            self.fail(f"{parent} is not a folder", param, ctx)
        if not parent.is_dir():
            self.fail(f"the folder {parent} does not exist", param, ctx)
        if not os.access(p if p.exists() else parent, os.W_OK):
            self.fail(f"{p} is not writable", param, ctx)
        return p


OUT_FILE = OutFile()


class OutDir(click.Path):
    """A folder a command writes into, made if missing: named (an empty path would quietly be the current
    folder), not a file, and writable where it is or would be made; checked before the work starts."""

    def __init__(self):
        super().__init__(file_okay=False, path_type=Path)

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("is empty; name a folder", param, ctx)
        p = super().convert(value, param, ctx)
        there = p
        while not there.exists() and there != there.parent:
            there = there.parent
        if not there.is_dir():
            self.fail(f"{there} is not a folder", param, ctx)
        if not os.access(there, os.W_OK):
            self.fail(f"{there} is not writable", param, ctx)
        return p


OUT_DIR = OutDir()
SPEED_FRACTION = Finite(0.1, 1.0)
