"""Hugging Face safetensors -> GGUF (f32, f16 or bf16), streamed.

Tensors are read from memory-mapped safetensors and converted in row chunks straight into the
output file, so peak RSS is a few chunks whatever the model size. Names come from gguf's
TensorNameMap and metadata keys from its writer, as llama.cpp's own converter does.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ...checkpoints import Checkpoint
from ...errors import BuildError, SourceError
from ...checkpoints.safetensors import Reader, TensorInfo, f32_to_bf16, to_f32

T = gguf.GGMLQuantizationType
OUT_TYPES = {"f32": (T.F32, gguf.LlamaFileType.ALL_F32), "f16": (T.F16, gguf.LlamaFileType.MOSTLY_F16),
             "bf16": (T.BF16, gguf.LlamaFileType.MOSTLY_BF16)}
_NP = {T.F32: np.float32, T.F16: np.float16, T.BF16: np.uint16}


@dataclass
class PlannedTensor:
    src: TensorInfo
    name: str
    type: gguf.GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        return self.src.n_elements * np.dtype(_NP[self.type]).itemsize


class _Streamed:
    """Quacks like the ndarray GGUFWriter.write_tensor_data expects, but writes chunk by chunk."""

    def __init__(self, reader: Reader, t: PlannedTensor, on_bytes: Callable[[int], None] | None):
        self.reader, self.t, self.on_bytes = reader, t, on_bytes
        self.nbytes = t.nbytes

    def tofile(self, fout) -> None:
        for chunk in self.reader.chunks(self.t.src.name):
            if self.t.type is T.BF16 and self.t.src.dtype == "BF16":
                out = chunk  # bit-exact copy
            elif self.t.type is T.BF16:
                out = f32_to_bf16(to_f32(chunk, self.t.src.dtype))
            else:
                out = to_f32(chunk, self.t.src.dtype).astype(_NP[self.t.type], copy=False)
            fout.write(memoryview(np.ascontiguousarray(out)).cast("B"))
            if self.on_bytes:
                self.on_bytes(out.nbytes)


def plan_tensors(ckpt: Checkpoint, outtype: str) -> list[PlannedTensor]:
    """GGUF name and type of every tensor, in llama.cpp's order; 1-D tensors stay f32 as llama.cpp keeps them."""
    out_type = OUT_TYPES[outtype][0]
    name_map = gguf.get_tensor_name_map(ckpt.arch.gguf_arch, ckpt.n_layers)
    plan = []
    for hf_name, info in ckpt.tensors.items():
        if hf_name == "lm_head.weight" and ckpt.tied:
            continue  # llama.cpp reuses token_embd when there is no output.weight
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise BuildError(f"cannot map tensor {hf_name} to a GGUF name")
        plan.append(PlannedTensor(info, name, T.F32 if len(info.shape) == 1 else out_type))
    return sorted(plan, key=_order)


def _order(t: PlannedTensor):
    parts = t.name.split(".")
    if parts[0] == "blk":
        return (1, int(parts[1]), t.name)
    return (0 if parts[0] == "token_embd" else 2, 0, t.name)


def output_size(ckpt: Checkpoint, outtype: str) -> int:
    return sum(t.nbytes for t in plan_tensors(ckpt, outtype)) + (16 << 20)


# How each rope scaling kind an arch row allows is written, in gguf-py's vocabulary.
ROPE_SCALING = {"yarn": gguf.RopeScalingType.YARN, "linear": gguf.RopeScalingType.LINEAR}


def add_model_metadata(w: gguf.GGUFWriter, ckpt: Checkpoint, ftype: gguf.LlamaFileType, name: str) -> None:
    c = ckpt.config
    w.add_name(name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_block_count(ckpt.n_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_theta))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    if c.rope_kind is not None:
        if c.rope_kind not in ckpt.arch.rope_kinds or c.rope_kind not in ROPE_SCALING:
            raise BuildError(f"{ckpt.path}: rope_scaling {c.rope_kind!r} is not one {ckpt.arch.name} builds take "
                             f"({', '.join(ckpt.arch.rope_kinds) or 'none'})")
        w.add_rope_scaling_type(ROPE_SCALING[c.rope_kind])
        w.add_rope_scaling_factor(float(c.rope_scaling.factor))
        if c.rope_scaling.original_max_position_embeddings:
            w.add_rope_scaling_orig_ctx_len(c.rope_scaling.original_max_position_embeddings)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_tokenizer(w: gguf.GGUFWriter, ckpt: Checkpoint) -> None:
    """GPT-2-style BPE vocabulary, llama.cpp's way: added tokens that look special are CONTROL."""
    path = ckpt.path / "tokenizer.json"
    if not path.exists():
        raise BuildError(f"{ckpt.path}: no tokenizer.json; a build needs the tokenizer")
    from ...schemas import TokenizerFile, check_source, read_json
    t = check_source(TokenizerFile, read_json(path, "tokenizer.json"), path, "tokenizer.json")
    vocab: dict[str, int] = dict(t.model.vocab)
    added = {a.id: {"id": a.id, "content": a.content, "special": a.special} for a in t.added_tokens}
    for a in added.values():
        vocab[a["content"]] = a["id"]
    if not vocab:
        raise SourceError(f"{path}: the tokenizer's vocabulary is empty")
    n_vocab = ckpt.config.vocab_size
    if max(vocab.values()) >= n_vocab:
        raise BuildError(f"tokenizer has ids up to {max(vocab.values())} but vocab_size is {n_vocab}")
    reverse = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        t = reverse.get(i)
        if t is None:
            tokens.append(ckpt.arch.pad_token.format(i))
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            special = added[i].get("special") or (t.startswith("<|") and t.endswith("|>"))
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(ckpt.arch.tokenizer_pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    cfg_path = ckpt.path / "tokenizer_config.json"
    if cfg_path.exists():
        from ...schemas import TokenizerConfig
        check_source(TokenizerConfig, read_json(cfg_path, "tokenizer_config.json"), cfg_path, "tokenizer_config.json")
    try:   # gguf-py reads merges, special tokens and the chat template from the tokenizer files itself
        special = gguf.SpecialVocab(ckpt.path, load_merges=True, n_vocab=n_vocab)
        special.add_to_gguf(w, quiet=True)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, OSError, RecursionError) as e:
        raise SourceError(f"{ckpt.path}: the tokenizer files are malformed ({type(e).__name__}: {e})") from None
    if "bos" not in special.add_special_token:   # the tokenizer files did not say: the arch row does
        w.add_add_bos_token(ckpt.arch.add_bos)


def convert(ckpt: Checkpoint, out_path: Path, outtype: str = "f16", name: str | None = None,
            progress: Callable[[int], None] | None = None) -> dict:
    """Write ckpt as a GGUF of outtype ('f32', 'f16', 'bf16') to out_path; returns sizes."""
    if outtype not in OUT_TYPES:
        raise BuildError(f"converter writes f32, f16 or bf16, not {outtype}")
    plan = plan_tensors(ckpt, outtype)
    w = gguf.GGUFWriter(out_path, ckpt.arch.gguf_name)
    add_model_metadata(w, ckpt, OUT_TYPES[outtype][1], name or ckpt.path.name)
    add_tokenizer(w, ckpt)
    for t in plan:
        np_dtype = np.dtype(_NP[t.type])
        w.add_tensor_info(t.name, t.src.shape, np_dtype, t.nbytes, raw_dtype=t.type if t.type is T.BF16 else None)
    reader = ckpt.reader()
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in plan:
            w.write_tensor_data(_Streamed(reader, t, progress))
        w.close()
    finally:
        reader.close()
    return {"tensors": len(plan), "bytes": out_path.stat().st_size}
