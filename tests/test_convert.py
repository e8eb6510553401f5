"""The converter against its own source and llama.cpp's tokenizer against Hugging Face's."""
import json

import gguf
import numpy as np
import pytest
from helpers import REAL_TOKENIZER, tiny_config

from edgeqwen.checkpoints import open_checkpoint
from edgeqwen.formats.gguf.convert import convert
from edgeqwen.checkpoints.safetensors import bf16_to_f32


def _field(reader, key):
    f = reader.fields[key]
    return f.contents()


def test_metadata_llama_cpp_reads(tiny_f16_reader):
    r = tiny_f16_reader
    K = gguf.Keys
    assert _field(r, K.General.ARCHITECTURE) == "qwen2"
    assert _field(r, K.LLM.BLOCK_COUNT.format(arch="qwen2")) == 2
    assert _field(r, K.LLM.EMBEDDING_LENGTH.format(arch="qwen2")) == 256
    assert _field(r, K.LLM.FEED_FORWARD_LENGTH.format(arch="qwen2")) == 512
    assert _field(r, K.Attention.HEAD_COUNT.format(arch="qwen2")) == 4
    assert _field(r, K.Attention.HEAD_COUNT_KV.format(arch="qwen2")) == 2
    assert _field(r, K.Rope.FREQ_BASE.format(arch="qwen2")) == 1e6
    assert _field(r, K.LLM.CONTEXT_LENGTH.format(arch="qwen2")) == 32768
    assert _field(r, K.General.FILE_TYPE) == gguf.LlamaFileType.MOSTLY_F16
    assert _field(r, K.General.QUANTIZATION_VERSION) == gguf.GGML_QUANT_VERSION
    assert _field(r, K.Tokenizer.MODEL) == "gpt2"
    assert _field(r, K.Tokenizer.PRE) == "qwen2"
    assert len(_field(r, K.Tokenizer.LIST)) == 151936
    assert _field(r, K.Tokenizer.EOS_ID) == 151645
    assert _field(r, K.Tokenizer.PAD_ID) == 151643
    assert len(_field(r, K.Tokenizer.MERGES)) > 100_000
    assert "<|im_start|>" in _field(r, K.Tokenizer.CHAT_TEMPLATE)
    types = _field(r, K.Tokenizer.TOKEN_TYPE)
    assert types[151645] == gguf.TokenType.CONTROL and types[0] == gguf.TokenType.NORMAL
    assert types[-1] == gguf.TokenType.UNUSED


def test_tensors_match_the_checkpoint(tiny_ckpt, tiny_f16_reader):
    ckpt = open_checkpoint(tiny_ckpt)
    reader = ckpt.reader()
    r = tiny_f16_reader
    tensors = {t.name: t for t in r.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert len(tensors) == 1 + 1 + 2 * 12
    for hf, name in [("model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight"),
                     ("model.embed_tokens.weight", "token_embd.weight"),
                     ("model.layers.0.self_attn.k_proj.bias", "blk.0.attn_k.bias"),
                     ("model.norm.weight", "output_norm.weight")]:
        src = bf16_to_f32(reader.read(hf))
        t = tensors[name]
        want_type = gguf.GGMLQuantizationType.F32 if src.ndim == 1 else gguf.GGMLQuantizationType.F16
        assert t.tensor_type == want_type
        assert tuple(int(d) for d in reversed(t.shape)) == src.shape
        np.testing.assert_array_equal(np.asarray(t.data, dtype=np.float32).reshape(src.shape),
                                      src.astype(np.float16).astype(np.float32))
    reader.close()


def test_untied_checkpoint_keeps_output(tiny_untied_ckpt, tmp_path):
    out = tmp_path / "u.gguf"
    convert(open_checkpoint(tiny_untied_ckpt), out, "bf16")
    r = gguf.GGUFReader(out)
    t = {t.name: t for t in r.tensors}
    assert t["output.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    # bf16 in, bf16 out: bit-exact
    ckpt = open_checkpoint(tiny_untied_ckpt)
    raw = ckpt.reader().read("lm_head.weight")
    assert np.asarray(t["output.weight"].data).view(np.uint16).reshape(raw.shape).tobytes() == raw.tobytes()


STRINGS = {
    "english": "Hello world! The quick brown fox doesn't jump over 1,234 lazy dogs.",
    "chinese": "通义千问是阿里云研发的大语言模型。我们今天去哪里吃饭？",
    "code": "def f(x):\n    return [i**2 for i in range(x) if i % 3 == 0]  # squares\n",
    "whitespace": "  leading\t\ttabs\n\n\n   and    many     spaces   \r\n end  ",
    "emoji": "I love 🦙 and 🐉! 👩‍👩‍👧‍👦 ok 🇨🇳",
    "special": "<|im_start|>user\nhi<|im_end|>\n",
}


@pytest.mark.parametrize("which", ["real", "generated"])
def test_llama_cpp_tokenizer_matches_hugging_face(which, tiny_ckpt, tmp_path):
    """llama.cpp's tokenizer on our GGUF gives the Hugging Face tokenizer's ids."""
    tokenizers = pytest.importorskip("tokenizers")
    llama_cpp = pytest.importorskip("llama_cpp")
    from edgeqwen.checkpoints.synthetic import write_synthetic
    if which == "real":
        if not REAL_TOKENIZER.exists():
            pytest.skip("../shared/fixtures/qwen2-tokenizer is absent")
        folder = tiny_ckpt
    else:
        folder = tmp_path / "gen"
        write_synthetic(folder, tiny_config(num_hidden_layers=1), tokenizer=None)
    out = tmp_path / "t.gguf"
    convert(open_checkpoint(folder), out, "f16")
    hf = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    for label, s in STRINGS.items():
        want = hf.encode(s, add_special_tokens=False).ids
        got = llm.tokenize(s.encode(), add_bos=False, special=True)
        assert got == want, label
        assert llm.detokenize(got, special=True).decode() == hf.decode(want, skip_special_tokens=False)


def test_generated_tokenizer_has_qwen2_specials(tmp_path):
    from edgeqwen.checkpoints.synthetic import write_generated_tokenizer
    write_generated_tokenizer(tmp_path)
    tok = json.loads((tmp_path / "tokenizer.json").read_text())
    assert len(tok["model"]["vocab"]) == 151643
    assert [a["id"] for a in tok["added_tokens"]] == [151643, 151644, 151645]


def _with_config(src, dst, **over):
    """A copy of a checkpoint folder (weights linked) whose config.json has `over` on top."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    (dst / "config.json").unlink()
    (dst / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), **over}))
    return dst


def test_the_arch_rows_facts_reach_the_file(tiny_ckpt, tiny_f16_reader, tmp_path):
    """No BOS, padding names and the rope kinds a Qwen2 checkpoint may carry come from its arch row."""
    from edgeqwen.arch import ARCHS
    from edgeqwen.errors import BuildError
    row = ARCHS["qwen2"]
    r = tiny_f16_reader
    K = gguf.Keys
    assert _field(r, K.Tokenizer.ADD_BOS) is row.add_bos is False
    tokens = _field(r, K.Tokenizer.LIST)
    assert tokens[-1] == row.pad_token.format(len(tokens) - 1)
    yarn = _with_config(tiny_ckpt, tmp_path / "yarn", rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    convert(open_checkpoint(yarn), tmp_path / "yarn.gguf")
    from edgeqwen.formats.gguf.info import read_gguf_info   # the header only: gguf-py's reader parsed the f16 above
    meta = read_gguf_info(tmp_path / "yarn.gguf").metadata
    assert meta[K.Rope.SCALING_TYPE.format(arch="qwen2")] == "yarn"
    assert meta[K.Rope.SCALING_FACTOR.format(arch="qwen2")] == 4.0
    other = _with_config(tiny_ckpt, tmp_path / "longrope", rope_scaling={"rope_type": "longrope", "factor": 4.0})
    with pytest.raises(BuildError, match="longrope"):
        convert(open_checkpoint(other), tmp_path / "longrope.gguf")
    assert not (tmp_path / "longrope.gguf").exists() or (tmp_path / "longrope.gguf").stat().st_size == 0
