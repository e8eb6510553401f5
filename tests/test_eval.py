"""eval: the metrics against an independent computation, and real runs on the tiny builds."""
import json
import math

import numpy as np
import pytest

from helpers import invoke, run_cli
from edgeqwen.measure.evaluate import ChunkStats, load_text


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
        ref = rng.normal(size=(70, 50)).astype(np.float32) * 3  # more rows than ChunkStats takes at a time
        logits = ref + rng.normal(size=ref.shape).astype(np.float32)
        targets = rng.integers(0, 50, size=70)
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
    r = run_cli("eval", b, "--reference", b, "--text", "en", "--ctx", "128", "--windows", "2", "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["kl_mean"] == 0.0 and row["top1"] == 1.0 and row["ppl"] == pytest.approx(row["ref_ppl"])


def test_quantized_build_against_its_f16_reference(tiny_builds, tmp_path):
    out = tmp_path / "q.jsonl"
    # reference: the f16 build, found
    r = run_cli("eval", tiny_builds["q4_0"], "--ctx", "128", "--windows", "2", "--out", out)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["text"] for x in rows] == ["en", "zh"]
    for x in rows:
        assert x["kl_mean"] > 0 and 0 < x["top1"] <= 1 and x["ppl"] > 1 and x["reference"].endswith("model.gguf")
        assert "tiny-qwen2-f16" in x["reference"]
    t = invoke("table", out)
    assert t.returncode == 0 and "Quality" in t.stdout and "tiny-qwen2-q4_0" in t.stdout


def _numpy_metrics(windows_logits, windows_ref, windows_tokens, ctx):
    """PPL, KL(ref || build) and top-1 from raw logits, scoring the second half of each window."""
    def logp(x):
        x = np.asarray(x, dtype=np.float64)
        return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)
    nll, kl, top1, n = 0.0, 0.0, 0, 0
    for lo, re_, toks in zip(windows_logits, windows_ref, windows_tokens):
        pos = np.arange(ctx // 2, ctx - 1)  # position p predicts token p + 1
        lb, lr = logp(lo[pos]), logp(re_[pos])
        nll -= lb[np.arange(len(pos)), np.asarray(toks)[pos + 1]].sum()
        kl += (np.exp(lr) * (lr - lb)).sum()
        top1 += int((lb.argmax(-1) == lr.argmax(-1)).sum())
        n += len(pos)
    return {"ppl": math.exp(nll / n), "kl_mean": kl / n, "top1": top1 / n, "tokens_scored": n}


def _llama_logits(model, tokens):
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=len(tokens), n_batch=len(tokens), logits_all=True,
                          flash_attn=True, verbose=False)   # the runner's setting: same kernels, same logits
    llm.eval(tokens)
    out = np.array(llm.scores[: len(tokens)])
    llm.close()
    return out


def _excerpt(tmp_path, lang, chars):
    """The start of a bundled text as a --text FILE (a few windows keep the independent pass quick)."""
    p = tmp_path / f"{lang}.txt"
    p.write_text(load_text(lang)[1][:chars], encoding="utf-8")
    return p


def test_eval_of_a_gguf_build_matches_numpy_on_llama_cpp_logits(tiny_builds, tmp_path):
    """The whole command (windows, targets, reference) against logits taken from llama.cpp directly."""
    import llama_cpp
    ctx = 128
    text = _excerpt(tmp_path, "en", 3000)
    # three windows, whatever the tokenizer makes of the text (the generated one makes more tokens of it)
    r = run_cli("eval", tiny_builds["q4_0"], "--text", text, "--ctx", ctx, "--windows", 3, "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    vocab_llm = llama_cpp.Llama(model_path=str(tiny_builds["f16"] / "model.gguf"), vocab_only=True, verbose=False)
    toks = vocab_llm.tokenize(text.read_text(encoding="utf-8").encode(), add_bos=False, special=False)
    wins = [toks[i:i + ctx] for i in range(0, len(toks) - ctx + 1, ctx)][:3]
    got = [_llama_logits(tiny_builds["q4_0"] / "model.gguf", w) for w in wins]
    ref = [_llama_logits(tiny_builds["f16"] / "model.gguf", w) for w in wins]
    want = _numpy_metrics(got, ref, wins, ctx)
    assert len(wins) >= 3 and row["tokens_scored"] == want["tokens_scored"] == len(wins) * (ctx // 2 - 1)
    assert row["ppl"] == pytest.approx(want["ppl"], rel=1e-4)
    assert row["kl_mean"] == pytest.approx(want["kl_mean"], rel=1e-3) and row["kl_mean"] > 0
    assert row["top1"] == pytest.approx(want["top1"], abs=1.5 / want["tokens_scored"])


def _ort_logits(folder, tokens):
    """Logits from the ONNX graph through plain onnxruntime (no genai): empty past, one pass."""
    import onnxruntime as ort
    cfg = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    s = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {"input_ids": np.array([tokens], dtype=np.int64), "attention_mask": np.ones((1, len(tokens)), np.int64)}
    for i in range(cfg["num_hidden_layers"]):
        for kv in ("key", "value"):
            feed[f"past_key_values.{i}.{kv}"] = np.zeros((1, cfg["num_key_value_heads"], 0, cfg["head_size"]),
                                                         np.float32)
    return s.run(["logits"], feed)[0][0]


def test_eval_of_an_onnx_build_matches_numpy_on_onnxruntime_logits(onnx_builds, tmp_path):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer
    ctx = 128
    text = _excerpt(tmp_path, "zh", 1000)
    r = run_cli("eval", onnx_builds["int4"], "--text", text, "--ctx", ctx, "--windows", 3,
                "--json")  # reference: the fp32 build
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    toks = Tokenizer.from_file(str(onnx_builds["fp32"] / "tokenizer.json")).encode(
        text.read_text(encoding="utf-8"), add_special_tokens=False).ids
    wins = [toks[i:i + ctx] for i in range(0, len(toks) - ctx + 1, ctx)][:3]
    got = [_ort_logits(onnx_builds["int4"], w) for w in wins]
    ref = [_ort_logits(onnx_builds["fp32"], w) for w in wins]
    want = _numpy_metrics(got, ref, wins, ctx)
    assert len(wins) >= 3 and row["tokens_scored"] == want["tokens_scored"]
    assert row["ppl"] == pytest.approx(want["ppl"], rel=1e-3)
    assert row["kl_mean"] == pytest.approx(want["kl_mean"], rel=1e-2) and row["kl_mean"] > 0
    assert row["top1"] == pytest.approx(want["top1"], abs=2.5 / want["tokens_scored"])
