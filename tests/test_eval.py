"""eval: the metrics against an independent computation, and real runs on the tiny builds."""
import json
import math

import numpy as np
import pytest

from conftest import run_cli
from edgeqwen.evaluate import ChunkStats, load_text


def _reference_metrics(logits, ref, targets):
    """Plain-Python softmax, NLL, KL and argmax, one position at a time."""
    nll = rnll = kl = top1 = 0.0
    for lo, re_, t in zip(logits.tolist(), ref.tolist(), targets.tolist()):
        zb = math.log(sum(math.exp(x - max(lo)) for x in lo)) + max(lo)
        zr = math.log(sum(math.exp(x - max(re_)) for x in re_)) + max(re_)
        nll += zb - lo[t]
        rnll += zr - re_[t]
        kl += sum(math.exp(r - zr) * ((r - zr) - (b - zb)) for r, b in zip(re_, lo))
        top1 += lo.index(max(lo)) == re_.index(max(re_))
    n = len(targets)
    return {"ppl": math.exp(nll / n), "ref_ppl": math.exp(rnll / n), "kl_mean": kl / n, "top1": top1 / n}


def test_metrics_match_an_independent_computation():
    rng = np.random.default_rng(0)
    stats = ChunkStats()
    all_l, all_r, all_t = [], [], []
    for _ in range(3):  # sums over chunks add up
        ref = rng.normal(size=(20, 50)).astype(np.float32) * 3
        logits = ref + rng.normal(size=ref.shape).astype(np.float32)
        targets = rng.integers(0, 50, size=20)
        stats.add(logits, ref, targets)
        all_l.append(logits), all_r.append(ref), all_t.append(targets)
    got = stats.result()
    want = _reference_metrics(np.concatenate(all_l), np.concatenate(all_r), np.concatenate(all_t))
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k


def test_kl_of_identical_distributions_is_zero():
    x = np.random.default_rng(1).normal(size=(10, 30)).astype(np.float32)
    s = ChunkStats()
    s.add(x, x.copy(), np.arange(10))
    r = s.result()
    assert r["kl_mean"] == 0.0 and r["top1"] == 1.0 and r["ppl"] == pytest.approx(r["ref_ppl"])


def test_bundled_texts_are_a_few_thousand_tokens():
    for lang in ("en", "zh"):
        label, text = load_text(lang)
        assert label == lang and len(text) > 2000


def test_build_against_itself_has_zero_kl(tiny_builds):
    b = tiny_builds["q8_0"]
    r = run_cli("eval", b, "--reference", b, "--text", "en", "--ctx", "128", "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["kl_mean"] == 0.0 and row["top1"] == 1.0 and row["ppl"] == pytest.approx(row["ref_ppl"])


def test_quantized_build_against_its_f16_reference(tiny_builds, tmp_path):
    out = tmp_path / "q.jsonl"
    r = run_cli("eval", tiny_builds["q4_0"], "--ctx", "128", "--out", out)  # reference: the f16 build, found
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["text"] for x in rows] == ["en", "zh"]
    for x in rows:
        assert x["kl_mean"] > 0 and 0 < x["top1"] <= 1 and x["ppl"] > 1 and x["reference"].endswith("model.gguf")
        assert "tiny-qwen2-f16" in x["reference"]
    t = run_cli("table", out)
    assert t.returncode == 0 and "Quality" in t.stdout and "tiny-qwen2-q4_0" in t.stdout
