"""Speculative decoding (--draft, --lookup): the output is the target's own, greedy token for token and sampled
in distribution; the draft's KV cache and the target's roll back after rejections; bad drafts are one line."""
import json
from collections import Counter

import numpy as np
import pytest

from helpers import invoke, run_cli


def _greedy(runner, prompt, n=200):
    from edgeqwen.runner import Sampling
    out = list(runner.stream(prompt, Sampling(max_tokens=n, temperature=0, ignore_eos=True)))
    return [r.token for r in out], out[-1]


def assert_targets_own(build, prompt, got, want, tol=1e-3):
    """got (speculative) is want (the target alone), token for token, unless the target itself is at a near tie
    where they part. llama.cpp computes a verify batch with other kernels than one token (llamafile's tinyBLAS for
    2+ rows, a repacked GEMM, against a dot product for one): the sums run in another order, and two logits within
    rounding of each other may come out either way on another CPU. A rollback or acceptance bug parts where the
    target is sure, and fails here."""
    if got == want:
        return
    assert len(got) == len(want), (len(got), len(want))
    i = next(j for j, (a, b) in enumerate(zip(got, want)) if a != b)
    from edgeqwen.formats.load import load_runner
    r = load_runner(build, logits=True, n_ctx=len(prompt) + i + 8)
    try:
        row = r.logits(list(prompt) + want[:i])[-1]
    finally:
        r.close()
    top = np.argsort(row)[-2:]
    margin = float(row[top[1]] - row[top[0]])
    assert {got[i], want[i]} == {int(t) for t in top} and margin < tol, \
        f"token {i}: speculative {got[i]}, target {want[i]}, the target's top two {top.tolist()} {margin:.2e} apart"


@pytest.mark.parametrize("how", ["same-weights", "stranger", "lookup"])
def test_greedy_output_is_the_targets_token_for_token_over_long_generations(tiny_builds, stranger_draft, how):
    from edgeqwen.formats.load import load_runner
    target = load_runner(tiny_builds["f16"])
    draft = {"same-weights": str(tiny_builds["q4_0"]), "stranger": str(stranger_draft), "lookup": "lookup"}[how]
    try:
        for prompt in ([9707, 11, 1879, 0], [40, 1075, 264, 1273] * 30):
            # a fresh runner per prompt: its draft controller has not yet learnt that a stranger does not pay
            spec = load_runner(tiny_builds["f16"], draft=draft)
            try:
                want, _ = _greedy(target, prompt, 200)
                got, last = _greedy(spec, prompt, 200)
                assert_targets_own(tiny_builds["f16"], prompt, got, want)
                c = last.counters["speculative"]
                assert c["drafted"] > 0 and 0 <= c["accepted"] <= c["drafted"]
                # a second turn that extends the first: the rolled-back caches must still be right
                more = prompt + want[:120] + [13]
                assert_targets_own(tiny_builds["f16"], more, _greedy(spec, more, 64)[0], _greedy(target, more, 64)[0])
            finally:
                spec.close()
        if how == "same-weights":   # q4_0 of the same weights agrees with f16 most of the time
            assert c["accepted"] / c["drafted"] > 0.5
    finally:
        target.close()


def test_sampled_output_follows_the_targets_distribution(tiny_builds, stranger_draft):
    """The rejection rule keeps the target's distribution even with a draft that disagrees: the empirical
    distribution of 3-token continuations over many seeds, against the target alone (llama.cpp's own sampler)."""
    from edgeqwen.formats.load import load_runner
    from edgeqwen.runner import Sampling
    n = 400
    prompt = [9707, 11, 1879, 0, 40, 1075]

    def dist(runner):
        seen = Counter()
        for seed in range(n):
            s = Sampling(max_tokens=3, temperature=1.0, top_k=2, top_p=1.0, seed=seed, ignore_eos=True)
            seen[tuple(r.token for r in runner.stream(prompt, s))] += 1
        return seen

    def tv(a, b):
        return 0.5 * sum(abs(a[k] - b[k]) for k in set(a) | set(b)) / n

    target = load_runner(tiny_builds["f16"])
    base = dist(target)
    target.close()
    assert len(base) > 2   # a distribution, not one answer
    for draft in (str(stranger_draft), "lookup"):
        spec = load_runner(tiny_builds["f16"], draft=draft, draft_max=2)
        got = dist(spec)
        spec.close()
        assert set(got) <= set(base) | {k for k in got if got[k] <= 2}   # nothing the target would not say
        # same distribution: total variation within sampling noise (<= 8 outcomes, 400 draws each: ~0.08 expected;
        # a rule that took every draft token gives the draft's own continuations, far outside it)
        assert tv(got, base) < 0.16, (draft, got, base)


def test_warp_keeps_what_llama_cpps_chain_keeps():
    from edgeqwen.formats.gguf.speculate import warp
    x = np.array([0.0, 3.0, 1.0, 2.0, 2.5])
    p = warp(x, 1.0, top_k=3, top_p=1.0, min_p=0.0)
    assert set(np.flatnonzero(p)) == {1, 3, 4} and abs(p.sum() - 1) < 1e-12
    p = warp(x, 1.0, top_k=0, top_p=0.5, min_p=0.0)   # 3.0 alone is 0.49 of the mass: 2.5 is needed too
    assert set(np.flatnonzero(p)) == {1, 4}
    p = warp(x, 0.5, top_k=0, top_p=1.0, min_p=0.5)   # e^-0.5 = 0.61 kept, e^-1 = 0.37 not
    assert set(np.flatnonzero(p)) == {1, 4} and p[1] / p[4] == pytest.approx(np.exp(0.5 / 0.5))


def test_lookup_drafts_what_followed_the_latest_match():
    from edgeqwen.formats.gguf.speculate import lookup_draft
    assert lookup_draft([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 3) == [7, 5, 1]   # the latest earlier "1 2 3"
    assert lookup_draft([1, 2, 3, 4, 2], 2) == [3, 4]   # a 1-gram when nothing longer matches
    assert lookup_draft([1, 2, 3], 4) == []
    assert lookup_draft([5, 5], 0) == []


def test_drafting_stops_where_it_does_not_pay_and_goes_on_where_it_does(monkeypatch):
    """The draft length follows measured speed (a controlled clock here): a draft that is never accepted ends up
    mostly switched off; one whose rounds emit more tokens per second than plain steps keeps drafting, long."""
    import edgeqwen.formats.gguf.speculate as sp
    clock = [0.0]
    monkeypatch.setattr(sp.time, "perf_counter", lambda: clock[0])

    def run(cost, accept, ctl=None, steps=400):
        ctl, ks = ctl or sp.DraftLength(), []
        for _ in range(steps):
            k = ctl.next_k()
            ks.append(k)
            ctl.start()
            if k == 0:
                clock[0] += 1.0   # a plain step: one token per unit
                ctl.done(0, 0, 1)
            else:
                a = k if accept else 0
                clock[0] += cost(k)
                ctl.done(k, a, a + 1)
        return ks, ctl
    useless, ctl = run(lambda k: 1.0 + 0.3 * k, accept=False)
    assert useless[:3] == [0, 0, 0] and useless.count(0) > 0.85 * len(useless)
    # the next answer of the same runner goes on where this one left off: not three fresh probes every answer
    ctl.new_answer()
    assert ctl.counters()["drafted"] == 0
    again, _ = run(lambda k: 1.0 + 0.3 * k, accept=False, ctl=ctl, steps=128)
    assert again.count(0) > 0.95 * len(again)
    good, _ = run(lambda k: 1.0 + 0.2 * k, accept=True)
    tokens = sum(k + 1 for k in good if k) + good.count(0)
    assert max(good) == 8 and good.count(0) < 0.05 * tokens   # plain steps: a few percent of what is emitted


def test_bad_drafts_are_one_line(tiny_builds, other_tokenizer_draft, onnx_builds):
    target = tiny_builds["q8_0"]
    cases = [
        (["--draft", other_tokenizer_draft], "tokenizer differs"),
        (["--draft", onnx_builds["int4"]], "must be a GGUF build"),
        (["--draft", tiny_builds["f16"]], "not smaller than the target"),
        (["--draft", tiny_builds["q4_0"], "--lookup"], "exclude each other"),
        (["--draft", tiny_builds["q4_0"], "--workers", "127.0.0.1:1"], "--workers"),
    ]
    for extra, msg in cases:
        r = run_cli("run", target, "hi", "-n", "4", "-t", "0", *extra)
        assert r.returncode != 0 and msg in r.stderr, (extra, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    r = invoke("run", onnx_builds["int4"], "hi", "-n", "4", "--lookup")
    assert r.returncode != 0 and "need a GGUF target" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_run_with_a_draft_says_what_the_target_says(margin_builds, margin_load, stranger_draft):
    """On both kernel paths: a draft that agrees (the margin model's q4_0), one that does not (random weights,
    same tokenizer), and lookup; the margin model's text cannot part at a near tie on any CPU."""
    args = ("run", margin_builds["f16"], "Count: one two three", "-n", "40", "-t", "0", "--raw", "--json",
            *margin_load["args"])
    plain = run_cli(*args)
    assert plain.returncode == 0, plain.stderr
    for how in (["--draft", margin_builds["q4_0"]], ["--draft", stranger_draft], ["--lookup"]):
        spec = run_cli(*args, *how)
        assert spec.returncode == 0, spec.stderr
        assert json.loads(spec.stdout)["text"] == json.loads(plain.stdout)["text"], how


def test_bench_with_a_draft(tiny_builds, tmp_path):
    out = tmp_path / "rows.jsonl"
    r = run_cli("bench", tiny_builds["f16"], "--lookup", "--repeats", "1", "--prompt-tokens", "32",
                "--gen-tokens", "32", "--out", out)
    assert r.returncode == 0, r.stderr
    row = json.loads(out.read_text().splitlines()[-1])
    s = row["speculative"]
    assert s["draft"] == "lookup" and s["drafted"] >= s["accepted"] >= 0 and 0 <= s["acceptance"] <= 1
    t = invoke("table", out)
    assert t.returncode == 0 and "+ draft lookup" in t.stdout


def test_plan_counts_a_draft_beside_the_target():
    """The expectation comes from the named device's profile (a Pi has no AMX), never from the CPU running it."""
    from edgeqwen.measure.plan import fmt_gib, load_devices, plan
    amx = bool(load_devices()["raspberry-pi-5-4gb"].get("amx"))
    r = invoke("plan", "1.5b", "q8", "--draft", "0.5b:q4_0", "--device", "raspberry-pi-5-4gb")
    assert r.returncode == 0, r.stderr
    t, d = plan("1.5b", "q8_0", amx=amx), plan("0.5b", "q4_0", amx=amx)
    assert f"with draft 0.5b q4_0: + peak RAM {fmt_gib(d.peak_ram)}" in r.stdout
    assert f"peak RAM {fmt_gib(t.peak_ram + d.peak_ram)}, min RAM {fmt_gib(t.min_ram + d.min_ram)} together" in r.stdout
    assert "together fit on raspberry-pi-5-4gb" in r.stdout
    for args, msg in ((("0.5b", "q4_0", "--draft", "1.5b:q8_0"), "not smaller"),
                      (("1.5b", "q8", "--draft", "0.5b:int4"), "GGUF draft")):
        r = invoke("plan", *args)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_token_past_the_drafts_vocabulary_ends_drafting_not_the_answer(tiny_builds, tmp_path):
    """The 7B's embedding is padded to 152064 ids, the 0.5B's to 151936: a padded id in the context (a synthetic
    target can emit one) is past what the draft can read; the answer goes on, plain, and is still the target's."""
    from helpers import tokenizer_dir, tiny_config

    from edgeqwen.formats.build import BuildRequest, build
    from edgeqwen.formats.load import load_runner
    from edgeqwen.recipes import get_recipe
    from edgeqwen.checkpoints.synthetic import write_synthetic
    src = tmp_path / "tiny-wide"
    write_synthetic(src, tiny_config(vocab_size=152064), seed=3, tokenizer=tokenizer_dir())
    wide = build(BuildRequest(recipe=get_recipe("tiny-qwen2"), quant="f16", source=src, name="tiny-wide-f16",
                              out=tmp_path / "wide"), log=None)
    prompt = [9707, 11, 152000, 1879, 0]   # 152000: a padded id the target has and the draft has not
    target = load_runner(wide)
    spec = load_runner(wide, draft=str(tiny_builds["q4_0"]))
    try:
        got, last = _greedy(spec, prompt, 64)
        assert_targets_own(wide, prompt, got, _greedy(target, prompt, 64)[0])
        assert last.counters["speculative"]["drafted"] == 0
    finally:
        target.close()
        spec.close()


def test_the_greedy_check_fails_where_the_target_is_sure(tiny_builds):
    """assert_targets_own lets two tokens part only at a near tie of the target's: a token swapped where the
    target is sure (what a rollback or acceptance bug gives) fails it."""
    from edgeqwen.formats.load import load_runner
    prompt = [9707, 11, 1879, 0]
    target = load_runner(tiny_builds["f16"])
    try:
        want, _ = _greedy(target, prompt, 16)
    finally:
        target.close()
    assert_targets_own(tiny_builds["f16"], prompt, list(want), want)
    wrong = want[:5] + [(want[5] + 1) % 1000] + want[6:]
    with pytest.raises(AssertionError, match="token 5"):
        assert_targets_own(tiny_builds["f16"], prompt, wrong, want)
