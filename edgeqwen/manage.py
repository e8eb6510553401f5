"""Managing builds on disk: info, verify (and the cached check every load makes), rm, gc.

A build's manifest records the sha256 of its model file(s). Hashing a 4 GB file takes seconds, so
each successful check is remembered by (size, mtime) in EDGEQWEN_HOME/verified.json and a load
re-hashes only when those changed; `edgeqwen verify` always re-hashes.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError, UsageError
from .formats import build_hash, hashed_paths
from .home import TMP_MARK, builds_dir, checkpoints_dir, home, list_builds, resolve_build, write_json_atomic

_log = logging.getLogger("edgeqwen")


def _cache_file() -> Path:
    return home() / "verified.json"


def _stamp(folder: Path, manifest: dict) -> list:
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in hashed_paths(folder, manifest)]


def _read_cache() -> dict:
    from .schemas import read_cache
    return read_cache(_cache_file(), "the verified-builds cache")


def remember_verified(folder: Path, manifest: dict) -> None:
    """Record that folder's files match its manifest as they are now (called after a build and a verify)."""
    try:
        cache = _read_cache()
        cache[str(folder.resolve())] = {"sha256": manifest["sha256"], "files": _stamp(folder, manifest)}
        _cache_file().parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(_cache_file(), cache)
    except OSError:  # a read-only cache only costs a re-hash next time
        pass


def verify(folder: Path, manifest: dict, force: bool = True) -> str:
    """Re-hash a build's files against its manifest; a mismatch is a BuildError naming the file."""
    if not manifest.get("sha256"):
        raise BuildError(f"{folder}: the manifest records no sha256; nothing to verify against")
    paths = hashed_paths(folder, manifest)
    for p in paths:
        if not p.is_file():
            raise BuildError(f"{p}: missing; the build is incomplete (rebuild it with --force)")
    if not force:
        entry = _read_cache().get(str(folder.resolve()))
        if entry and entry.get("sha256") == manifest["sha256"] and entry.get("files") == _stamp(folder, manifest):
            return manifest["sha256"]
    from .progress import bar
    total = sum(p.stat().st_size for p in paths)
    with bar(f"verify {folder.name}", total) as upd:
        got = build_hash(folder, manifest, upd)
    if got != manifest["sha256"]:
        which = ", ".join(map(str, paths))
        raise BuildError(f"{which} does not match its manifest's sha256 (corrupted or changed since it was built); "
                         "rebuild with --force")
    remember_verified(folder, manifest)
    return got


def check_build(path: Path, manifest: dict | None) -> None:
    """The check every load makes: re-hash only when size or mtime changed since the last good check."""
    if manifest and manifest.get("sha256") and path.is_dir():
        verify(path, manifest, force=False)


# --- rm and gc ------------------------------------------------------------------------------------

def _inside(p: Path, parent: Path) -> bool:
    try:
        p.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def remove(names: list[str]) -> list[Path]:
    """Remove builds by name (only folders inside the builds folder); all names are checked first."""
    targets = []
    for n in names:
        path, manifest = resolve_build(n)
        if not (path.is_dir() and manifest is not None and _inside(path, builds_dir())
                and path.resolve() != builds_dir().resolve()):
            raise UsageError(f"{n}: not a build in {builds_dir()}; edgeqwen rm only removes its own builds")
        targets.append(path)
    for p in targets:
        shutil.rmtree(p)
    return targets


@dataclass
class Garbage:
    path: Path
    bytes: int
    why: str


def _du(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def garbage() -> list[Garbage]:
    """What no build needs: synthetic checkpoints no build was made from, reference builds (made by eval)
    whose source has no other build, and temporaries left by killed builds."""
    builds = list_builds()
    used_sources = {str(Path(m.get("source", {}).get("path", "")).resolve())
                    for _, m in builds if m.get("source", {}).get("path")}
    out = []
    ck = checkpoints_dir()
    if ck.is_dir():
        for p in sorted(ck.iterdir()):
            if TMP_MARK in p.name:
                out.append(Garbage(p, _du(p), "left by an interrupted run"))
            elif p.is_dir() and str(p.resolve()) not in used_sources:
                out.append(Garbage(p, _du(p), "checkpoint no build uses"))
    ids_with_builds = {m.get("source", {}).get("id") for _, m in builds if m.get("role") != "reference"}
    for p, m in builds:
        if m.get("role") == "reference" and m.get("source", {}).get("id") not in ids_with_builds:
            out.append(Garbage(p, _du(p), f"reference for {m.get('source', {}).get('id')}, which has no other build"))
    bd = builds_dir()
    if bd.is_dir():
        out += [Garbage(p, _du(p), "left by an interrupted build") for p in sorted(bd.iterdir()) if TMP_MARK in p.name
                and not _alive(p)]
    return out


def _alive(p: Path) -> bool:
    import psutil
    pid = p.name.rsplit(TMP_MARK, 1)[1]
    return pid.isdigit() and int(pid) != os.getpid() and psutil.pid_exists(int(pid))


def collect(items: list[Garbage]) -> int:
    freed = 0
    for g in items:
        freed += g.bytes
        shutil.rmtree(g.path, ignore_errors=True) if g.path.is_dir() else g.path.unlink(missing_ok=True)
        _log.debug("removed %s", g.path)
    return freed
