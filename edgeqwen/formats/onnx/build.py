"""The ONNX row's builder (the formats table names it): a checkpoint -> model.onnx, its data and genai_config.json,
written weight by weight by our exporter."""
from __future__ import annotations

from pathlib import Path

from ...checkpoints import Checkpoint
from ...errors import BuildError
from .. import build_hash
from ...home import MANIFEST
from ..steps import BuildRequest, check_disk, check_ram, disk_guard, note, step


def build_onnx(req: BuildRequest, ckpt: Checkpoint, quant: str, name: str, tmp: Path, manifest: dict, log) -> Path:
    """The ONNX row's builder: edgeqwen's own exporter, weight by weight (export.py)."""
    try:
        from . import export as onnx_export  # imports onnx and onnxruntime
    except ImportError as e:
        raise BuildError(f"ONNX builds need {e.name}, which is not installed: pip install -e '.[onnx]'") from None
    check_ram(onnx_export.peak_estimate(ckpt, quant), f"an ONNX {quant} build of {ckpt.path.name}")
    size = onnx_export.output_size(ckpt, quant)
    check_disk(tmp, size)
    note(log, f"writing {quant} ONNX decoder from {ckpt.path}")
    with step(manifest, "export", f"export {quant}", size) as upd:
        info = disk_guard(lambda: onnx_export.export(ckpt, tmp, quant, progress=upd))
    model = tmp / "model.onnx"
    files = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest.update(file="model.onnx", files=files, file_size=info["bytes"])
    manifest.update(sha256=build_hash(tmp, manifest),
                    onnx={"block_size": onnx_export.BLOCK, "accuracy_level": onnx_export.ACCURACY_LEVEL,
                          "symmetric": True, "nodes": info["nodes"]})
    return model
