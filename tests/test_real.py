"""Slow tests on the real 0.5B checkpoint from ../shared/models/make_real.py (make test-slow)."""
import json
import subprocess
import sys

import pytest
from helpers import run_cli

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("quant", ["q4", "q8", "f16", "int4", "int8"])
def test_real_builds_answer_coherently(real_05b, tmp_path_factory, quant):
    out = tmp_path_factory.mktemp("real") / quant
    r = run_cli("build", "0.5b", quant, "--source", real_05b, "--out", out, timeout=1800)
    assert r.returncode == 0, r.stderr
    r = run_cli("run", out, "What is the capital of France? Answer in one word.", "-t", "0", "-n", "16", "--json")
    assert r.returncode == 0, r.stderr
    assert "paris" in json.loads(r.stdout)["text"].lower()
    r = run_cli("run", out, "用一个词回答：中国的首都是哪里？", "-t", "0", "-n", "16")
    assert "北京" in r.stdout


@pytest.mark.parametrize("bits", [4, 8])
def test_real_mlx_builds_equal_mlx_lm_convert_and_answer(real_05b, tmp_path, bits):
    """Our streamed MLX writer against `mlx_lm convert -q --q-bits N` of the real 0.5B: identical tensors; and
    mlx-lm runs our folder to the right answer."""
    mx = pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    ours = tmp_path / "ours"
    r = run_cli("build", "0.5b", f"mlx{bits}", "--source", real_05b, "--out", ours, "--no-smoke", timeout=1800)
    assert r.returncode == 0, r.stderr
    p = subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(real_05b), "--mlx-path",
                        str(tmp_path / "theirs"), "-q", "--q-bits", str(bits)], capture_output=True, text=True,
                       timeout=1800)
    assert p.returncode == 0, p.stderr[-2000:]
    from edgeqwen.formats.mlx.thread import on_mlx_thread

    def differ():   # on the MLX thread, which clears its streams before the process ends
        a = mx.load(str(ours / "model.safetensors"))
        b = {}
        for f in (tmp_path / "theirs").glob("*.safetensors"):
            b.update(mx.load(str(f)))
        assert sorted(a) == sorted(b)
        return [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
                or not mx.array_equal(a[k], b[k]).item()]
    assert on_mlx_thread(differ) == []
    r = run_cli("run", ours, "What is the capital of France? Answer in one word.", "-t", "0", "-n", "4", "--json",
                timeout=1800)
    assert r.returncode == 0, r.stderr
    assert "Paris" in json.loads(r.stdout)["text"]
