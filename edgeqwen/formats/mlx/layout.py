"""An MLX build folder as data: which tensors are quantized, into what, and what config.json says.

The folder is what `mlx_lm.load` opens: config.json (with its `quantization` block), model.safetensors and the
tokenizer files. The rules are mlx-lm's convert's (mlx_lm/utils.py quantize_model): every Linear and the
Embedding whose rows divide into groups is quantized affine to `bits` with scales and biases in the model's
dtype; norms and the q/k/v biases stay as they are; a tied model has no lm_head. No mlx import here: plan and
the builder's preflight read it too.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...schemas import ModelConfig

WEIGHTS = "model.safetensors"   # one file, whatever the size: the manifest hashes it (mlx-lm shards at 5 GB)
DEFAULT_GROUP = 64
GROUP_SIZES = (32, 64, 128)     # what mx.quantize accepts for affine
MODE = "affine"
# mlx-lm's quantization modes, and whether each stores a bias per group beside its scale (mx.quantize)
MODES = {"affine": True, "mxfp4": False, "mxfp8": False, "nvfp4": False}
# mlx-lm converts to the checkpoint's torch_dtype when it is one of these (convert.py MODEL_CONVERSION_DTYPES)
CAST = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
BYTES = {"BF16": 2, "F16": 2, "F32": 4, "U32": 4}


@dataclass(frozen=True)
class Scheme:
    bits: int | None   # None: not quantized (the reference build)
    description: str


QUANTS = {
    "mlx4": Scheme(4, "4-bit affine, groups of 64 (mlx_lm.convert -q)"),
    "mlx8": Scheme(8, "8-bit affine, groups of 64 (mlx_lm.convert -q --q-bits 8)"),
    "mlx_bf16": Scheme(None, "unquantized, in the checkpoint's dtype (the MLX reference)"),
}


def quantizable(name: str, shape: tuple[int, ...], group: int) -> bool:
    """A Linear's or the Embedding's weight whose rows split into whole groups (mlx-lm's predicate)."""
    return name.endswith(".weight") and len(shape) == 2 and "norm" not in name and shape[-1] % group == 0


def target_dtype(config: ModelConfig, source_dtype: str) -> str:
    return CAST.get(config.extra("torch_dtype") or "", source_dtype)


def tensor_specs(tensors: dict[str, tuple[tuple[int, ...], str]], config: ModelConfig, bits: int | None,
                 group: int) -> list[tuple[str, str, tuple[int, ...], str]]:
    """(name written, dtype, shape, source tensor) for every tensor of the folder, in the source's order."""
    out = []
    for name, (shape, dtype) in tensors.items():
        if config.tie_word_embeddings and name == "lm_head.weight" or "rotary_emb.inv_freq" in name:
            continue   # mlx-lm's qwen2 sanitize drops both
        dt = target_dtype(config, dtype)
        if bits is None or not quantizable(name, shape, group):
            out.append((name, dt, shape, name))
            continue
        rows, cols = shape
        base = name[: -len(".weight")]
        out += [(name, "U32", (rows, cols * bits // 32), name),
                (f"{base}.scales", dt, (rows, cols // group), name),
                (f"{base}.biases", dt, (rows, cols // group), name)]
    return out


def file_bytes(specs) -> int:
    total = 0
    for _, dtype, shape, _ in specs:
        n = BYTES[dtype]
        for d in shape:
            n *= d
        total += n
    return total


def check_folder(folder: Path, cfg: dict) -> None:
    """The quantization block of config.json against the tensors it describes (mlx-lm would load a folder whose
    block says 8 bits over 4-bit tensors and answer nonsense): a disagreement is one error naming the tensor."""
    from ...errors import RunnerError
    from ...checkpoints.safetensors import WRITE_DTYPES, read_header
    q = cfg.get("quantization")
    tensors = {}
    for f in sorted(folder.glob("model*.safetensors")):
        tensors.update(read_header(f, WRITE_DTYPES))
    scaled = [n[: -len(".scales")] for n in tensors if n.endswith(".scales")]
    if scaled and not isinstance(q, dict):
        raise RunnerError(f"{folder}: {scaled[0]} is quantized but config.json has no quantization block")
    if isinstance(q, dict) and not scaled:
        raise RunnerError(f"{folder}: config.json says quantized, but no tensor has scales")
    for base in scaled:
        p = q.get(base) if isinstance(q.get(base), dict) else q   # mlx-lm's per-layer overrides
        bits, group = p.get("bits"), p.get("group_size")
        w, s = tensors.get(f"{base}.weight"), tensors[f"{base}.scales"]
        if not (isinstance(bits, int) and isinstance(group, int) and bits in (2, 3, 4, 5, 6, 8) and group > 0):
            raise RunnerError(f"{folder}: config.json's quantization for {base} is not bits/group_size integers")
        if w is None or w.dtype != "U32" or len(w.shape) != 2 or len(s.shape) != 2 \
                or w.shape[-1] * 32 != s.shape[-1] * group * bits:
            raise RunnerError(f"{folder}: {base} does not hold {bits}-bit weights in groups of {group}, as "
                              "config.json's quantization block says")
        mode = p.get("mode", q.get("mode", MODE))
        if mode not in MODES:
            raise RunnerError(f"{folder}: config.json's quantization mode {mode!r} is none of {', '.join(MODES)}")
        biases = tensors.get(f"{base}.biases")
        if (biases is not None and biases.shape == s.shape) != MODES[mode]:
            has = "scales and biases (affine)" if biases is not None else "scales without biases"
            raise RunnerError(f"{folder}: {base} holds {has}, not what config.json's mode {mode!r} reads")


def folder_config(raw: dict, bits: int | None, group: int) -> dict:
    """config.json of the folder: the checkpoint's, plus the quantization block mlx-lm reads, keys sorted."""
    cfg = {k: v for k, v in raw.items() if k not in ("_name_or_path", "quantization", "quantization_config")}
    if bits is not None:
        q = {"group_size": group, "bits": bits, "mode": MODE}
        cfg["quantization"], cfg["quantization_config"] = q, dict(q)
    return dict(sorted(cfg.items()))
