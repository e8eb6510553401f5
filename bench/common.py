"""What the benchmarks share: where reports and raw data live, `edgeqwen` in a child process, llama.cpp's own
tools, and writing outputs whole (a temporary name, then a rename), so a stopped run never leaves half a table or
half a JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def edgeqwen(*args, echo: bool = False) -> str:
    """`edgeqwen ARGS` in a fresh process (what a user runs); its stdout, or exit with the end of its stderr."""
    p = subprocess.run([sys.executable, "-m", "edgeqwen.cli", *map(str, args)], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"edgeqwen {' '.join(map(str, args))} failed:\n{p.stderr[-2000:]}")
    if echo:
        print(p.stderr, file=sys.stderr, flush=True)
    return p.stdout


def llama_tool(name: str) -> str:
    """A llama.cpp tool built from the sources llama-cpp-python vendors (tools/build-llama-tools.sh, cached)."""
    out = subprocess.run([str(HERE.parent / "tools" / "build-llama-tools.sh")], capture_output=True, text=True,
                         check=True).stdout
    return out.strip().splitlines()[-1] + "/" + name


def write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=1) + "\n")
