"""The arm64 suite: what `make test-arm64` runs inside an emulated Raspberry Pi 5 (tools/test-arm64.sh).

Every test here also runs on x86 in `make test`; the ones about the Pi's identity and the agreement
with x86 only mean something on arm64 and skip elsewhere.
"""
from __future__ import annotations

import json
import os
import platform
import sys

import pytest
from helpers import REPO, invoke, run_cli

pytestmark = pytest.mark.arm64
ON_ARM = platform.machine().lower() in ("aarch64", "arm64")
EMULATED = os.environ.get("EDGEQWEN_EMULATED")


def _greedy(build, n=8):
    from edgeqwen.formats.load import load_runner
    from edgeqwen.runner import Sampling, generate_text
    r = load_runner(build, n_ctx=256)
    try:
        out = list(generate_text(r, "Hello", Sampling(max_tokens=n, temperature=0, ignore_eos=True), raw=True))
    finally:
        r.close()
    return [x.token for x in out]


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_k_m", "q4_0"])
def test_gguf_builds_through_this_machines_quantizer_and_generate(tiny_builds, quant):
    """The fixture built these here, with libllama's quantizer (on ARM: its NEON paths and the Q4_0 repack)."""
    assert len(_greedy(tiny_builds[quant])) == 8


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_onnx_export_and_generate(onnx_builds, quant):
    assert len(_greedy(onnx_builds[quant])) == 8


def test_run(tiny_builds):
    p = run_cli("run", tiny_builds["q4_0"], "Hello", "-n", "4", "-t", "0", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["generation_tokens"] == 4


def test_chat_through_a_pty(tiny_builds):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "edgeqwen.cli", "chat", str(tiny_builds["q4_k_m"]), "--ctx", "256",
                                           "-n", "6", "-t", "0"], env=dict(os.environ, TERM="dumb"),
                          encoding="utf-8", timeout=600)
    try:
        child.expect(">>> ")
        child.sendline("Hi")
        child.expect(r"tok/s · TTFT \d+ ms")
        child.expect(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_bench_one_short_repeat(tiny_builds, tmp_path):
    out = tmp_path / "rows.jsonl"
    p = run_cli("bench", tiny_builds["q4_0"], "--repeats", "1", "--prompt-tokens", "16", "--gen-tokens", "4",
                "--ctx", "128", "--out", out, timeout=1800)
    assert p.returncode == 0, p.stderr
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["status"] == "ok" and row["device"]["arch"] == platform.machine().lower()
    assert row["device"]["emulated"] == bool(EMULATED or row["device"].get("emulator"))
    if EMULATED:   # and the table never shows its speed
        assert row["device"]["emulated"] is True
        p = run_cli("table", out)
        assert p.returncode == 0 and "emulated" in p.stdout and "EMULATED" in p.stdout


def test_survey_quick(tmp_path):
    """The device kit on ARM: a quick synthetic survey; under emulation its rows are marked so (correctness only)."""
    out = tmp_path / "s"
    p = run_cli("survey", "--quick", "--synthetic", "--sizes", "tiny-qwen2", "--out", out, timeout=3600)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for f in out.glob("*.jsonl") for line in f.read_text().splitlines() if line.strip()]
    assert [r["status"] for r in rows] == ["ok"] and rows[0]["device"]["arch"] == platform.machine().lower()
    if EMULATED:
        assert rows[0]["device"]["emulated"] is True and "EMULATED" in next(out.glob("*.md")).read_text()


def test_hw():
    p = invoke("hw", "--json", "--no-bandwidth")
    assert p.returncode == 0, p.stderr
    fp = json.loads(p.stdout)
    assert fp["arch"] == platform.machine().lower()
    if ON_ARM:
        assert {"neon", "dotprod", "fp16"} <= set(fp["isa"]), fp["isa"]
    if EMULATED:   # tools/test-arm64.sh mounts a Pi 5's cpuinfo and device-tree model
        assert fp["device"].startswith("Raspberry Pi 5") and fp["cpu"] == "Cortex-A76" and fp["emulated"] is True


def test_plan():
    p = invoke("plan", "7b", "q4", "--device", "raspberry-pi-5-8gb")
    assert p.returncode == 0 and "fits" in p.stdout


def test_eval_on_an_excerpt(tiny_builds):
    p = run_cli("eval", tiny_builds["q4_0"], "--reference", tiny_builds["f16"], "--text", "en", "--ctx", "64",
                "--windows", "2", "--json", timeout=1800)
    assert p.returncode == 0, p.stderr
    row = json.loads(p.stdout.strip().splitlines()[-1])
    assert row["ppl"] > 1 and 0 <= row["kl_mean"] < 5


VOCAB = os.environ.get("EDGEQWEN_VOCAB_DIR")


@pytest.mark.skipif(not VOCAB, reason="EDGEQWEN_VOCAB_DIR (llama.cpp's ggml-vocab-qwen2.gguf test vectors) unset; "
                    "tools/test-arm64.sh provides them")
def test_llama_cpp_qwen2_tokenizer_vectors():
    """llama.cpp's own Qwen2 tokenizer test vectors (models/ggml-vocab-qwen2.gguf.inp/.out, test-tokenizer-0)."""
    from pathlib import Path

    import llama_cpp
    d = Path(VOCAB)
    raw = (d / "ggml-vocab-qwen2.gguf.inp").read_bytes().decode("utf-8")
    inputs = raw.split("\n__ggml_vocab_test__\n")   # as test-tokenizer-0 reads it: the file ends with a separator
    if inputs[-1] == "":
        inputs.pop()
    outputs = (d / "ggml-vocab-qwen2.gguf.out").read_bytes().decode("utf-8").splitlines()
    assert len(inputs) == len(outputs) == 46, (len(inputs), len(outputs))
    llm = llama_cpp.Llama(model_path=str(d / "ggml-vocab-qwen2.gguf"), vocab_only=True, verbose=False)
    bad = [(t, o) for t, o in zip(inputs, outputs)
           if llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) != [int(x) for x in o.split()]]
    assert not bad, bad[:3]


AGREE = os.environ.get("EDGEQWEN_AGREE_DIR")


@pytest.mark.skipif(not (ON_ARM and AGREE), reason="runs on arm64 against x86 outputs (tools/test-arm64.sh)")
def test_same_builds_agree_with_x86(tiny_builds):
    """The x86 machine's builds of the tiny model, run here: tokens identical, or logits within a small KL."""
    from pathlib import Path
    sys.path.insert(0, str(REPO / "tools" / "arm64"))
    import agreement
    root = Path(AGREE)
    agreement.dump(root, "aarch64")
    res = agreement.compare(root)
    (root / "aarch64" / "results.json").write_text(json.dumps(res, indent=1))
    # the same quantizer here writes the same bytes as on x86 (the builds' sha256, from the same seed)
    same_bytes = {q: agreement.file_hash(tiny_builds[q] / "model.gguf") ==
                  json.loads((root / "builds" / q / "manifest.json").read_text())["sha256"]
                  for q in agreement.GGUF}
    (root / "aarch64" / "same_bytes.json").write_text(json.dumps(same_bytes))
    # measured under qemu (Cortex-A76) against AVX-512: KL at most 1.2e-5 nats, every greedy token the same
    # (bench/ARM64.md); the bound leaves room for other hosts' kernels, not for a wrong kernel
    for q, r in res.items():
        assert r["tokens_identical"] or r["kl_mean"] < 1e-3, (q, r)
        assert r["kl_max"] < 1e-3 and r["top1_agree"] >= 0.95, (q, r)
