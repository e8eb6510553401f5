"""The MLX row's builder (the formats table names it): a checkpoint -> a folder `mlx_lm.load` opens.

Streamed, tensor by tensor and row block by row block, with our safetensors reader: each block is cast and
quantized by `mlx.core.quantize` itself (the function mlx-lm's convert calls through nn.quantize), so the
values are mlx-lm's to the bit, while the whole model is never in memory (mlx-lm's convert loads it all).
Groups lie along a row, so quantizing a block of rows gives the rows' exact result.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from ...checkpoints import Checkpoint, copy_tokenizer
from ...errors import BuildError
from ...home import MANIFEST
from ...checkpoints.safetensors import write_safetensors
from .. import build_hash
from ..steps import BuildRequest, check_disk, disk_guard, note, step
from .thread import on_mlx_thread
from .layout import (DEFAULT_GROUP, GROUP_SIZES, MODE, QUANTS, WEIGHTS, file_bytes, folder_config, target_dtype,
                     tensor_specs)

ROWS_BYTES = 32 << 20   # source bytes per block: a few blocks in flight stay far below the 7B goal of 1.5 GB


def specs_of(ckpt: Checkpoint, bits: int | None, group: int) -> list:
    return tensor_specs({n: (tuple(t.shape), t.dtype) for n, t in ckpt.tensors.items()}, ckpt.config, bits, group)


def _import_mlx():
    try:
        import mlx.core as mx
    except ImportError:
        raise BuildError("MLX builds need mlx, which is not installed: pip install 'edgeqwen[mlx]' "
                         "(on Linux this is mlx[cpu])") from None
    return mx


def _to_mx(mx, block: np.ndarray, src: str, dst: str):
    """A block of source rows as an mlx array of the folder's dtype, cast by mlx as mlx-lm's convert casts."""
    x = mx.array(block)
    if src == "BF16":
        x = x.view(mx.bfloat16)
    want = {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32}[dst]
    return x if x.dtype == want else x.astype(want)


def _to_np(mx, x) -> np.ndarray:
    if x.dtype == mx.bfloat16:
        x = x.view(mx.uint16)
    return np.array(x, copy=False)


def write_folder(ckpt: Checkpoint, out: Path, bits: int | None, group: int = DEFAULT_GROUP,
                 progress=None) -> dict:
    """Write model.safetensors, config.json and the tokenizer files of an MLX build into out (on the MLX thread)."""
    cancel = threading.Event()
    return on_mlx_thread(_write_folder, ckpt, out, bits, group, progress, cancel, cancel=cancel)


def _write_folder(ckpt, out, bits, group, progress, cancel: threading.Event) -> dict:
    mx = _import_mlx()
    if group not in GROUP_SIZES:
        raise BuildError(f"--group-size {group}: MLX quantizes in groups of {', '.join(map(str, GROUP_SIZES))}")
    specs = specs_of(ckpt, bits, group)
    by_name = {s[0]: s for s in specs}
    reader = ckpt.reader()
    pending: dict[str, list] = {}   # scales and biases of the matrix just written, until their turn

    def fill(name, shape):
        _, dtype, _, source = by_name[name]
        if name in pending:
            yield from pending.pop(name)
            return
        info = ckpt.tensors[source]
        quantized = dtype == "U32"
        scales, biases = [], []
        for block in reader.chunks(source, ROWS_BYTES):
            if cancel.is_set():
                raise KeyboardInterrupt
            x = _to_mx(mx, block, info.dtype, target_dtype(ckpt.config, info.dtype) if quantized else dtype)
            if quantized:
                wq, s, b = mx.quantize(x, group_size=group, bits=bits, mode=MODE)
                mx.eval(wq, s, b)
                scales.append(_to_np(mx, s).copy())
                biases.append(_to_np(mx, b).copy())
                yield _to_np(mx, wq)
            else:
                yield _to_np(mx, x)
            if progress:
                progress(block.nbytes)
        if quantized:
            base = name[: -len(".weight")]
            pending[f"{base}.scales"], pending[f"{base}.biases"] = scales, biases

    try:
        write_safetensors(out / WEIGHTS, [(n, d, s) for n, d, s, _ in specs], fill, metadata={"format": "mlx"})
    except ValueError as e:   # mx.quantize refusing a shape: the checkpoint's fault, said in one line
        raise BuildError(f"{ckpt.path}: MLX cannot quantize it ({e})") from None
    finally:
        reader.close()
    raw = ckpt.config.model_dump(exclude_unset=True)
    (out / "config.json").write_text(json.dumps(folder_config(raw, bits, group), indent=4) + "\n")
    copy_tokenizer(ckpt.path, out)
    return {"bytes": (out / WEIGHTS).stat().st_size, "tensors": len(specs)}


def build_mlx(req: BuildRequest, ckpt: Checkpoint, quant: str, name: str, tmp: Path, manifest: dict, log) -> Path:
    """The MLX row's builder: mlx-lm's folder layout, written by our streamed quantizer."""
    scheme = QUANTS[quant]
    group = req.group_size or DEFAULT_GROUP
    on_mlx_thread(_import_mlx)
    size = file_bytes(specs_of(ckpt, scheme.bits, group))
    check_disk(tmp, size)
    note(log, f"writing MLX {quant} from {ckpt.path}")
    total = sum(t.n_elements * (2 if t.dtype != "F32" else 4) for t in ckpt.tensors.values())
    with step(manifest, "convert", f"mlx {quant}", total) as upd:
        info = disk_guard(lambda: write_folder(ckpt, tmp, scheme.bits, group, progress=upd))
    files = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest.update(file=WEIGHTS, files=files, file_size=info["bytes"])
    manifest.update(sha256=build_hash(tmp, manifest),   # mlx's version: in manifest["tools"], as every backend's
                    mlx={"bits": scheme.bits, "group_size": group if scheme.bits else None, "mode": MODE})
    return tmp / WEIGHTS
