"""`edgeqwen info`: a build's manifest, its files, plan's prediction and the result rows measured on it."""
from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ..formats import of_manifest
from ..home import resolve_build


def info(build: str, row_files: list[Path] = ()) -> dict:
    from .table import load_rows
    path, manifest = resolve_build(build)
    if manifest is None:
        raise UsageError(f"{path} has no manifest; info needs a build folder or name")
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()} if path.is_dir() else {}
    out = {"path": str(path), "manifest": manifest, "files": files,
           "disk_bytes": sum(files.values())}
    fmt = of_manifest(manifest)
    size = (manifest.get("recipe") or {}).get("size")
    if fmt and size:
        from .plan import plan
        try:
            p = plan(size, manifest["quant"], config=manifest.get("config"))
            out["plan"] = {"file_bytes": p.file_bytes, "peak_ram_bytes": p.peak_ram, "ctx": p.ctx}
        except UsageError:
            pass
    rows = load_rows(list(row_files)) if row_files else []
    out["rows"] = [r for r in rows if (r.get("build") or {}).get("sha256") == manifest.get("sha256")]
    return out
