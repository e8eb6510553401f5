"""Architecture rows: everything edgeqwen needs to know about a model family, as data.

Adding a family that llama.cpp already supports (Qwen2.5 shares qwen2) means a recipe file;
a new architecture means one row here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import gguf


@dataclass(frozen=True)
class Arch:
    name: str
    hf_architectures: tuple[str, ...]   # config.json "architectures" we accept
    hf_model_type: str                   # config.json "model_type"
    gguf_arch: gguf.MODEL_ARCH
    tokenizer_pre: str                   # llama.cpp pre-tokenizer name
    # config.json keys we require, and defaults written by --synthetic
    required_config: tuple[str, ...]
    synthetic_defaults: dict = field(default_factory=dict)
    # q, k and v projections carry a bias (Qwen2 does; Llama does not).
    attention_bias: bool = True
    # The tokenizer adds no BOS token before a prompt (written to GGUF as tokenizer.ggml.add_bos_token).
    add_bos: bool = False
    # Ids past the tokenizer's vocabulary up to vocab_size (the embedding is padded to a multiple of 128):
    # llama.cpp's converter names them this way, so our files match its files token for token.
    pad_token: str = "[PAD{}]"
    # The rope scalings a checkpoint of this family may carry (Qwen2.5 ships yarn for long contexts).
    rope_kinds: tuple[str, ...] = ()

    @property
    def gguf_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


_QWEN_REQUIRED = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "vocab_size", "max_position_embeddings", "rope_theta", "rms_norm_eps",
)

ARCHS: dict[str, Arch] = {
    "qwen2": Arch(
        name="qwen2",
        hf_architectures=("Qwen2ForCausalLM",),
        hf_model_type="qwen2",
        gguf_arch=gguf.MODEL_ARCH.QWEN2,
        tokenizer_pre="qwen2",
        required_config=_QWEN_REQUIRED,
        attention_bias=True,
        add_bos=False,
        rope_kinds=("yarn",),
        synthetic_defaults={
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
            "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": True,
            "use_sliding_window": False, "max_window_layers": 21, "torch_dtype": "bfloat16",
        },
    ),
}


def arch_for_config(config: dict) -> Arch | None:
    """The row whose model_type / architectures match a Hugging Face config.json."""
    names = config.get("architectures")
    archs = {a for a in names if isinstance(a, str)} if isinstance(names, list) else set()
    for row in ARCHS.values():
        if config.get("model_type") == row.hf_model_type or archs & set(row.hf_architectures):
            return row
    return None
