"""Slow tests on the real 0.5B checkpoint from ../shared/models/make_real.py (make test-slow)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_05b() -> Path:
    script = SHARED / "models" / "make_real.py"
    if not script.exists():
        pytest.skip("../shared/models/make_real.py is absent")
    p = subprocess.run([sys.executable, str(script), "0.5b"], capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        pytest.skip(f"make_real.py failed: {p.stderr[-300:]}")
    return Path(p.stdout.strip().splitlines()[-1])


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
