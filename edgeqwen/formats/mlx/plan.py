"""The MLX row's planner: the folder's own tensor list (layout.py), all of it held in (unified) memory."""
from __future__ import annotations

import math

from ...errors import UsageError
from ...schemas import ModelConfig
from ..plan import ARCH, Plan, kv_per_position

# mlx-lm loads every weight into (unified) memory; its KV cache is the model's dtype (bf16) and grows with use.
# Only the last position's logits are computed (the prefill's are never evaluated: MLX is lazy).
# Python, mlx and mlx-lm's tokenizer (transformers): the real 0.5B mlx4 read 764 MiB RSS loaded against 338 MiB
# of weights (Linux, mlx[cpu] 0.32.4; transformers imported torch there, which a make setup install lacks).
MLX_RUNTIME_BYTES = 426 << 20
# Metal lets the GPU wire about this share of a Mac's RAM (recommendedMaxWorkingSetSize; mlx-lm warns past it).
MLX_WORKING_SET = 0.75


def plan_mlx(size: str, quant: str, cfg: ModelConfig, ctx: int, prompt_tokens: int, **_) -> Plan:
    """An MLX build: the folder's own tensor list (formats/mlx/layout.py), all of it held."""
    from ...checkpoints import expected_tensors
    from .layout import DEFAULT_GROUP, QUANTS, file_bytes, tensor_specs
    if cfg.extra("num_experts"):
        raise UsageError(f"{size} is a mixture of experts; plan knows dense MLX builds only")
    shapes = expected_tensors(cfg, ARCH)
    specs = tensor_specs({n: (s, "BF16") for n, s in shapes.items()}, cfg, QUANTS[quant].bits, DEFAULT_GROUP)
    total = file_bytes(specs)
    embed = file_bytes([s for s in specs if s[3] == "model.embed_tokens.weight"])
    gathered = 0 if cfg.tie_word_embeddings else embed   # a row per token unless it is also the output layer
    kv_pos = kv_per_position(cfg, 2)
    ctx = min(ctx, 32768)
    params = sum(math.prod(shape) for shape in shapes.values())
    return Plan(size, quant, ctx, total, total, 0, ctx * kv_pos, cfg.vocab_size * 4, MLX_RUNTIME_BYTES,
                total - gathered + kv_pos * prompt_tokens, params, gathered, held_bytes=total, backend="mlx-lm")
