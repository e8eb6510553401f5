"""ONNX builds: the streamed exporter against Hugging Face and the genai builder, the genai runner, bench and eval."""
import importlib.util
from pathlib import Path
import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import interrupted_build, invoke, run_cli, two_chat_turns

from edgeqwen.formats.build import BuildRequest, build
from edgeqwen.errors import BuildError
from edgeqwen.recipes import get_recipe
from edgeqwen.formats.load import load_runner
from edgeqwen.runner import Sampling

pytest.importorskip("onnxruntime_genai")

PROMPT_IDS = [151644, 872, 198, 9707, 11, 1246, 525, 498, 30, 220, 108386, 151645, 198, 151644, 77091, 198]


def _has(*mods):
    return all(importlib.util.find_spec(m) for m in mods)


def _reference(*mods):
    """Marked `reference` (CI runs them after make reference) and skipped without those packages."""
    skip = pytest.mark.skipif(not _has(*mods), reason=f"{', '.join(mods)} not installed (make reference)")
    return lambda f: pytest.mark.reference(skip(f))


needs_hf = _reference("torch", "transformers")


def _onnx_logits(folder, ids):
    from edgeqwen.formats.onnx.runner import OnnxRunner
    r = OnnxRunner(folder, threads=2, n_ctx=256)
    try:
        return r.logits(ids)
    finally:
        r.close()


def _hf_model(ckpt):
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, trust_remote_code=False).eval()


@pytest.mark.parametrize("quant", ["int4", "int4_rtn", "int8", "fp32"])
def test_onnx_builds_have_a_manifest_and_generate(onnx_builds, quant):
    folder = onnx_builds[quant]
    m = json.loads((folder / "manifest.json").read_text())
    assert m["format"] == "onnx" and m["quant"] == quant and m["file"] == "model.onnx"
    for f in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"):
        assert f in m["files"] and (folder / f).is_file()
    assert m["smoke"]["tokens"] == 8
    assert m["file_size"] == (folder / "model.onnx").stat().st_size + (folder / "model.onnx.data").stat().st_size
    r = run_cli("run", folder, "Tell me a story", "-n", "12", "-t", "0", "--json")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert j["generation_tokens"] >= 1 and j["backend"] == "onnxruntime-genai"


def test_sizes_are_what_the_preflight_expected(onnx_builds):
    from edgeqwen.checkpoints import open_checkpoint
    from edgeqwen.formats.onnx.export import output_size
    sizes = {}
    for q in ("int4", "int4_rtn", "int8", "fp32", "untied-int4", "untied-fp32"):
        m = json.loads((onnx_builds[q] / "manifest.json").read_text())
        sizes[q] = m["file_size"]
        expect = output_size(open_checkpoint(m["source"]["path"]), m["quant"])
        assert 0.98 * expect < sizes[q] <= expect
    # int4_rtn shares one int4 table between embedding and lm_head; int4 adds an int8 lm_head and int8
    # layers; int8 keeps an fp32 embedding beside it
    assert sizes["int4_rtn"] < sizes["int4"] < sizes["int8"]


@needs_hf
@pytest.mark.parametrize("which", ["fp32", "untied-fp32"])
def test_fp32_logits_match_hugging_face(onnx_builds, tiny_ckpt, tiny_untied_ckpt, which):
    import torch
    ckpt = tiny_untied_ckpt if which.startswith("untied") else tiny_ckpt
    hf = _hf_model(ckpt)
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT_IDS])).logits[0].numpy()
    got = _onnx_logits(onnx_builds[which], PROMPT_IDS)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-4


@needs_hf
def test_fp32_greedy_tokens_match_hugging_face(margin_ckpt, tmp_path):
    """Greedy generation, ours against transformers', on the margin model (the random one's near ties would let
    two fp32 summation orders part)."""
    import torch

    from edgeqwen.recipes import get_recipe
    folder = build(BuildRequest(recipe=get_recipe("tiny-qwen2"), quant="fp32", source=margin_ckpt,
                                out=tmp_path / "fp32", smoke=False), log=None)
    with torch.no_grad():
        want = _hf_model(margin_ckpt).generate(torch.tensor([PROMPT_IDS]), max_new_tokens=16, do_sample=False,
                                               eos_token_id=None, pad_token_id=0)[0, len(PROMPT_IDS):].tolist()
    r = load_runner(folder, threads=2, n_ctx=256)
    toks = [x.token for x in r.stream(PROMPT_IDS, Sampling(max_tokens=16, temperature=0, ignore_eos=True))]
    r.close()
    assert toks == want


@needs_hf
def test_quantized_logits_stay_close_to_hugging_face(onnx_builds, tiny_ckpt):
    import torch
    with torch.no_grad():
        ref = _hf_model(tiny_ckpt)(torch.tensor([PROMPT_IDS])).logits[0].numpy()
    err = {q: float(np.abs(_onnx_logits(onnx_builds[q], PROMPT_IDS) - ref).mean())
           for q in ("int8", "int4", "int4_rtn")}
    # k-quant scales with int8 where it matters beat plain round-to-nearest at the same body width
    assert 0 < err["int8"] < err["int4"] < err["int4_rtn"] < 0.5 * float(np.abs(ref).mean())


def _builder(ckpt, out, tmp_path, *extra):
    p = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(out),
                        "-p", "int4", "-e", "cpu", "-c", str(tmp_path / "cache"), *extra],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]


def _inits(folder):
    import onnx
    from onnx import numpy_helper
    m = onnx.load(folder / "model.onnx")
    return {t.name: numpy_helper.to_array(t, base_dir=str(folder)) for t in m.graph.initializer}


def _nbits_bits(folder) -> dict[str, int]:
    import onnx
    m = onnx.load(folder / "model.onnx", load_external_data=False)
    return {n.name: next(a.i for a in n.attribute if a.name == "bits")
            for n in m.graph.node if n.op_type == "MatMulNBits"}


needs_builder = _reference("torch", "transformers", "onnx_ir")


@needs_builder
def test_streamed_int4_rtn_equals_the_genai_builders_default(onnx_builds, tiny_ckpt, tmp_path):
    """The reference: onnxruntime-genai's own builder, on the same checkpoint, gives the same weights and logits."""
    out = tmp_path / "builder"
    _builder(tiny_ckpt, out, tmp_path)
    ours, theirs = _inits(onnx_builds["int4_rtn"]), _inits(out)
    quantized = [k for k in theirs if k.endswith(("_Q4", "_scales"))]
    assert len(quantized) == 2 * (1 + 2 * 5)  # lm_head + qkv, o, gate, up, down in 2 layers; blobs and scales
    for k in quantized:
        assert np.array_equal(ours[k], theirs[k]), k
    a, b = _onnx_logits(onnx_builds["int4_rtn"], PROMPT_IDS), _onnx_logits(out, PROMPT_IDS)
    # The rotary tables differ by an ulp here and there (numpy vs torch cos); MatMulNBits rounds its
    # activations to int8, which can turn that into a step of one int8 level: small, not zero.
    assert np.abs(a - b).max() < 1e-2 and (a.argmax(-1) == b.argmax(-1)).all()


@needs_builder
def test_streamed_int4_equals_the_genai_builders_k_quant_mixed(onnx_builds, tiny_untied_ckpt, tmp_path):
    """int4 is the builder's algo_config=k_quant_mixed: same bits per MatMul, same blobs, scales and zero points."""
    out = tmp_path / "builder"
    _builder(tiny_untied_ckpt, out, tmp_path, "--extra_options", "algo_config=k_quant_mixed")
    ours, theirs = _inits(onnx_builds["untied-int4"]), _inits(out)
    quantized = [k for k in theirs if k.endswith(("_Q4G32", "_Q8G32", "_scale", "_zp"))]
    assert any(k.endswith("_Q8G32") for k in quantized) and any(k.endswith("_Q4G32") for k in quantized)
    assert len(quantized) == 3 * (1 + 2 * 5)  # lm_head + 5 MatMuls in 2 layers; blobs, scales, zero points
    for k in quantized:
        assert np.array_equal(ours[k], theirs[k]), k
    assert sorted(_nbits_bits(onnx_builds["untied-int4"]).values()) == sorted(_nbits_bits(out).values())
    a, b = _onnx_logits(onnx_builds["untied-int4"], PROMPT_IDS), _onnx_logits(out, PROMPT_IDS)
    assert np.abs(a - b).max() < 1e-2 and (a.argmax(-1) == b.argmax(-1)).all()


def test_int4_promotes_llama_cpp_s_sensitive_layers_and_lm_head_to_int8(onnx_builds):
    from edgeqwen.formats.onnx.layout import promoted_layers
    assert promoted_layers(24) == {0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23}
    assert promoted_layers(2) == {0}
    bits = _nbits_bits(onnx_builds["int4"])
    assert bits["/lm_head/MatMul_Q8"] == 8
    assert {k for k, b in bits.items() if b == 8} == {"/lm_head/MatMul_Q8", "/model.layers.0.attn.qkv_proj/MatMul_Q8",
                                                       "/model.layers.0.mlp.down_proj/MatMul_Q8"}
    assert set(_nbits_bits(onnx_builds["int4_rtn"]).values()) == {4}


def test_chat_turns_reuse_the_generator_and_give_the_same_tokens(margin_onnx):
    r = load_runner(margin_onnx["int8"], threads=2, n_ctx=256)
    greedy = Sampling(max_tokens=6, temperature=0)
    t2, reused = two_chat_turns(r, greedy)
    r.close()
    fresh_runner = load_runner(margin_onnx["int8"], threads=2, n_ctx=256)
    fresh = list(fresh_runner.stream(t2, greedy))
    fresh_runner.close()
    assert fresh[-1].cached_tokens == 0
    assert [x.token for x in reused] == [x.token for x in fresh]


def test_ignore_eos_generates_the_full_length_and_context_is_enforced(onnx_builds):
    r = load_runner(onnx_builds["int4"], threads=1, n_ctx=64)
    rs = list(r.stream(PROMPT_IDS, Sampling(max_tokens=20, temperature=0, ignore_eos=True)))
    assert len(rs) == 20 and rs[-1].finish_reason == "length" and rs[-1].generation_tps > 0
    rs = list(r.stream(PROMPT_IDS, Sampling(max_tokens=500, temperature=0, ignore_eos=True)))
    assert rs[-1].generation_tokens == 64 - len(PROMPT_IDS)
    r.close()


@pytest.mark.parametrize("args,message", [
    (("tiny-qwen2", "int4", "--format", "gguf"), "is an ONNX precision"),
    (("tiny-qwen2", "q4", "--format", "onnx"), "not an ONNX precision"),
    (("tiny-qwen2", "int3"), "int4, int4_rtn, int8, fp32"),
])
def test_format_and_quant_mistakes_fail_with_the_choices(args, message):
    r = invoke("build", *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_ram_preflight_refuses_before_loading(tiny_ckpt, tmp_path):
    r = invoke("build", "tiny-qwen2", "int4", "--source", tiny_ckpt, "--out", tmp_path / "b",
                env={"EDGEQWEN_RAM_BUDGET": "64M"})
    assert r.returncode == 1 and "needs about" in r.stderr and "64.00 MiB is available" in r.stderr
    assert not (tmp_path / "b").exists() and list(tmp_path.iterdir()) == []


def test_interrupted_onnx_build_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch):
    import edgeqwen.formats.steps
    interrupted_build(edgeqwen.formats.steps, monkeypatch, tiny_ckpt, tmp_path / "b", "int4")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_rope_scaling_is_refused(tiny_ckpt, tmp_path):
    import shutil
    src = tmp_path / "src"
    shutil.copytree(tiny_ckpt, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BuildError, match="rope_scaling"):
        build(BuildRequest(recipe=get_recipe("tiny-qwen2"), quant="int4", source=src, out=tmp_path / "b"), log=None)
    assert not (tmp_path / "b").exists()


def test_bench_and_table_take_onnx_builds(onnx_builds, tmp_path):
    out = tmp_path / "rows.jsonl"
    r = run_cli("bench", onnx_builds["int4"], "--threads", "1", "--repeats", "1", "--prompt-tokens", "32",
                "--gen-tokens", "8", "--out", out)
    assert r.returncode == 0, r.stderr
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["status"] == "ok" and row["backend"] == "onnxruntime-genai" and row["build"]["format"] == "onnx"
    assert row["tg"]["mean"] > 0 and row["pp"]["mean"] > 0 and row["ttft_s"]["mean"] > 0 and row["max_rss"] > 0
    assert row["build"]["file_size"] > (onnx_builds["int4"] / "model.onnx.data").stat().st_size - 1
    t = invoke("table", out)
    assert t.returncode == 0 and "| int4 | onnxruntime-genai |" in t.stdout


def test_eval_of_onnx_builds_against_fp32(onnx_builds, tmp_path):
    same = run_cli("eval", onnx_builds["fp32"], "--reference", onnx_builds["fp32"], "--text", "en", "--ctx", "128",
                   "--windows", "2", "--json")
    assert same.returncode == 0, same.stderr
    row = json.loads(same.stdout.strip().splitlines()[-1])
    assert row["kl_mean"] == 0.0 and row["top1"] == 1.0
    # reference: the fp32 build, found
    r = run_cli("eval", onnx_builds["int4"], "--text", "en", "--ctx", "128", "--windows", "2", "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert "tiny-qwen2-fp32" in row["reference"] and row["build"]["format"] == "onnx"
    assert row["kl_mean"] > 0 and 0 < row["top1"] <= 1 and row["ppl"] > 1



@pytest.mark.parametrize("impl", ["jit", "numpy"])
def test_kquant_search_is_onnxruntimes_bit_for_bit(impl):
    """edgeqwen.formats.onnx.kquant (compiled and numpy) against onnxruntime's quant_tensor_k_quant_cpu: the same
    values, scales and zero points on random weights with the cases that take the search's other branches (constant,
    zero and outlier blocks), int4 and int8, and on sampled rows of the real 0.5B when its checkpoint is on disk."""
    import warnings

    from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor_k_quant_cpu

    from edgeqwen.formats.onnx.kquant import jit, kquant_search
    assert impl == "numpy" or jit(), "numba is in the onnx extra: make setup installs it"
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((96, 512)) * 0.02).astype(np.float32)
    w[0, :32] = 0.25          # a constant block
    w[1, :64] = 0.0           # zero blocks
    w[2, 5] = 40.0            # an outlier
    w[3, :32] = np.linspace(-1, 1, 32)
    samples = [w, (rng.standard_normal((7, 96)) * 3).astype(np.float32)]
    real = Path.home() / ".cache/edgeqwen-real/qwen2.5-coder-0.5b-instruct"
    if (real / "config.json").exists():
        from edgeqwen.checkpoints import open_checkpoint
        from edgeqwen.checkpoints.safetensors import to_f32
        ck = open_checkpoint(real)
        for name in ("model.layers.3.mlp.down_proj.weight", "model.layers.11.self_attn.q_proj.weight"):
            chunk = next(ck.reader().chunks(name))
            samples.append(to_f32(chunk, ck.tensors[name].dtype)[:64])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for data in samples:
            for bits in (4, 8):
                ours = kquant_search(data, bits, 32, chunk=37, impl=impl)   # an odd chunk: the seams too
                theirs = quant_tensor_k_quant_cpu(data, bits, 32)
                for a, b in zip(ours, theirs):
                    assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)


def test_read_ahead_keeps_order_raises_and_ends_its_thread():
    import threading

    from edgeqwen.formats.onnx.export import _ahead
    assert list(_ahead(iter(range(50)))) == list(range(50))

    def failing():
        yield 1
        raise OSError(28, "No space left on device")
    got = []
    with pytest.raises(OSError, match="No space"):
        for x in _ahead(failing()):
            got.append(x)
    assert got == [1]
    it = _ahead(iter(range(1000)))   # the consumer stops early: the producer must not stay blocked
    assert next(it) == 0
    it.close()
    assert not [t for t in threading.enumerate() if t.name == "edgeqwen-ahead"]


def test_lean_is_refused_for_onnx_in_one_line(onnx_builds):
    # without prepacking, onnxruntime's MatMulNBits dequantizes every call: ~50x slower and larger (README)
    r = invoke("run", onnx_builds["int4"], "hi", "-n", "2", "--lean")
    assert r.returncode != 0 and "--lean needs a GGUF build" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_numpy_fallback_in_worker_processes_writes_the_same_int4(tiny_ckpt, tmp_path):
    """Without numba the k-quant search runs in spawned processes: the same bytes as the compiled search."""
    data = {}
    for impl in ("jit", "numpy"):
        out = tmp_path / impl
        r = run_cli("build", "tiny", "int4", "--source", tiny_ckpt, "--out", out, "--no-smoke",
                    env={"EDGEQWEN_KQUANT": impl})
        assert r.returncode == 0, r.stderr
        data[impl] = (out / "model.onnx.data").read_bytes()
    assert data["jit"] == data["numpy"]


def test_plan_holds_what_the_graph_s_consumers_hold(onnx_builds):
    """plan's ONNX memory model reads onnx_layout's initializer list; here each initializer of the real graphs
    gets the role of the op that consumes it (the most held, where two share one) and the sums must agree."""
    import onnx

    from edgeqwen.formats.onnx.layout import padding
    from edgeqwen.formats.onnx.plan import ONNX_HELD
    from edgeqwen.measure.plan import plan
    role_of = {("MatMulNBits", 1): "blobs", ("MatMulNBits", 2): "scales", ("MatMulNBits", 3): "zp",
               ("GatherBlockQuantized", 0): "table", ("GatherBlockQuantized", 2): "table", ("Gather", 0): "table",
               ("Reshape", 0): "folded"}
    for q in ("int4", "int4_rtn", "int8", "untied-int4"):
        folder = onnx_builds[q]
        m = json.loads((folder / "manifest.json").read_text())
        g = onnx.load(folder / "model.onnx", load_external_data=False).graph
        size = {t.name: int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
                .itemsize for t in g.initializer}
        factor: dict[str, float] = {}
        folded = 0
        for node in g.node:
            for i, x in enumerate(node.input):
                if x in size:
                    role = role_of.get((node.op_type, i), "small")
                    if role == "folded":   # a copy, beside what the initializer's other readers hold
                        folded += size[x] * ONNX_HELD[role]
                    else:
                        factor[x] = max(factor.get(x, 0), ONNX_HELD[role])
        held = folded + sum(size[x] * f for x, f in factor.items())
        # only int4_rtn's table shared with lm_head needs a Reshape (which onnxruntime folds into a copy)
        assert any(n.op_type == "Reshape" and n.input[0] in size for n in g.node) == (q == "int4_rtn"), q
        p = plan("tiny", m["quant"], config=m["config"])
        assert abs(p.held_bytes - held) < 1024, q   # the graph's few scalar constants are not planned
        assert p.file_bytes <= m["file_size"] <= p.file_bytes + padding(2) + (folder / "model.onnx").stat().st_size
        assert p.min_ram == p.held_bytes + p.kv_bytes + p.compute_bytes + p.runtime_bytes
