"""The ONNX row's planner: the exporter's own initializer list (layout.py), what onnxruntime holds of each role, an
fp32 KV cache genai allocates for the whole context, and the prompt's logits."""
from __future__ import annotations

import math

from ...errors import UsageError
from ...schemas import ModelConfig
from ..plan import ARCH, Plan, kv_per_position

# What onnxruntime holds of each initializer role (onnx_layout.ROLES) while it decodes, per byte of the file.
# MatMulNBits weights are prepacked into anonymous memory as the blobs plus two float arrays per block (the
# scales and the block sums that fold the zero points in) and the mapped originals are let go: loaded 0.5B,
# 1.5B and 7B int4 builds held 451, 1410 and 5896 MiB of anonymous memory against blobs + 2 x scales of 449,
# 1328 and 5880 (the 1.5B's other 82 MiB: its GatherBlockQuantized table, then passed through a Reshape that
# onnxruntime folds into a copy; the exporter now writes that table as rows, so only int4_rtn's table shared
# with lm_head is "folded"). An embedding table stays mapped, a row read per token; the whole process beyond
# the weights held was 89-100 MiB of anonymous memory at load (heap and anonymous maps, /proc/self/smaps).
ONNX_HELD = {"blobs": 1, "scales": 2, "zp": 0, "table": 0, "dense": 1, "small": 1, "folded": 1}
# Python, onnxruntime and genai: the tiny int4 build (2 layers, hidden 256) needed 224 MiB under `fit` (the
# least of five fits at 16 MiB resolution; its 500 tok/s make the speed bar noisy), of which plan's weights,
# KV cache and prompt logits account for 100.
ONNX_RUNTIME_BYTES = 124 << 20


def plan_onnx(size: str, quant: str, cfg: ModelConfig, ctx: int, prompt_tokens: int, **_) -> Plan:
    """An ONNX build: the exporter's own initializer list (onnx_layout), what onnxruntime holds of each role,
    an fp32 KV cache genai allocates for the whole context, and the prompt's logits (the graph returns a row
    per prompt token)."""
    from ...checkpoints import expected_tensors
    from .layout import file_bytes, initializers
    if cfg.extra("num_experts"):
        raise UsageError(f"{size} is a mixture of experts; ONNX builds are of dense models only")
    shapes = expected_tensors(cfg, ARCH)
    parts = list(initializers(shapes, cfg, quant))
    total = file_bytes(parts)
    held = sum(b * ONNX_HELD[role] for _, role, b in parts)
    gathered = sum(b for _, role, b in parts if role == "table")
    kv_pos = kv_per_position(cfg, 4)  # genai's cache is fp32 here
    ctx = min(ctx, 32768)
    params = sum(math.prod(shape) for shape in shapes.values())
    return Plan(size, quant, ctx, total, total, 0, ctx * kv_pos, prompt_tokens * cfg.vocab_size * 4,
                ONNX_RUNTIME_BYTES, total - gathered + kv_pos * prompt_tokens, params, gathered, held_bytes=held,
                backend="onnxruntime-genai")
