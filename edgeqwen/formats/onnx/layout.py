"""What an ONNX build holds, as data: the precisions, the block size, the layers a mixed scheme promotes, and
every initializer the exporter writes (name, role, bytes).

No onnx or onnxruntime import: the exporter's size preflight and `plan`'s memory model both read it.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...schemas import ModelConfig


@dataclass(frozen=True)
class Scheme:
    """How an ONNX precision quantizes each MatMul (the builder's algo_config and mixed precision, as data)."""
    bits: int | None  # the body's MatMuls; None = fp32
    algo: str = "rtn"  # rtn: symmetric round-to-nearest; k_quant: asymmetric, scale and zero point searched per block
    lm_head: int | None = None  # lm_head bits when they differ from the body's
    mixed: int | None = None  # bits for the quantization-sensitive MatMuls llama.cpp's Q4_K_M promotes

    def head_bits(self) -> int | None:
        return self.lm_head or self.bits


PRECISIONS = {
    # int4: the builder's k_quant_mixed, the counterpart of Q4_K_M (lm_head, and qkv/down_proj of
    # every third layer and the first and last eighth, at int8). int4_rtn: the builder's default,
    # lm_head included at int4: smaller and faster, but on a real 0.5B worse than q2_k.
    "int4": Scheme(4, "k_quant", lm_head=8, mixed=8),
    "int4_rtn": Scheme(4),
    "int8": Scheme(8),
    "fp32": Scheme(None),
}
BLOCK = 32
ALIGN = 4096  # external tensors start on page boundaries so onnxruntime can map them

# Roles of the initializers, which decide what a running build holds of each (plan.ONNX_HELD):
#   blobs, scales, zp  a MatMulNBits weight's packed blocks, per-block scales and zero points
#   table              an embedding table only gathered from, a row per token (fp32, or the int4 rows and
#                      scales of GatherBlockQuantized)
#   folded             not in the file: a copy onnxruntime makes by folding a Reshape of an initializer (int4_rtn's
#                      tied table is lm_head's blobs seen as rows)
#   dense              fp32 matrices read in full every token (the fp32 reference precision)
#   small              norms, biases and the rotary tables
ROLES = ("blobs", "scales", "zp", "table", "dense", "small", "folded")


def promoted_layers(n_layers: int) -> set[int]:
    """Layers whose qkv and down_proj a mixed scheme keeps at higher precision: llama.cpp's Q4_K_M choice
    (first and last eighth, and every third layer between), as the builder's mixed_layers applies it."""
    eighth = n_layers / 8
    return {i for i in range(n_layers) if i < eighth or i >= 7 * eighth or (i - round(eighth)) % 3 == 2}


def matrix_parts(n: int, k: int, bits: int | None, zero_points: bool = False) -> dict[str, int]:
    """Bytes of an n x k weight as MatMulNBits stores it (or as an fp32 matrix when bits is None)."""
    if bits is None:
        return {"dense": n * k * 4}
    blocks = -(-k // BLOCK)
    return {"blobs": n * blocks * (BLOCK * bits // 8), "scales": n * blocks * 4,
            "zp": n * -(-blocks * bits // 8) if zero_points else 0}


def initializers(shapes: dict[str, tuple[int, ...]], cfg: ModelConfig,
                 precision: str) -> Iterator[tuple[str, str, int]]:
    """(source tensor, role, bytes) for every initializer the export writes from these tensors (and, as
    "folded", the copies onnxruntime makes of some, which take no room in the file: file_bytes)."""
    tied, n_layers = cfg.tie_word_embeddings, cfg.num_hidden_layers
    h, v = cfg.hidden_size, cfg.vocab_size
    sc = PRECISIONS[precision]
    bits, zp = sc.bits, sc.algo == "k_quant"
    promoted = {f"model.layers.{i}.{t}" for i in (promoted_layers(n_layers) if sc.mixed else ())
                for t in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                          "mlp.down_proj.weight")}

    def parts(name, n, k, b):
        for role, nbytes in matrix_parts(n, k, b, zp).items():
            yield name, role, nbytes
    for name, shape in shapes.items():
        if len(shape) == 1:
            yield name, "small", shape[0] * 4
        elif name == "model.embed_tokens.weight":
            if not (tied and bits == 4):  # an fp32 table (fp32 tied: lm_head is its transpose, read in full)
                yield name, "dense" if tied and bits is None else "table", v * h * 4
            if tied and bits is not None:
                yield from parts(name, v, h, sc.head_bits())
            if tied and bits == 4 and (sc.head_bits() != 4 or zp):  # the embedding's own int4 table
                yield name, "table", sum(matrix_parts(v, h, 4).values())
            elif tied and bits == 4:
                yield name, "folded", matrix_parts(v, h, 4)["blobs"]
        elif name == "lm_head.weight":
            yield from parts(name, v, h, sc.head_bits())
        else:
            yield from parts(name, shape[0], shape[1], sc.mixed if name in promoted else bits)
    yield "rotary cos/sin", "small", 2 * cfg.max_position_embeddings * cfg.head_size // 2 * 4


def padding(n_layers: int) -> int:
    """At most this much page padding in the data file: 20 tensors a layer, 12 others."""
    return ALIGN * (20 * n_layers + 12)


def file_bytes(parts) -> int:
    """The file's share of initializers() (its page padding aside)."""
    return sum(b for _, role, b in parts if role != "folded")
