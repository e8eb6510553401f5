"""Log-probabilities (Sampling.logprobs, the API's logprobs/top_logprobs): every format reports, for each token it
generates, the log-softmax of the logits it chose the token from, the same numbers its own logits() (what eval
scores) gives for those tokens."""
import numpy as np
import pytest

from edgeqwen.runner import Sampling, logprobs_of


def test_logprobs_of_is_a_log_softmax_with_the_top_in_order():
    row = np.array([1.0, 3.0, 2.0, 3.0, -1.0], dtype=np.float32)
    lp, top = logprobs_of(row, 2, 3)
    ref = row - np.log(np.exp(row).sum())
    assert lp == pytest.approx(ref[2])
    assert [t for t, _ in top] == [1, 3, 2] and [v for _, v in top] == pytest.approx([ref[1], ref[3], ref[2]])
    assert logprobs_of(row, 4, 0)[1] == []
    assert sum(np.exp(v) for _, v in logprobs_of(row, 0, 5)[1]) == pytest.approx(1.0)


def _scored(runner, prompt_ids, sampling):
    out = [r for r in runner.stream(prompt_ids, sampling) if r.token is not None]
    return [r.token for r in out], out


def _check(stream_runner, logits_runner, top=3, sampled=False, tol=2e-2):
    prompt = stream_runner.tokenize(stream_runner.apply_chat_template([{"role": "user", "content": "Hello"}]))
    s = Sampling(max_tokens=12, temperature=0.9 if sampled else 0, seed=3, ignore_eos=True, logprobs=top)
    toks, out = _scored(stream_runner, prompt, s)
    assert len(toks) == 12
    ref = np.asarray(logits_runner.logits(prompt + toks), dtype=np.float64)
    ref = ref - (ref.max(axis=1, keepdims=True) + np.log(np.exp(ref - ref.max(axis=1, keepdims=True))
                                                           .sum(axis=1, keepdims=True)))
    for i, r in enumerate(out):
        row = ref[len(prompt) - 1 + i]
        assert r.logprob == pytest.approx(row[r.token], abs=tol), i
        assert len(r.top_logprobs) == top
        assert [v for _, v in r.top_logprobs] == sorted((v for _, v in r.top_logprobs), reverse=True)
        assert r.top_logprobs[0][1] == pytest.approx(row.max(), abs=tol)
        if not sampled:   # greedy: the chosen token is the most likely one
            assert r.top_logprobs[0][0] == r.token
    plain = list(stream_runner.stream(prompt, Sampling(max_tokens=2, temperature=0, ignore_eos=True)))
    assert all(r.logprob is None and r.top_logprobs is None for r in plain)


@pytest.mark.parametrize("sampled", [False, True])
def test_gguf_logprobs_match_its_logits(margin_builds, sampled):
    from edgeqwen.formats.load import load_runner
    a, b = load_runner(margin_builds["q8_0"], n_ctx=256), load_runner(margin_builds["q8_0"], n_ctx=256, logits=True)
    try:
        _check(a, b, sampled=sampled)
    finally:
        a.close()
        b.close()


def test_gguf_logprobs_turn_drafting_off_for_that_answer(margin_builds):
    from edgeqwen.formats.load import load_runner
    a = load_runner(margin_builds["q8_0"], n_ctx=256, draft="lookup")
    b = load_runner(margin_builds["q8_0"], n_ctx=256, logits=True)
    try:
        _check(a, b)
        assert "speculative" not in list(a.stream([9707, 11], Sampling(max_tokens=3, temperature=0,
                                                                       logprobs=0)))[-1].counters
    finally:
        a.close()
        b.close()


def test_onnx_logprobs_match_its_logits(margin_onnx):
    from edgeqwen.formats.load import load_runner
    a = load_runner(margin_onnx["int8"], n_ctx=256)
    b = load_runner(margin_onnx["int8"], n_ctx=256, logits=True)
    try:
        _check(a, b)
    finally:
        a.close()
        b.close()


def test_mlx_logprobs_match_its_logits(margin_mlx):
    from edgeqwen.formats.load import load_runner
    a = load_runner(margin_mlx["mlx_bf16"], n_ctx=256)
    try:
        _check(a, a, tol=5e-2)
    finally:
        a.close()


def test_every_format_gives_the_same_bytes_for_a_token(margin_builds, margin_onnx, margin_mlx):
    """Folder formats read a token's bytes from tokenizer.json's byte-level spelling; llama.cpp from its vocab."""
    from edgeqwen.formats.load import load_runner
    runners = [load_runner(b, n_ctx=64) for b in (margin_builds["q4_0"], margin_onnx["int8"], margin_mlx["mlx4"])]
    try:
        ids = [*range(0, 300), *range(100000, 100200), 151643, 151644, 151645]
        ids += runners[0].tokenize("naïve café — 你好 🙂 \x01")
        for i in ids:
            want = runners[0].token_bytes(i)
            assert all(r.token_bytes(i) == want for r in runners[1:]), (i, want)
        assert b"".join(runners[0].token_bytes(t) for t in runners[0].tokenize("你好 🙂", special=False)) \
            == "你好 🙂".encode()
    finally:
        for r in runners:
            r.close()


# --- the HTTP API, with the openai client ------------------------------------------------------------------------

MSGS = [{"role": "user", "content": "Hello"}]


def _reference(build, n):
    """(token bytes, log-probabilities) of the greedy answer to MSGS, from the runner's own logits()."""
    from edgeqwen.formats.load import load_runner
    r = load_runner(build, n_ctx=256, logits=True)
    try:
        prompt = r.tokenize(r.apply_chat_template(MSGS))
        toks = [x.token for x in r.stream(prompt, Sampling(max_tokens=n, temperature=0, ignore_eos=True))]
        ref = np.asarray(r.logits(prompt + toks), dtype=np.float64)[len(prompt) - 1:-1]
        ref = ref - (ref.max(axis=1, keepdims=True)
                     + np.log(np.exp(ref - ref.max(axis=1, keepdims=True)).sum(axis=1, keepdims=True)))
        return [r.token_bytes(t) for t in toks], [float(row[t]) for row, t in zip(ref, toks)]
    finally:
        r.close()


@pytest.mark.parametrize("which", ["gguf", "onnx"])
def test_chat_logprobs_streamed_and_not_agree_with_the_runners_logits(server, margin_builds, margin_onnx, which):
    from helpers import build_name
    build = margin_builds["q4_0"] if which == "gguf" else margin_onnx["int8"]
    c, model = server.client(), build_name(build)
    kw = dict(model=model, messages=MSGS, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2,
              extra_body={"ignore_eos": True})
    r = c.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    assert b"".join(bytes(t.bytes) for t in content) == r.choices[0].message.content.encode()
    want_bytes, want_lp = _reference(build, 8)
    assert [bytes(t.bytes) for t in content] == want_bytes
    assert [t.logprob for t in content] == pytest.approx(want_lp, abs=2e-2)
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].bytes == t.bytes   # greedy: the chosen is the top
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
    streamed = [x for ch in c.chat.completions.create(**kw, stream=True) if ch.choices and ch.choices[0].logprobs
                for x in ch.choices[0].logprobs.content]
    assert [(bytes(t.bytes), t.logprob) for t in streamed] == [(bytes(t.bytes), t.logprob) for t in content]
    plain = c.chat.completions.create(model=model, messages=MSGS, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_completions_logprobs_columns(server, margin_builds):
    from helpers import build_name
    c = server.client()
    r = c.completions.create(model=build_name(margin_builds["q4_0"]), prompt="Hello there", max_tokens=6,
                             temperature=0, logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    assert all(len(d) <= 3 and max(d.values()) == pytest.approx(v, abs=1e-6)
               for d, v in zip(lp.top_logprobs, lp.token_logprobs))


@pytest.mark.parametrize("body,words", [
    ({"logprobs": True, "top_logprobs": 99}, "top_logprobs"),
    ({"top_logprobs": 2}, "needs logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"logprobs": "yes"}, "logprobs"),
])
def test_bad_logprobs_requests_are_a_400(server, margin_builds, body, words):
    import httpx
    from helpers import build_name
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": build_name(margin_builds["q4_0"]),
                                                              "messages": MSGS, "max_tokens": 2, **body})
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    r = httpx.post(server.url + "/v1/completions", json={"model": build_name(margin_builds["q4_0"]),
                                                         "prompt": "Hi", "max_tokens": 2, "logprobs": 6})
    assert r.status_code == 400 and "logprobs" in r.json()["error"]["message"], r.text
