"""Eval bookkeeping: find or build the reference, and shape result rows for the results JSONL."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

from ..errors import UsageError
from ..home import list_builds, read_manifest, resolve_build

SCHEMA = 1


def resolve_reference(path: Path, manifest: dict | None, reference: str | None, log=None) -> Path | None:
    """The reference model file: given, else the f16 GGUF (fp32 ONNX for ONNX builds) of the same source,
    built if missing."""
    from ..formats.build import BuildRequest, build
    from ..formats import model_path, of_manifest
    from ..recipes import get_recipe
    if reference:
        ref = Path(reference)
        if ref.is_dir() and (ref / "config.json").exists() and read_manifest(ref) is None:
            # a Hugging Face folder: its f16 GGUF (fp32 ONNX for an ONNX build)
            if not manifest:
                raise UsageError("a Hugging Face reference needs a build with a manifest")
            q = of_manifest(manifest).reference_quant
            req = BuildRequest(recipe=get_recipe(manifest["recipe"]["name"]), quant=q, source=ref,
                               name=f"{manifest['recipe']['name']}-{q}-ref-{ref.name}", role="reference")
            return _model_file(build(req, log=log))
        rpath, rman = resolve_build(reference)
        return model_path(rpath, rman)
    if not manifest:
        raise UsageError("no manifest next to this model: pass --reference")
    ref_quant = of_manifest(manifest).reference_quant
    if manifest.get("quant") == ref_quant:
        return path / manifest["file"]
    src = manifest.get("source", {})
    for p, m in list_builds():
        if m.get("quant") == ref_quant and m.get("source", {}).get("id") == src.get("id"):
            return p / m["file"]
    if log:
        log(f"no {ref_quant} build of {src.get('id')} yet: building one as the reference")
    recipe = get_recipe(manifest["recipe"]["name"])
    req = BuildRequest(recipe=recipe, quant=ref_quant, synthetic=src.get("kind") == "synthetic",
                       seed=src.get("seed", 0), source=Path(src["path"]) if src.get("kind") == "local" else None,
                       name=f"{manifest['name'].rsplit('-' + manifest['quant'], 1)[0]}-{ref_quant}", role="reference")
    return _model_file(build(req, log=log))


def _model_file(folder: Path) -> Path:
    return folder / read_manifest(folder)["file"]


def eval_row(build: str, manifest: dict | None, model: Path, ref: Path | None, text: str, res: dict) -> dict:
    from ..formats import DEFAULT
    from .hw import fingerprint
    m = manifest or {}
    row = {"schema": SCHEMA, "kind": "eval", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "device": fingerprint(bandwidth=False),
           "build": {"name": m.get("name", model.stem), "quant": m.get("quant"),
                     "format": m.get("format", DEFAULT.name),
                     "recipe": (m.get("recipe") or {}).get("name"), "size": (m.get("recipe") or {}).get("size"),
                     "synthetic": bool(m.get("synthetic")), "sha256": m.get("sha256"),
                     "file_size": m.get("file_size")},
           "reference": str(ref) if ref else None, "text": text, **res}
    row["id"] = hashlib.sha256(f"{row['build']['sha256']}|{text}|{res['ctx']}|{row['time']}".encode()).hexdigest()[:16]
    return row
