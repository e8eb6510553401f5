"""The GGUF row's builder (the formats table names it): a checkpoint -> model.gguf in the build's folder."""
from __future__ import annotations

from pathlib import Path

from ...checkpoints import Checkpoint
from ...process import sha256_file
from ..steps import BuildRequest, check_disk, disk_guard, estimate_bytes, note, step
from .convert import OUT_TYPES, convert, output_size


def build_gguf(req: BuildRequest, ckpt: Checkpoint, quant: str, name: str, tmp: Path, manifest: dict, log) -> Path:
    """The GGUF row's builder: our converter to f16 (or straight to f32/f16/bf16), then libllama's quantizer."""
    direct = quant in OUT_TYPES
    conv_type = quant if direct else "f16"
    need = output_size(ckpt, conv_type) + (0 if direct else estimate_bytes(ckpt, quant))
    check_disk(tmp, need)

    conv_out = tmp / ("model.gguf" if direct else "model-f16.gguf")
    note(log, f"converting {ckpt.path} -> {conv_type} GGUF")
    with step(manifest, "convert", "convert", output_size(ckpt, conv_type)) as upd:
        disk_guard(lambda: convert(ckpt, conv_out, conv_type, name=name, progress=upd))
    if not direct:
        from .quantize import quantize
        note(log, f"quantizing to {quant} ({req.threads or 'all'} threads)")
        with step(manifest, "quantize", f"quantize {quant}", estimate_bytes(ckpt, quant)) as upd:
            disk_guard(lambda: quantize(conv_out, tmp / "model.gguf", quant, req.threads, upd))
        if req.keep_intermediate:
            conv_out.rename(tmp / "model-f16.gguf")
        else:
            conv_out.unlink()
    model = tmp / "model.gguf"
    manifest.update(file="model.gguf", file_size=model.stat().st_size, sha256=sha256_file(model))
    return model
