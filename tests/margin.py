"""A tiny Qwen2 whose greedy text is the same on every kernel path: weights constructed, not random.

Tests that compare generated text between two paths (run vs serve, stream vs whole, draft vs target, reuse vs
fresh, lean vs repacked, x86 vs arm64) use it; a random-weight model's top two logits can sit within rounding of
each other, so which one wins then depends on the CPU's kernels (AMX, repacked GEMMs, one-token GEMV), not on us.

How: the embeddings of a few chosen tokens are one-hot directions of the hidden state (every other token shares
one more direction), and the untied output head maps each direction to the token's successor. The layers keep
small random weights (so every matmul runs for real) whose output is a small fraction of the embedding, so the
chosen successor wins by MARGIN logits or more, far beyond any kernel's rounding (checked on every format and
load path by tests/test_margin.py). Greedy decoding then continues a fixed cycle:

- after any ordinary token (so after any chat prompt): CYCLE_TEXT's tokens, over and over (printable words);
- after a prompt ending in STEER_TEXT's last token: CONTROL_TEXT's tokens, two control characters among them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CYCLE_TEXT = " one two three four five six seven eight nine ten"
STEER_TEXT = "Ring@"
CONTROL_TEXT = "\x05#\x0c~"
MARGIN = 8.0            # logits: asserted on every engine, quant and load path (tests/test_margin.py; 12.5 least seen)
_EMBED = 1.0            # the one-hot entry of a chosen token's embedding
_HEAD = 4.0            # the output head's entry that points a direction at its successor
_NOISE = 0.02           # every other weight: random, like the synthetic checkpoints'


def _token_ids(tokenizer, text: str) -> list[int]:
    """text's tokens, each once, in order (a cycle needs one successor per token)."""
    out: list[int] = []
    for i in tokenizer.encode(text, add_special_tokens=False).ids:
        if i not in out:
            out.append(i)
    return out


def plan_cycles(folder: Path) -> dict:
    """The successor of each chosen token and the tokens the two cycles run through, from folder's tokenizer."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    cycle = _token_ids(tok, CYCLE_TEXT)
    control = [i for i in _token_ids(tok, CONTROL_TEXT) if i not in cycle]
    steer = tok.encode(STEER_TEXT, add_special_tokens=False).ids[-1]
    if steer in cycle or steer in control:
        raise ValueError(f"the steer token {steer} is also in a cycle")
    succ = {a: b for a, b in zip(cycle, cycle[1:] + cycle[:1])}
    succ.update({a: b for a, b in zip(control, control[1:] + control[:1])})
    succ[steer] = control[0]
    return {"cycle": cycle, "control": control, "steer": steer, "successor": succ,
            "cycle_text": tok.decode(cycle), "control_text": tok.decode(control)}


def continues(text: str, cycle_text: str) -> bool:
    """text is the cycle's text from its start, over and over, cut anywhere (how long a cycle is in tokens
    depends on the tokenizer: the generated one splits words the real one keeps whole)."""
    return bool(text) and (cycle_text * (len(text) // len(cycle_text) + 2)).startswith(text)


def write_margin(out: Path, config: dict, tokenizer: Path | None = None, seed: int = 0) -> dict:
    """Write the margin checkpoint (config must be untied) into out; returns plan_cycles' description."""
    from edgeqwen.checkpoints import expected_tensors
    from edgeqwen.checkpoints.safetensors import f32_to_bf16, write_safetensors
    from edgeqwen.schemas import ModelConfig
    from edgeqwen.checkpoints.synthetic import _arch_of, write_metadata

    assert not config.get("tie_word_embeddings", True), "the margin model needs its own output head"
    out.mkdir(parents=True, exist_ok=True)
    write_metadata(out, config, tokenizer)   # as a synthetic checkpoint has them; the weights are ours
    cycles = plan_cycles(out)
    succ = cycles["successor"]
    v, h = config["vocab_size"], config["hidden_size"]
    dim = {t: k for k, t in enumerate(succ)}          # a direction of its own for each chosen token
    other = len(dim)                                  # and one for every other token
    assert other < h
    rng = np.random.default_rng(seed)
    embed = rng.standard_normal((v, h), dtype=np.float32) * _NOISE
    head = rng.standard_normal((v, h), dtype=np.float32) * _NOISE
    chosen = np.zeros(v, dtype=bool)
    chosen[list(dim)] = True
    embed[~chosen, other] += _EMBED
    for t, k in dim.items():
        embed[t, k] += _EMBED
        head[succ[t], k] += _HEAD
    head[cycles["cycle"][0], other] += _HEAD          # any ordinary token leads into the printable cycle

    shapes = expected_tensors(ModelConfig.model_validate(config), _arch_of(config))

    def fill(name, shape):
        if name == "model.embed_tokens.weight":
            yield f32_to_bf16(embed.ravel())
        elif name == "lm_head.weight":
            yield f32_to_bf16(head.ravel())
        elif len(shape) == 1 and "norm" in name:
            yield np.full(shape, 0x3F80, dtype=np.uint16)   # 1.0
        else:
            yield f32_to_bf16(rng.standard_normal(int(np.prod(shape)), dtype=np.float32) * _NOISE)
    write_safetensors(out / "model.safetensors", [(n, "BF16", s) for n, s in shapes.items()], fill)
    cycles["successor"] = {str(k): v for k, v in succ.items()}
    (out / "margin.json").write_text(json.dumps(cycles, indent=1))
    return cycles
