"""The smoke check: load a model and generate a few tokens in a child process (python -m edgeqwen.formats.load
smoke), so a crash in ggml or onnxruntime becomes one clear error instead of ending the caller."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from ..errors import BuildError
from . import detect


IN_CHILD = "EDGEQWEN_IN_CHILD_CHECK"   # set in the smoke/probe child: it must not probe again


def smoke_check(model: Path, threads: int | None = None, tokens: int = 8, timeout: float = 1800) -> dict:
    import os
    cmd = [sys.executable, "-m", "edgeqwen.formats.load", "smoke", str(model), str(threads or 0), str(tokens)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, IN_CHILD: "1"}, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BuildError(f"{model}: the check did not finish in {timeout:.0f} s") from None
    if p.returncode < 0:
        sig = signal.Signals(-p.returncode).name
        fmt = detect(model)
        if fmt.crash_hint:   # an engine whose crashes have known causes says them
            raise BuildError(fmt.load("crash_hint")(sig, model))
        raise BuildError(f"{fmt.engine} crashed ({sig}) running {model}")
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("Error: ")
        raise BuildError(f"smoke check failed for {model}: {last}")
    try:
        result = json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise BuildError(f"smoke check of {model} printed no result") from None
    if result["tokens"] < 1:
        raise BuildError(f"smoke check: {model} generated no tokens")
    return result
