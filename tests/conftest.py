"""Shared fixtures: a tiny random Qwen2 built once per session through the synthetic path."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# A shell without job control starts `make test &` with SIGINT ignored, and children inherit that: the
# Ctrl-C tests would then see no Ctrl-C at all. They test our handling, so give the children the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from bench.harness import Served, Worker
from helpers import SHARED, TINY_RECIPE, build_name, tiny_config, tokenizer_dir


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory):
    """Every test runs with its own cache, offline, whatever the developer's machine has."""
    root = tmp_path_factory.mktemp("env")
    recipes = root / "recipes"
    recipes.mkdir()
    (recipes / "tiny-qwen2.toml").write_text(TINY_RECIPE)
    env = {"EDGEQWEN_HOME": str(root / "home"), "HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1",
           "EDGEQWEN_RECIPES": str(recipes), "HF_HUB_DISABLE_TELEMETRY": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield root
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny tied Qwen2 checkpoint (real tokenizer when ../shared has it, else the generated one)."""
    from edgeqwen.checkpoints.synthetic import write_synthetic
    out = tmp_path_factory.mktemp("tiny") / "tiny-qwen2"
    write_synthetic(out, tiny_config(), seed=1, tokenizer=tokenizer_dir())
    return out


@pytest.fixture(scope="session")
def tiny_untied_ckpt(tmp_path_factory) -> Path:
    from edgeqwen.checkpoints.synthetic import write_synthetic
    out = tmp_path_factory.mktemp("tiny") / "tiny-untied"
    write_synthetic(out, tiny_config(tie_word_embeddings=False, vocab_size=151936), seed=2,
                    tokenizer=tokenizer_dir())
    return out


@pytest.fixture(scope="session")
def margin_ckpt(tmp_path_factory) -> Path:
    """The tiny model whose greedy text is the same on every kernel path (tests/margin.py)."""
    from margin import write_margin
    out = tmp_path_factory.mktemp("margin") / "tiny-margin"
    write_margin(out, tiny_config(tie_word_embeddings=False), tokenizer=tokenizer_dir())
    return out


@pytest.fixture(scope="session")
def margin_cycles(margin_ckpt) -> dict:
    """What the margin model says: its printable cycle after any chat prompt, its control cycle after STEER_TEXT."""
    import json
    return json.loads((margin_ckpt / "margin.json").read_text())


@pytest.fixture(scope="session")
def margin_builds(margin_ckpt) -> dict[str, Path]:
    """GGUF builds of the margin model: f16, q8_0, q4_k_m, q4_0 (each with its own kernels on every CPU)."""
    from edgeqwen.formats.build import BuildRequest, build
    from edgeqwen.recipes import get_recipe
    recipe = get_recipe("tiny-qwen2")
    # no smoke child per build: tiny_builds take that path, and every margin test loads these
    return {q: build(BuildRequest(recipe=recipe, quant=q, source=margin_ckpt, name=f"tiny-margin-{q}", threads=2,
                                  smoke=False), log=None) for q in ("f16", "q8_0", "q4_k_m", "q4_0")}


@pytest.fixture(scope="session")
def margin_onnx(margin_ckpt) -> dict[str, Path]:
    pytest.importorskip("onnxruntime_genai")
    from edgeqwen.formats.build import BuildRequest, build
    from edgeqwen.recipes import get_recipe
    recipe = get_recipe("tiny-qwen2")
    return {q: build(BuildRequest(recipe=recipe, quant=q, source=margin_ckpt, name=f"tiny-margin-{q}", smoke=False),
                     log=None) for q in ("int4", "int8")}


@pytest.fixture(scope="session")
def margin_mlx(margin_ckpt) -> dict[str, Path]:
    pytest.importorskip("mlx_lm")
    from edgeqwen.formats.build import BuildRequest, build
    from edgeqwen.recipes import get_recipe
    return {q: build(BuildRequest(recipe=get_recipe("tiny-qwen2"), quant=q, source=margin_ckpt,
                                  name=f"tiny-margin-{q}", smoke=False), log=None) for q in ("mlx4", "mlx_bf16")}


@pytest.fixture(scope="session")
def mlx_builds(tiny_ckpt, tiny_untied_ckpt):
    """MLX builds of the tiny model (mlx4, mlx8, mlx_bf16, and mlx4 of the untied one)."""
    pytest.importorskip("mlx_lm")
    from edgeqwen.formats.build import BuildRequest, build
    from edgeqwen.recipes import get_recipe
    recipe = get_recipe("tiny-qwen2")
    # no smoke child per build: test_synthetic_build_then_run_and_chat takes that path
    out = {q: build(BuildRequest(recipe=recipe, quant=q, source=tiny_ckpt, smoke=False), log=None)
           for q in ("mlx4", "mlx8", "mlx_bf16")}
    out["untied-mlx4"] = build(BuildRequest(recipe=recipe, quant="mlx4", source=tiny_untied_ckpt, smoke=False,
                                            name="tiny-untied-mlx4"), log=None)
    return out


@pytest.fixture(scope="session")
def tiny_f16(tiny_ckpt, tmp_path_factory) -> Path:
    """The tiny checkpoint through our converter alone (no build folder): an f16 GGUF file."""
    from edgeqwen.checkpoints import open_checkpoint
    from edgeqwen.formats.gguf.convert import convert
    out = tmp_path_factory.mktemp("conv") / "tiny-f16.gguf"
    convert(open_checkpoint(tiny_ckpt), out, "f16", name="tiny")
    return out


@pytest.fixture(scope="session")
def tiny_f16_reader(tiny_f16):
    """gguf-py's own reader of tiny_f16 (an independent parse; it reads the 152k-token vocabulary item by item, some
    seconds, so once)."""
    import gguf
    return gguf.GGUFReader(tiny_f16)


@pytest.fixture(params=["repacked", "lean"])
def margin_load(request) -> dict:
    """Both of llama.cpp's kernel paths on whatever CPU runs the test: the normal load (repacked or AMX weights
    where this CPU has them) and the lean one (the file's own layout): load_runner's keywords and the CLI's flags."""
    lean = request.param == "lean"
    return {"name": request.param, "kw": {"lean": lean}, "args": ["--lean"] if lean else []}


@pytest.fixture(scope="session")
def tiny_builds(tiny_ckpt) -> dict[str, Path]:
    """f16 and quantized GGUF builds of the tiny model, built once through the real build path."""
    from edgeqwen.formats.build import BuildRequest, build
    from edgeqwen.recipes import get_recipe
    recipe = get_recipe("tiny-qwen2")
    out = {}
    for q in ("f16", "q8_0", "q4_k_m", "q4_0"):
        out[q] = build(BuildRequest(recipe=recipe, quant=q, source=tiny_ckpt, threads=2), log=None)
    return out


@pytest.fixture(scope="session")
def onnx_builds(tiny_ckpt, tiny_untied_ckpt):
    """Every ONNX precision of the tiny model (and int4/fp32 of the untied one), through the real build path."""
    pytest.importorskip("onnxruntime_genai")
    from edgeqwen.formats.build import BuildRequest, build
    from edgeqwen.recipes import get_recipe
    recipe = get_recipe("tiny-qwen2")
    out = {q: build(BuildRequest(recipe=recipe, quant=q, source=tiny_ckpt), log=None)
           for q in ("int4", "int4_rtn", "int8", "fp32")}
    for q in ("int4", "fp32"):
        out[f"untied-{q}"] = build(BuildRequest(recipe=recipe, quant=q, source=tiny_untied_ckpt,
                                                name=f"tiny-untied-{q}"), log=None)
    return out


@pytest.fixture
def rows(tiny_builds, tmp_path):
    """Rows as bench writes them, from the fake runner, on two devices."""
    from helpers import FP, FakeRunner

    from edgeqwen.measure.bench import BenchConfig, make_row, measure
    cfg = BenchConfig(prompt_tokens=64, gen_tokens=16, repeats=2)
    out = []
    for dev, tg in (("dev-a", 20.0), ("dev-b", 5.0)):
        fp = dict(FP, device_id=dev, cpu="Test CPU" if dev == "dev-a" else "Other CPU")
        for q in ("q8_0", "q4_k_m"):
            result = {"status": "ok", **measure(FakeRunner(tg=tg), cfg),
                      "max_rss": 310 << 20}
            out.append(make_row(str(tiny_builds[q]), 2, cfg, fp, result))
    out.append(make_row(str(tiny_builds["q4_0"]), 2, cfg, FP, {"status": "oom", "error": "killed"}))
    return out


# Fixtures of one test module each, kept here so every fixture is found in one place.

@pytest.fixture(scope="module")
def real_05b() -> Path:
    script = SHARED / "models" / "make_real.py"
    if not script.exists():
        pytest.skip("../shared/models/make_real.py is absent")
    p = subprocess.run([sys.executable, str(script), "0.5b"], capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        pytest.skip(f"make_real.py failed: {p.stderr[-300:]}")
    return Path(p.stdout.strip().splitlines()[-1])


@pytest.fixture
def workers():
    ws = [Worker(), Worker()]
    yield ws
    for w in ws:
        w.stop()


@pytest.fixture(scope="module")
def runner(tiny_builds):
    from edgeqwen.formats.load import load_runner
    r = load_runner(tiny_builds["q8_0"], threads=2, n_ctx=512)
    yield r
    r.close()


@pytest.fixture(scope="session")
def server(margin_builds, margin_onnx):
    """The margin model (tests/margin.py), so answers compared with `run`'s hold on every CPU's kernels; one server
    for the session (the API's tests in several modules), with serve's default --parallel."""
    s = Served([margin_builds["q4_0"], margin_onnx["int8"]])
    yield s
    assert s.stop() == 0   # SIGTERM: a clean exit
    log = s.proc.stderr.read()
    assert "Traceback" not in log, log[-3000:]


@pytest.fixture(scope="module")
def hostile(tiny_builds):
    s = Served([tiny_builds["q4_0"]], "--ctx", "32768")
    s.model = build_name(tiny_builds["q4_0"])
    yield s
    assert s.stop() == 0
    log = s.proc.stderr.read()
    assert "Traceback" not in log and "ClientDisconnect" not in log, log[-3000:]


@pytest.fixture(scope="module")
def other_tokenizer_draft(tmp_path_factory, tiny_ckpt):
    """The tiny checkpoint with two vocabulary entries swapped in its tokenizer: a draft that must be refused."""
    from edgeqwen.formats.build import BuildRequest, build
    from edgeqwen.recipes import get_recipe
    src = tmp_path_factory.mktemp("othertok") / "tiny-qwen2"
    shutil.copytree(tiny_ckpt, src)
    tok = json.loads((src / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (src / "tokenizer.json").write_text(json.dumps(tok))
    return build(BuildRequest(recipe=get_recipe("tiny-qwen2"), quant="q4_0", source=src, name="tiny-othertok-q4_0"),
                 log=None)


@pytest.fixture(scope="module")
def stranger_draft(tiny_untied_ckpt):
    """Same tokenizer, other weights: a draft the target rarely agrees with."""
    from edgeqwen.formats.build import BuildRequest, build
    from edgeqwen.recipes import get_recipe
    return build(BuildRequest(recipe=get_recipe("tiny-qwen2"), quant="q4_0", source=tiny_untied_ckpt,
                              name="tiny-untied-q4_0"), log=None)
