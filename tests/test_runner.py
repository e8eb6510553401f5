"""The runner protocol, `edgeqwen run` and its failure modes, on real llama.cpp with the tiny build."""
import json

import pytest
from helpers import invoke, run_cli

from edgeqwen.errors import RunnerError
from edgeqwen.formats.load import load_runner
from edgeqwen.runner import Sampling


def test_stream_carries_measurements(runner):
    tokens = runner.tokenize(runner.apply_chat_template([{"role": "user", "content": "Hello there"}]))
    rs = list(runner.stream(tokens, Sampling(max_tokens=12, temperature=0, ignore_eos=True)))
    assert len(rs) == 12 and all(r.finish_reason is None for r in rs[:-1])
    last = rs[-1]
    assert last.finish_reason == "length" and last.generation_tokens == 12
    assert last.prompt_tokens == len(tokens)
    assert last.ttft_s > 0 and last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_rss > 0
    # the backend's own counters agree on what was evaluated
    assert last.counters["n_eval"] == 11 and last.counters["n_prompt"] >= 1


def test_chat_turns_reuse_the_kv_cache(runner):
    msgs = [{"role": "user", "content": "Hello there, how are you today?"}]
    t1 = runner.tokenize(runner.apply_chat_template(msgs))
    list(runner.stream(t1, Sampling(max_tokens=4, temperature=0, ignore_eos=True)))
    t2 = runner.tokenize(runner.apply_chat_template(msgs + [{"role": "assistant", "content": "fine"},
                                                            {"role": "user", "content": "good"}]))
    last = list(runner.stream(t2, Sampling(max_tokens=2, temperature=0, ignore_eos=True)))[-1]
    assert last.counters["n_prompt"] < len(t2)  # only the new suffix was evaluated


def test_greedy_run_is_reproducible_and_json_parses(margin_builds, margin_load, margin_cycles):
    args = ("run", margin_builds["q4_k_m"], "Tell me a story", "-n", "20", "--seed", "7", "--temperature", "0",
            *margin_load["args"])
    a, b = run_cli(*args), run_cli(*args)
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.strip()
    j = json.loads(run_cli(*args, "--json").stdout)
    from margin import continues
    assert j["text"] == a.stdout.rstrip("\n") and continues(j["text"], margin_cycles["cycle_text"])
    assert {"prompt_tokens", "generation_tokens", "ttft_s", "generation_tps", "peak_rss", "load_s"} <= set(j)


def test_seeded_sampling_is_reproducible(tiny_builds):
    args = ("run", tiny_builds["q8_0"], "Once upon a time", "-n", "16", "--seed", "3", "--temperature", "1.0")
    assert run_cli(*args).stdout == run_cli(*args).stdout


def test_prompt_from_stdin_and_raw(tiny_builds):
    r = run_cli("run", tiny_builds["q8_0"], "--raw", "-n", "5", "-t", "0", input="The capital of France is")
    assert r.returncode == 0 and r.stdout.strip() and r.stderr == ""


def test_build_name_resolution_lists_what_exists(tiny_builds):
    ok = run_cli("run", "tiny-qwen2-q8_0", "hi", "-n", "2")
    assert ok.returncode == 0
    bad = invoke("run", "tiny-qwen2-q9", "hi")
    assert bad.returncode == 2 and "tiny-qwen2-q8_0" in bad.stderr


def _corrupt(tmp_path, src, kind):
    p = tmp_path / f"{kind}.gguf"
    data = src.read_bytes()
    if kind == "truncated":
        p.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        p.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    elif kind == "not-gguf":
        p.write_bytes(b"\x00" * 4096)
    return p


@pytest.mark.parametrize("kind", ["truncated", "garbage", "not-gguf", "missing"])
def test_bad_model_files_give_one_clear_line(tmp_path, tiny_builds, kind):
    path = tmp_path / "nope.gguf" if kind == "missing" else _corrupt(tmp_path, tiny_builds["q8_0"] / "model.gguf", kind)
    r = run_cli("run", path, "hi", "-n", "2")
    assert r.returncode not in (0,) and r.returncode > 0, r.stderr  # a clean exit code, not a signal
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), r.stderr


def test_build_of_a_backend_that_is_not_installed(tmp_path, tiny_builds):
    # Hide onnxruntime-genai from the child, as on a machine that installed only the gguf extra.
    hide = tmp_path / "hide" / "onnxruntime_genai"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    d = tmp_path / "onnx-build"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"name": "onnx-build", "format": "onnx", "file": "model.onnx",
                                                 "quant": "int4", "file_size": 1}))
    r = run_cli("run", d, "hi", env={"PYTHONPATH": str(hide.parent)})
    assert r.returncode != 0 and "onnxruntime_genai" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_context_overflow_drops_oldest_turns(runner):
    from edgeqwen.cli.chat import fit_history
    history = []
    for i in range(40):
        history += [{"role": "user", "content": f"question number {i} " * 5},
                    {"role": "assistant", "content": f"answer number {i} " * 5}]
    history.append({"role": "user", "content": "last"})
    tokens, dropped = fit_history(runner, "be brief", history, reserve=64)
    assert dropped > 0 and len(tokens) + 64 <= runner.n_ctx
    assert history[-1]["content"] == "last" and history[0]["role"] == "user"


def test_generation_stops_at_the_context(tiny_builds):
    r = load_runner(tiny_builds["q8_0"], threads=2, n_ctx=64)
    try:
        toks = r.tokenize("word " * 40)
        last = list(r.stream(toks, Sampling(max_tokens=500, temperature=0, ignore_eos=True)))[-1]
        # llama.cpp may round the context up; the runner reports what it got
        assert 64 <= r.n_ctx <= 512
        assert last.finish_reason == "length" and len(toks) + last.generation_tokens == r.n_ctx
        with pytest.raises(RunnerError, match="context"):
            list(r.stream(r.tokenize("word " * (r.n_ctx + 10)), Sampling(max_tokens=5)))
    finally:
        r.close()
