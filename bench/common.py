"""What the benchmark scripts share: llama.cpp's own tools, and writing their outputs whole (a temporary name,
then a rename), so a stopped run never leaves half a table or half a JSON."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


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
