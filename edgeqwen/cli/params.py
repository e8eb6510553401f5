"""Argument types with their ranges, and the options several commands share (checked by click, at the boundary,
once)."""
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


# --- options shared by several commands ---------------------------------------------------------------

def device_options(f):
    """--lean, --workers, --split and speculative decoding, shared by run, chat and serve (bench has its own)."""
    f = speculative_options(f)
    f = KV_OPTION(f)
    f = tune_options(f)
    f = click.option("--split", help="Shares of the layers, this machine first, then each worker (e.g. 1,1,1). "
                     "Default: every layer on the workers, by their free memory.")(f)
    f = click.option("--workers", help="llama.cpp RPC workers to spread the model over: HOST:PORT,... "
                     "(see `edgeqwen worker`).")(f)
    f = click.option("--lean", is_flag=True, help="Load without repacked/prepacked weight copies (less RAM, "
                     "maybe slower).")(f)
    return f


KV_OPTION = click.option("--kv", type=click.Choice(["f16", "q8_0"]),
                         help="KV cache type (GGUF): q8_0 halves its memory at a small quality cost (README). "
                         "Default: f16, or what `edgeqwen tune` chose.")


def tune_options(f):
    """--flash-attn and --no-tune: run, chat, serve and bench (a setting given explicitly always wins)."""
    f = click.option("--no-tune", is_flag=True, help="Ignore `edgeqwen tune`'s stored settings for this "
                     "machine and build: llama.cpp's defaults.")(f)
    f = click.option("--flash-attn", type=click.Choice(["on", "off"]),
                     help="Flash attention (GGUF). Default: on, or what `edgeqwen tune` chose.")(f)
    return f


def speculative_options(f):
    """--draft, --lookup and --draft-max: run, chat, serve and bench."""
    f = click.option("--draft-max", type=click.IntRange(1, 32), default=8, show_default=True,
                     help="Most tokens drafted at once (the length adapts to how many are accepted).")(f)
    f = click.option("--lookup", is_flag=True, help="Draft from n-grams already in the prompt and answer (no "
                     "second model): faster on code edits, summaries and quoting answers; same output.")(f)
    f = click.option("--draft", metavar="BUILD", help="Speculative decoding: a smaller GGUF build with the same "
                     "tokenizer drafts, BUILD verifies several tokens per pass; the output is BUILD's own.")(f)
    return f


def draft_of(draft, lookup) -> str | None:
    from ..errors import UsageError
    if draft and lookup:
        raise UsageError("--draft and --lookup exclude each other: choose one way to draft")
    if draft is not None and draft.strip().lower() == "lookup":
        raise UsageError("--draft lookup: use --lookup")
    return "lookup" if lookup else draft


def load_options(threads, ctx, lean, workers, split, draft=None, lookup=False, draft_max=8, kv=None,
                 flash_attn=None):
    """The device flags of run, chat, serve and bench as one LoadOptions (checked here, once)."""
    from ..formats.gguf.rpc import parse_split, parse_workers
    from ..formats.load import LoadOptions
    eps = parse_workers(workers)
    split = parse_split(split, len(eps))
    return LoadOptions(threads=threads, n_ctx=ctx, lean=lean, workers=tuple(eps) or None,
                       split=tuple(split) if split else None, draft=draft_of(draft, lookup), draft_max=draft_max,
                       kv=kv, flash_attn=None if flash_attn is None else flash_attn == "on")


def tuned(build, options, no_tune: bool):
    """options with tune's stored settings for BUILD filled in, unless --no-tune."""
    if no_tune:
        return options
    from ..measure.tuned import with_tuned
    return with_tuned(build, options)[0]
