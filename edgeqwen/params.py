"""Argument types with their ranges, shared by every command (checked by click, at the boundary, once)."""
from __future__ import annotations

import math
import os

import click


class Finite(click.FloatRange):
    """A float in a range that is also finite (click's FloatRange lets NaN through: every comparison is False)."""

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v


MAX_THREADS = 4 * (os.cpu_count() or 1)
THREADS = click.IntRange(1, MAX_THREADS)
CTX = click.IntRange(16, 1 << 20)               # and at most the model's own, checked when it loads
MAX_TOKENS = click.IntRange(1, 1 << 20)
TEMPERATURE = Finite(0.0, 100.0)
TOP_P = Finite(0.0, 1.0, min_open=True)
