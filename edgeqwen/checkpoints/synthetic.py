"""--synthetic: a checkpoint with a recipe's exact config and seeded random bf16 weights.

Lets any size be measured for speed and RAM without downloading it. Weights are written in
streamed chunks and sharded like the hub's, so even 7B needs little memory to make.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from . import TOKENIZER_FILES, expected_tensors
from .safetensors import f32_to_bf16, write_safetensors

SHARD_BYTES = 4 << 30
CHUNK_ELEMS = 8 << 20
# Qwen2's pre-tokenizer split (same as llama.cpp's "qwen2" pre-tokenizer).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
N_REGULAR = 151643  # Qwen2's byte-level BPE vocabulary before the special tokens
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _write_shards(out: Path, shards: list[list], fill) -> tuple[dict, int]:
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / fname, shard, fill)
        for name, _, shape in shard:
            weight_map[name] = fname
            total += int(np.prod(shape)) * 2
    return weight_map, total


def write_synthetic(out: Path, config: dict, seed: int = 0, tokenizer: Path | None = None) -> None:
    """Write config.json, generation_config.json, sharded bf16 safetensors and a tokenizer into out."""
    out.mkdir(parents=True, exist_ok=True)
    from ..schemas import ModelConfig
    shapes = expected_tensors(ModelConfig.model_validate(config), _arch_of(config))
    specs = [(n, "BF16", s) for n, s in shapes.items()]
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = int(np.prod(spec[2])) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    rng = np.random.default_rng(seed)
    std = float(config.get("initializer_range", 0.02))
    from ..progress import bar
    with bar("synthetic weights", sum(int(np.prod(s)) * 2 for _, _, s in specs)) as upd:
        def fill(name, shape):
            if len(shape) == 1 and "norm" in name:
                yield np.full(shape, 0x3F80, dtype=np.uint16)  # 1.0 in bf16: norms start at identity
                return
            n = int(np.prod(shape))
            for i in range(0, n, CHUNK_ELEMS):
                k = min(CHUNK_ELEMS, n - i)
                upd(2 * k)
                yield f32_to_bf16(rng.standard_normal(k, dtype=np.float32) * std)
        weight_map, total = _write_shards(out, shards, fill)

    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    write_metadata(out, config, tokenizer)


def write_metadata(out: Path, config: dict, tokenizer: Path | None = None) -> None:
    """A checkpoint's files other than its weights: config, generation config, tokenizer (copied or generated)."""
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id"),
         "do_sample": False}, indent=2))
    if tokenizer is not None:
        for f in TOKENIZER_FILES:
            if (tokenizer / f).exists():
                shutil.copyfile(tokenizer / f, out / f)
    else:
        write_generated_tokenizer(out)


def _arch_of(config):
    from ..arch import arch_for_config
    return arch_for_config(config)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_generated_tokenizer(out: Path, n_regular: int = N_REGULAR) -> None:
    """A byte-level BPE tokenizer with Qwen2's size, pre-tokenizer, special tokens and chat template.

    Used only when the real tokenizer is not available: the text it makes is meaningless, but
    vocabulary size, special ids and tokenization speed match, which is what synthetic builds measure.
    """
    byte_chars = list(bytes_to_unicode().values())
    # Printable ASCII first so common text gets multi-byte tokens, like a trained vocabulary.
    order = sorted(byte_chars, key=lambda c: (not (c.isascii() and c.isalnum()), c not in "Ġ", c))
    vocab = {c: i for i, c in enumerate(byte_chars)}
    merges: list[list[str]] = []
    level = order
    while len(vocab) < n_regular:
        nxt = []
        for a in level:
            for b in order:
                tok = a + b
                if tok in vocab:
                    continue
                vocab[tok] = len(vocab)
                merges.append([a, b])
                nxt.append(tok)
                if len(vocab) >= n_regular:
                    break
            if len(vocab) >= n_regular:
                break
        level = nxt
    added = [{"id": n_regular + i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, c in enumerate(QWEN2_SPECIAL)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tok = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
            byte_level]},
        "post_processor": None, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": merges},
    }
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "add_prefix_space": False,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
        "chat_template": CHATML_TEMPLATE, "model_max_length": 32768, "generated_by": "edgeqwen",
    }, indent=2, ensure_ascii=False))
