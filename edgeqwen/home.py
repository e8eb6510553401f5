"""Where edgeqwen keeps things: EDGEQWEN_HOME, or the platform's user cache directory."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from .errors import UsageError

MANIFEST = "manifest.json"
TMP_MARK = ".tmp-"


def home() -> Path:
    if env := os.environ.get("EDGEQWEN_HOME"):
        return Path(env).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "edgeqwen"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgeqwen"


def builds_dir() -> Path:
    return home() / "builds"


def checkpoints_dir() -> Path:
    return home() / "checkpoints"


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest, or None if it has none; a manifest that is there but malformed is a UsageError."""
    p = folder / MANIFEST
    if not p.is_file():
        return None
    from .schemas import read_json
    data = read_json(p, "the build's manifest", error=UsageError)
    if isinstance(data, dict) and data.get("synthetic") is True and "file" not in data:
        return data   # a synthetic checkpoint's own small manifest
    from .schemas import check_manifest
    return check_manifest(data, str(p))


def list_builds() -> list[tuple[Path, dict]]:
    d = builds_dir()
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.iterdir()):
        if TMP_MARK in p.name:
            continue
        try:
            m = read_manifest(p)
        except UsageError:   # a broken folder is not a build; `verify` and `info` name it
            continue
        if m is not None:
            out.append((p, m))
    return out


def resolve_build(arg: str) -> tuple[Path, dict | None]:
    """BUILD argument -> (model file or folder, manifest). A folder, a .gguf file, or a build name."""
    p = Path(arg).expanduser()
    if p.is_dir():
        m = read_manifest(p)
        if m is None:
            raise UsageError(f"{p} has no {MANIFEST}; not an edgeqwen build folder")
        return p, m
    if p.is_file():  # a model file: its folder's manifest only if it describes this file
        m = read_manifest(p.parent)
        return p, m if m and m.get("file") == p.name else None
    cand = builds_dir() / arg
    if TMP_MARK not in arg and (m := read_manifest(cand)) is not None:
        return cand, m
    names = [b.name for b, _ in list_builds()]
    listing = ", ".join(names) if names else "none yet; run 'edgeqwen build SIZE QUANT'"
    raise UsageError(f"no build named {arg!r}; builds: {listing}")


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + TMP_MARK + str(os.getpid()))
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def clean_stale(parent: Path) -> None:
    """Remove temporaries left by builds that were killed (their pid is gone)."""
    import psutil
    if not parent.is_dir():
        return
    for p in parent.iterdir():
        if TMP_MARK in p.name:
            pid = p.name.rsplit(TMP_MARK, 1)[1]
            if not (pid.isdigit() and psutil.pid_exists(int(pid)) and int(pid) != os.getpid()):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
