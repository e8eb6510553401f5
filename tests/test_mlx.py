"""MLX builds (mlx-lm folders): built by our streamed writer, run by mlx-lm (mlx[cpu] here: correct, not fast)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import interrupted_build, invoke, run_cli, two_chat_turns

from edgeqwen.formats.build import BuildRequest, build
from edgeqwen.formats.mlx.thread import on_mlx_thread
from edgeqwen.formats.load import load_runner
from edgeqwen.recipes import get_recipe
from edgeqwen.runner import Sampling

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

PROMPT = "Name three colours."


def _mlx_lm_convert(src: Path, out: Path, *args) -> Path:
    """mlx-lm's own convert, as a user runs it (a child process)."""
    p = subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path", str(out),
                        *args], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return out


def _tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def _same_tensors(ours: Path, theirs: Path) -> None:
    # on the MLX thread, as everything MLX in edgeqwen: a thread that used MLX must clear its streams before the
    # process ends, and the test process's main thread never does
    on_mlx_thread(_compare, ours, theirs)


def _compare(ours: Path, theirs: Path) -> None:
    a, b = _tensors(ours), _tensors(theirs)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert mx.array_equal(a[k], b[k]).item(), k


@pytest.mark.parametrize("which,bits", [("tied", 4), ("untied", 8)])
def test_tensors_equal_mlx_lm_convert(mlx_builds, tiny_ckpt, tiny_untied_ckpt, tmp_path, bits, which):
    """Values, dtypes and names identical to `mlx_lm convert -q --q-bits N` of the same checkpoint."""
    src = tiny_ckpt if which == "tied" else tiny_untied_ckpt
    if which == "tied":
        ours = mlx_builds[f"mlx{bits}"]
    else:
        ours = build(BuildRequest(recipe=get_recipe("tiny-qwen2"), quant=f"mlx{bits}", source=src,
                                  out=tmp_path / "ours", smoke=False), log=None)
    theirs = _mlx_lm_convert(src, tmp_path / "theirs", "-q", "--q-bits", str(bits))
    _same_tensors(ours, theirs)
    ours_cfg = json.loads((ours / "config.json").read_text())
    theirs_cfg = json.loads((theirs / "config.json").read_text())
    assert ours_cfg["quantization"] == theirs_cfg["quantization"] == {"group_size": 64, "bits": bits,
                                                                      "mode": "affine"}


def test_unquantized_build_equals_mlx_lm_convert(mlx_builds, tiny_ckpt, tmp_path):
    _same_tensors(mlx_builds["mlx_bf16"], _mlx_lm_convert(tiny_ckpt, tmp_path / "theirs"))
    assert "quantization" not in json.loads((mlx_builds["mlx_bf16"] / "config.json").read_text())


def test_group_size_is_written_and_named(tiny_ckpt, tmp_path):
    out = build(BuildRequest(recipe=get_recipe("tiny-qwen2"), quant="mlx4", source=tiny_ckpt, group_size=32,
                             smoke=False), log=None)
    assert out.name == "tiny-qwen2-mlx4-g32"
    _same_tensors(out, _mlx_lm_convert(tiny_ckpt, tmp_path / "theirs", "-q", "--q-group-size", "32"))
    r = invoke("build", "tiny-qwen2", "q4", "--source", tiny_ckpt, "--group-size", "32")
    assert r.returncode == 2 and "--group-size is for MLX builds" in r.stderr


def test_mlx_lm_loads_and_generates_our_folder(mlx_builds):
    def load_and_generate():
        from mlx_lm import generate, load
        model, tok = load(str(mlx_builds["mlx4"]))
        return generate(model, tok, prompt=tok.apply_chat_template([{"role": "user", "content": PROMPT}],
                                                                   add_generation_prompt=True), max_tokens=8)
    assert isinstance(on_mlx_thread(load_and_generate), str)


def test_manifest_hashes_the_weights_and_verify_catches_a_change(mlx_builds, tmp_path):
    folder = shutil.copytree(mlx_builds["mlx4"], tmp_path / "copy")
    m = json.loads((folder / "manifest.json").read_text())
    assert m["format"] == "mlx" and m["file"] == "model.safetensors" and m["mlx"]["bits"] == 4
    assert invoke("verify", folder).returncode == 0
    with open(folder / "model.safetensors", "r+b") as f:
        f.seek(-3, os.SEEK_END)
        f.write(b"\x00\x01\x02")
    r = run_cli("run", folder, PROMPT, "-n", "4")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "Error:" in r.stderr


def test_synthetic_build_then_run_and_chat(tmp_path):
    """The issue's new-user path: edgeqwen build 0.5b mlx4 --synthetic, then chat (the tiny recipe here)."""
    r = run_cli("build", "tiny-qwen2", "mlx4", "--synthetic", "--out", tmp_path / "b", timeout=600)
    assert r.returncode == 0, r.stderr
    r = run_cli("chat", tmp_path / "b", "-t", "0", "-n", "3", input="Hello there\nAnd again\n")
    assert r.returncode == 0, r.stderr
    r = run_cli("run", tmp_path / "b", PROMPT, "-t", "0", "-n", "3", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["backend"] == "mlx (cpu)" and out["generation_tokens"] >= 1


def test_runner_protocol_greedy_reuse_and_length(margin_mlx, mlx_builds):
    # bf16: mlx's CPU quantized kernels make every token of the tiny model's 152k-row output ~10x slower.
    # 256 holds two chat turns with either tokenizer (the generated one's prompts are twice as long).
    r = load_runner(margin_mlx["mlx_bf16"], n_ctx=256)
    greedy = Sampling(max_tokens=4, temperature=0)
    t2, reused = two_chat_turns(r, greedy)
    r.close()
    fresh_runner = load_runner(margin_mlx["mlx_bf16"], n_ctx=256)
    fresh = list(fresh_runner.stream(t2, greedy))
    assert fresh[-1].cached_tokens == 0
    assert [x.token for x in reused] == [x.token for x in fresh]
    rs = list(fresh_runner.stream((t2 * 8)[:fresh_runner.n_ctx - 10],
                                  Sampling(max_tokens=500, temperature=0, ignore_eos=True)))
    assert rs[-1].generation_tokens == 10 and rs[-1].finish_reason == "length"
    fresh_runner.close()
    # seeded sampling needs a model with choices to make: the random one, the same path twice
    rand = load_runner(mlx_builds["mlx_bf16"], n_ctx=256)
    seeded = [[x.token for x in rand.stream(t2[:20], Sampling(max_tokens=4, temperature=1.0, seed=7))]
              for _ in range(2)]
    rand.close()
    assert seeded[0] == seeded[1]


def test_teacher_forced_logits_agree_with_the_gguf_f16_build(mlx_builds, tiny_builds):
    """Same checkpoint, two runtimes: MLX bf16 against llama.cpp f16, KL < 1e-3 at every position."""
    g = load_runner(tiny_builds["f16"], n_ctx=128, logits=True)
    m = load_runner(mlx_builds["mlx_bf16"], n_ctx=128, logits=True)
    tokens = g.tokenize("The quick brown fox jumps over the lazy dog. " * 4)
    assert m.tokenize("The quick brown fox jumps over the lazy dog. " * 4) == tokens
    a, b = g.logits(tokens).astype(np.float64), m.logits(tokens).astype(np.float64)
    g.close()
    m.close()
    pa = np.exp(a - a.max(-1, keepdims=True))
    pa /= pa.sum(-1, keepdims=True)
    lb = b - b.max(-1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
    la = np.log(pa)
    kl = (pa * (la - lb)).sum(-1)
    assert kl.max() < 1e-3, kl.max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9


def test_bench_eval_and_table_take_mlx_builds(mlx_builds, tmp_path):
    out = tmp_path / "rows.jsonl"
    r = run_cli("bench", mlx_builds["mlx_bf16"], "--threads", "2", "--repeats", "1", "--prompt-tokens", "16",
                "--gen-tokens", "4", "--out", out, timeout=600)
    assert r.returncode == 0, r.stderr
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["status"] == "ok" and row["backend"] == "mlx (cpu)" and row["build"]["format"] == "mlx"
    assert row["tg"]["mean"] > 0 and row["pp"]["mean"] > 0 and row["max_rss"] > 0
    t = invoke("table", out)
    assert t.returncode == 0 and "| mlx_bf16 | mlx (cpu) |" in t.stdout
    r = run_cli("eval", mlx_builds["mlx4"], "--text", "en", "--ctx", "64", "--windows", "2", "--json")
    assert r.returncode == 0, r.stderr   # the reference: the mlx_bf16 build of the same source, found
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert "mlx_bf16" in row["reference"] and row["kl_mean"] > 0 and 0 < row["top1"] <= 1


def test_serve_answers_as_run_does(margin_mlx):
    from bench.harness import Served
    s = Served([margin_mlx["mlx4"]])
    try:
        name = json.loads((margin_mlx["mlx4"] / "manifest.json").read_text())["name"]
        r = s.client().chat.completions.create(model=name, temperature=0, max_tokens=4,
                                               messages=[{"role": "user", "content": PROMPT}])
        ref = json.loads(run_cli("run", margin_mlx["mlx4"], PROMPT, "-t", "0", "-n", "4", "--json").stdout)
        assert r.choices[0].message.content == ref["text"]
        assert r.usage.completion_tokens == ref["generation_tokens"]
        import openai   # what an MLX build cannot constrain is a 400 naming the formats that can, never free text
        for kw in ({"response_format": {"type": "json_object"}},
                   {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}):
            with pytest.raises(openai.BadRequestError, match="needs a GGUF or ONNX build"):
                s.client().chat.completions.create(model=name, max_tokens=4,
                                                   messages=[{"role": "user", "content": PROMPT}], **kw)
    finally:
        assert s.stop() == 0


def test_info_and_plan_know_mlx_builds(mlx_builds):
    from edgeqwen.measure.plan import plan
    r = invoke("info", mlx_builds["untied-mlx4"], "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    m = info["manifest"]
    p = plan("tiny-qwen2", "mlx4", config=m["config"])
    # the file is its tensors plus the safetensors header
    assert 0 <= m["file_size"] - p.file_bytes < 64 << 10
    assert info["plan"]["file_bytes"] == p.file_bytes
    apple = invoke("plan", "1.5b", "mlx4", "--device", "apple-m2-16gb")
    assert apple.returncode == 0 and "MLX" in apple.stdout and "12.00 GiB" in apple.stdout   # 75% of 16 GiB


def test_no_mlx_is_one_line_naming_the_extra(tiny_ckpt, mlx_builds, tmp_path):
    """A machine without mlx: a shadowing package makes `import mlx` fail, as it does where mlx is absent."""
    shadow = tmp_path / "shadow"
    (shadow / "mlx").mkdir(parents=True)
    (shadow / "mlx" / "__init__.py").write_text("raise ImportError('no mlx here', name='mlx')\n")
    (shadow / "mlx_lm").mkdir()
    (shadow / "mlx_lm" / "__init__.py").write_text("raise ImportError('no mlx_lm here', name='mlx_lm')\n")
    env = {"PYTHONPATH": str(shadow)}
    r = run_cli("build", "tiny-qwen2", "mlx4", "--source", tiny_ckpt, "--out", tmp_path / "b", env=env)
    errors = [line for line in r.stderr.splitlines() if not line.startswith("hashing source")]
    assert r.returncode != 0 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "edgeqwen[mlx]" in r.stderr and not (tmp_path / "b").exists()
    r = run_cli("run", mlx_builds["mlx4"], PROMPT, "-n", "2", env=env)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "edgeqwen[mlx]" in r.stderr


def _broken(mlx_builds, tmp_path, name, change):
    folder = shutil.copytree(mlx_builds["mlx4"], tmp_path / name)
    change(folder)
    return folder


@pytest.mark.parametrize("case", ["bits", "group", "missing", "stray-shard"])
def test_bad_mlx_folders_are_one_error_line(mlx_builds, tmp_path, case):
    def config(**over):
        def change(folder):
            cfg = json.loads((folder / "config.json").read_text())
            cfg["quantization"].update(over)
            (folder / "config.json").write_text(json.dumps(cfg))
        return change
    changes = {
        "bits": config(bits=8),            # the block disagrees with the tensors
        "group": config(group_size=128),
        "missing": lambda f: (f / "model.safetensors").unlink(),
        # mlx-lm loads every model*.safetensors in the folder: one that is not safetensors at all
        "stray-shard": lambda f: (f / "model-00002-of-00002.safetensors").write_bytes(b"\xff" * 64),
    }
    folder = _broken(mlx_builds, tmp_path, case, changes[case])
    r = run_cli("run", folder, PROMPT, "-n", "2")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("Error:"), r.stderr


def test_interrupted_mlx_build_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch):
    import edgeqwen.formats.steps
    interrupted_build(edgeqwen.formats.steps, monkeypatch, tiny_ckpt, tmp_path / "b", "mlx4")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8", "no-such-mode"])
def test_hostile_a_quantization_mode_the_tensors_do_not_hold_is_refused(mlx_builds, tmp_path, mode):
    """mlx-lm would read affine tensors (scales and biases) as another mode's and answer nonsense."""
    from edgeqwen.errors import RunnerError
    from edgeqwen.formats.mlx.runner import MlxRunner
    folder = tmp_path / "b"
    shutil.copytree(mlx_builds["mlx4"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization"]["mode"] = cfg["quantization_config"]["mode"] = mode
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RunnerError, match="mode"):
        MlxRunner(folder / "model.safetensors")
    r = run_cli("run", folder, "hi", "-n", "2")
    assert r.returncode != 0 and "mode" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_fuzzed_mlx_folders_give_one_error_or_load(mlx_builds, tmp_path_factory):
    """config.json (its quantization block and its shape keys) and the safetensors header of an MLX folder set to
    any JSON in turn: the runner opens it or raises one of our errors, never another exception."""
    hypothesis = pytest.importorskip("hypothesis")
    import struct

    from hypothesis import strategies as st
    from test_hardening import EXAMPLES, _json_values

    from edgeqwen.errors import EdgeqwenError
    from edgeqwen.formats.mlx.runner import MlxRunner
    good = mlx_builds["mlx4"]
    folder = tmp_path_factory.mktemp("mlxfuzz") / "b"
    shutil.copytree(good, folder)
    config = json.loads((good / "config.json").read_text())
    raw = (good / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    names = sorted(k for k in header if k != "__metadata__")
    keys = ["quantization", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "intermediate_size", "tie_word_embeddings", "max_position_embeddings", "rope_theta"]
    value = st.one_of(st.integers(-3, 2**40), _json_values(),
                      st.fixed_dictionaries({"bits": st.sampled_from([2, 3, 4, 8, 5, 0, "4", None]),
                                             "group_size": st.sampled_from([32, 64, 128, 7, 0, -64, "64"])}),
                      st.fixed_dictionaries({"bits": st.just(4), "group_size": st.just(64),
                                             "mode": st.sampled_from(["affine", "mxfp4", "nvfp4", "fp9", 4, None])}))
    field = st.sampled_from(["dtype", "shape", "data_offsets"])
    change = st.one_of(st.tuples(st.just("config"), st.sampled_from(keys), value),
                       st.tuples(st.sampled_from(names), field, value))

    @hypothesis.settings(max_examples=max(20, EXAMPLES // 10), deadline=None, derandomize=True)
    @hypothesis.given(change)
    def check(c):
        where, key, v = c
        cfg, hdr = json.loads(json.dumps(config)), json.loads(json.dumps(header))
        (cfg if where == "config" else hdr[where])[key] = v
        (folder / "config.json").write_text(json.dumps(cfg))
        h = json.dumps(hdr).encode()
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + body)
        try:
            r = MlxRunner(folder / "model.safetensors")
        except EdgeqwenError:
            return
        r.close()
    check()
