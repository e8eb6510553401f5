"""Shared fixtures: a tiny random Qwen2 built once per session through the synthetic path."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# A shell without job control starts `make test &` with SIGINT ignored, and children inherit that: the
# Ctrl-C tests would then see no Ctrl-C at all. They test our handling, so give the children the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parent.parent
# EDGEQWEN_TEST_NO_SHARED=1 runs the suite as a fresh clone without ../shared beside it (what a new user has);
# .ci/run runs the tests whose fixtures depend on it that way too.
SHARED = REPO.parent / "shared" if not os.environ.get("EDGEQWEN_TEST_NO_SHARED") else REPO / ".no-shared"
REAL_TOKENIZER = SHARED / "fixtures" / "qwen2-tokenizer"

# Small, but with K-quant-friendly widths (multiples of 256) so quantized kernels, AMX included,
# take their real paths.
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)

TINY_RECIPE = """
name = "tiny-qwen2"
size = "tiny"
arch = "qwen2"
hub_repo = "edgeqwen-test/tiny-qwen2"
revision = "main"
context_length = 32768
tied_embeddings = true

[aliases]
q4 = "q4_k_m"
q8 = "q8_0"

[config]
hidden_size = 256
intermediate_size = 512
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
vocab_size = 151936
max_position_embeddings = 32768
rope_theta = 1000000.0
rms_norm_eps = 1e-06
bos_token_id = 151643
eos_token_id = 151645
"""


def tiny_config(**over) -> dict:
    from edgeqwen.recipes import get_recipe
    cfg = get_recipe("0.5b").hf_config()
    cfg.update(TINY)
    cfg.update(over)
    return cfg


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


def _tokenizer_dir():
    return REAL_TOKENIZER if REAL_TOKENIZER.exists() else None


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny tied Qwen2 checkpoint (real tokenizer when ../shared has it, else the generated one)."""
    from edgeqwen.synthetic import write_synthetic
    out = tmp_path_factory.mktemp("tiny") / "tiny-qwen2"
    write_synthetic(out, tiny_config(), seed=1, tokenizer=_tokenizer_dir())
    return out


@pytest.fixture(scope="session")
def tiny_untied_ckpt(tmp_path_factory) -> Path:
    from edgeqwen.synthetic import write_synthetic
    out = tmp_path_factory.mktemp("tiny") / "tiny-untied"
    write_synthetic(out, tiny_config(tie_word_embeddings=False, vocab_size=151936), seed=2,
                    tokenizer=_tokenizer_dir())
    return out


@pytest.fixture(scope="session")
def margin_ckpt(tmp_path_factory) -> Path:
    """The tiny model whose greedy text is the same on every kernel path (tests/margin.py)."""
    from margin import write_margin
    out = tmp_path_factory.mktemp("margin") / "tiny-margin"
    write_margin(out, tiny_config(tie_word_embeddings=False), tokenizer=_tokenizer_dir())
    return out


@pytest.fixture(scope="session")
def margin_cycles(margin_ckpt) -> dict:
    """What the margin model says: its printable cycle after any chat prompt, its control cycle after STEER_TEXT."""
    import json
    return json.loads((margin_ckpt / "margin.json").read_text())


@pytest.fixture(scope="session")
def margin_builds(margin_ckpt) -> dict[str, Path]:
    """GGUF builds of the margin model: f16, q8_0, q4_k_m, q4_0 (each with its own kernels on every CPU)."""
    from edgeqwen.build import BuildRequest, build
    from edgeqwen.recipes import get_recipe
    recipe = get_recipe("tiny-qwen2")
    return {q: build(BuildRequest(recipe=recipe, quant=q, source=margin_ckpt, name=f"tiny-margin-{q}", threads=2),
                     log=None) for q in ("f16", "q8_0", "q4_k_m", "q4_0")}


@pytest.fixture(scope="session")
def margin_onnx(margin_ckpt) -> dict[str, Path]:
    pytest.importorskip("onnxruntime_genai")
    from edgeqwen.build import BuildRequest, build
    from edgeqwen.recipes import get_recipe
    recipe = get_recipe("tiny-qwen2")
    return {q: build(BuildRequest(recipe=recipe, quant=q, source=margin_ckpt, name=f"tiny-margin-{q}"), log=None)
            for q in ("int4", "int8")}


@pytest.fixture(scope="session")
def margin_mlx(margin_ckpt) -> dict[str, Path]:
    pytest.importorskip("mlx_lm")
    from edgeqwen.build import BuildRequest, build
    from edgeqwen.recipes import get_recipe
    return {q: build(BuildRequest(recipe=get_recipe("tiny-qwen2"), quant=q, source=margin_ckpt,
                                  name=f"tiny-margin-{q}", smoke=False), log=None) for q in ("mlx4", "mlx_bf16")}


@pytest.fixture(params=["repacked", "lean"])
def margin_load(request) -> dict:
    """Both of llama.cpp's kernel paths on whatever CPU runs the test: the normal load (repacked or AMX weights
    where this CPU has them) and the lean one (the file's own layout): load_runner's keywords and the CLI's flags."""
    lean = request.param == "lean"
    return {"name": request.param, "kw": {"lean": lean}, "args": ["--lean"] if lean else []}


@pytest.fixture(scope="session")
def tiny_builds(tiny_ckpt) -> dict[str, Path]:
    """f16 and quantized GGUF builds of the tiny model, built once through the real build path."""
    from edgeqwen.build import BuildRequest, build
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
    from edgeqwen.build import BuildRequest, build
    from edgeqwen.recipes import get_recipe
    recipe = get_recipe("tiny-qwen2")
    out = {q: build(BuildRequest(recipe=recipe, quant=q, source=tiny_ckpt), log=None)
           for q in ("int4", "int4_rtn", "int8", "fp32")}
    for q in ("int4", "fp32"):
        out[f"untied-{q}"] = build(BuildRequest(recipe=recipe, quant=q, source=tiny_untied_ckpt,
                                                name=f"tiny-untied-{q}"), log=None)
    return out


def interrupted_build(module, monkeypatch, tiny_ckpt, out, quant) -> None:
    """A build whose builder's progress bar raises KeyboardInterrupt (Ctrl-C mid-write), through the real path."""
    import contextlib

    from edgeqwen.build import BuildRequest, build
    from edgeqwen.recipes import get_recipe

    @contextlib.contextmanager
    def interrupting_bar(label, total, unit="B"):
        def upd(n):
            raise KeyboardInterrupt
        yield upd
    monkeypatch.setattr(module, "bar", interrupting_bar)
    with pytest.raises(KeyboardInterrupt):
        build(BuildRequest(recipe=get_recipe("tiny-qwen2"), quant=quant, source=tiny_ckpt, out=out), log=None)


def two_chat_turns(runner, greedy) -> tuple[list[int], list]:
    """A first turn, then a second whose prompt extends the first's answer: (the second prompt, its Responses),
    which must reuse the first turn's KV."""
    t1 = runner.tokenize(runner.apply_chat_template([{"role": "user", "content": "Hello there, how are you?"}]))
    first = list(runner.stream(t1, greedy))
    t2 = (t1 + [x.token for x in first if x.token is not None]
          + runner.tokenize("\n<|im_start|>user\nAnd you?<|im_end|>\n"))
    reused = list(runner.stream(t2, greedy))
    assert reused[-1].cached_tokens > len(t1) // 2
    return t2, reused


def run_cli(*args, input=None, env=None, timeout=300, cwd=None) -> subprocess.CompletedProcess:
    """The real command in a child process (so crashes and exit codes are real)."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "edgeqwen.cli", *map(str, args)], input=input,
                          capture_output=True, text=True, env=e, timeout=timeout, cwd=cwd)


def needs_real_tokenizer():
    return pytest.mark.skipif(not REAL_TOKENIZER.exists(), reason="../shared/fixtures/qwen2-tokenizer is absent")
