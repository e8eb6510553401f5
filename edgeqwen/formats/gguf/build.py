"""The GGUF row's builder (the formats table names it): a checkpoint -> model.gguf in the build's folder."""
from __future__ import annotations

from pathlib import Path

from ...build import BuildRequest, disk_guard, check_disk, estimate_bytes, say
from ...checkpoint import Checkpoint
from ...process import PeakRSS, Timer, sha256_file
from ...progress import bar
from .convert import OUT_TYPES, convert, output_size


def build_gguf(req: BuildRequest, ckpt: Checkpoint, quant: str, name: str, tmp: Path, manifest: dict, log) -> Path:
    """The GGUF row's builder: our converter to f16 (or straight to f32/f16/bf16), then libllama's quantizer."""
    direct = quant in OUT_TYPES
    conv_type = quant if direct else "f16"
    need = output_size(ckpt, conv_type) + (0 if direct else estimate_bytes(ckpt, quant))
    check_disk(tmp, need)

    conv_out = tmp / ("model.gguf" if direct else "model-f16.gguf")
    say(log, f"converting {ckpt.path} -> {conv_type} GGUF")
    with Timer() as t, PeakRSS() as rss, bar("convert", output_size(ckpt, conv_type)) as upd:
        disk_guard(lambda: convert(ckpt, conv_out, conv_type, name=name, progress=upd))
    manifest["timings_s"]["convert"] = round(t.seconds, 2)
    manifest["peak_rss_bytes"]["convert"] = rss.peak
    if not direct:
        from .quantize import quantize
        say(log, f"quantizing to {quant} ({req.threads or 'all'} threads)")
        with Timer() as t, PeakRSS() as rss, bar(f"quantize {quant}", estimate_bytes(ckpt, quant)) as upd:
            disk_guard(lambda: quantize(conv_out, tmp / "model.gguf", quant, req.threads, upd))
        manifest["timings_s"]["quantize"] = round(t.seconds, 2)
        manifest["peak_rss_bytes"]["quantize"] = rss.peak
        if req.keep_intermediate:
            conv_out.rename(tmp / "model-f16.gguf")
        else:
            conv_out.unlink()
    model = tmp / "model.gguf"
    manifest.update(file="model.gguf", file_size=model.stat().st_size, sha256=sha256_file(model))
    return model
