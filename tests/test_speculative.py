"""Speculative decoding (--draft, --lookup): the output is the target's own, greedy token for token and sampled
in distribution; the draft's KV cache and the target's roll back after rejections; bad drafts are one line."""
import json
import shutil
from collections import Counter

import numpy as np
import pytest

from conftest import run_cli


def _greedy(runner, prompt, n=200):
    from edgeqwen.runner import Sampling
    out = list(runner.stream(prompt, Sampling(max_tokens=n, temperature=0, ignore_eos=True)))
    return [r.token for r in out], out[-1]


@pytest.fixture(scope="module")
def other_tokenizer_draft(tmp_path_factory, tiny_ckpt):
    """The tiny checkpoint with two vocabulary entries swapped in its tokenizer: a draft that must be refused."""
    from edgeqwen.build import BuildRequest, build
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
    from edgeqwen.build import BuildRequest, build
    from edgeqwen.recipes import get_recipe
    return build(BuildRequest(recipe=get_recipe("tiny-qwen2"), quant="q4_0", source=tiny_untied_ckpt,
                              name="tiny-untied-q4_0"), log=None)


@pytest.mark.parametrize("how", ["same-weights", "stranger", "lookup"])
def test_greedy_output_is_the_targets_token_for_token_over_long_generations(tiny_builds, stranger_draft, how):
    from edgeqwen.formats.load import load_runner
    target = load_runner(tiny_builds["f16"])
    draft = {"same-weights": str(tiny_builds["q4_0"]), "stranger": str(stranger_draft), "lookup": "lookup"}[how]
    spec = load_runner(tiny_builds["f16"], draft=draft)
    try:
        for prompt in ([9707, 11, 1879, 0], [40, 1075, 264, 1273] * 30, [785, 3974, 13876, 38835] * 3):
            want, _ = _greedy(target, prompt, 300)
            got, last = _greedy(spec, prompt, 300)
            assert got == want
            c = last.counters["speculative"]
            assert c["drafted"] > 0 and 0 <= c["accepted"] <= c["drafted"]
            # a second turn that extends the first: the rolled-back caches must still be right
            more = prompt + want[:150] + [13]
            assert _greedy(spec, more, 100)[0] == _greedy(target, more, 100)[0]
        if how == "same-weights":   # q4_0 of the same weights agrees with f16 most of the time
            assert c["accepted"] / c["drafted"] > 0.5
    finally:
        target.close()
        spec.close()


def test_sampled_output_follows_the_targets_distribution(tiny_builds, stranger_draft):
    """The rejection rule keeps the target's distribution even with a draft that disagrees: the empirical
    distribution of 3-token continuations over many seeds, against the target alone (llama.cpp's own sampler)."""
    from edgeqwen.formats.load import load_runner
    from edgeqwen.runner import Sampling
    n = 600
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
        # same distribution: total variation within sampling noise (8 outcomes, 600 draws each: ~0.05 expected)
        assert tv(got, base) < 0.12, (draft, got, base)


def test_warp_keeps_what_llama_cpps_chain_keeps():
    from edgeqwen.speculative import warp
    x = np.array([0.0, 3.0, 1.0, 2.0, 2.5])
    p = warp(x, 1.0, top_k=3, top_p=1.0, min_p=0.0)
    assert set(np.flatnonzero(p)) == {1, 3, 4} and abs(p.sum() - 1) < 1e-12
    p = warp(x, 1.0, top_k=0, top_p=0.5, min_p=0.0)   # 3.0 alone is 0.49 of the mass: 2.5 is needed too
    assert set(np.flatnonzero(p)) == {1, 4}
    p = warp(x, 0.5, top_k=0, top_p=1.0, min_p=0.5)   # e^-0.5 = 0.61 kept, e^-1 = 0.37 not
    assert set(np.flatnonzero(p)) == {1, 4} and p[1] / p[4] == pytest.approx(np.exp(0.5 / 0.5))


def test_lookup_drafts_what_followed_the_latest_match():
    from edgeqwen.speculative import lookup_draft
    assert lookup_draft([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 3) == [7, 5, 1]   # the latest earlier "1 2 3"
    assert lookup_draft([1, 2, 3, 4, 2], 2) == [3, 4]   # a 1-gram when nothing longer matches
    assert lookup_draft([1, 2, 3], 4) == []
    assert lookup_draft([5, 5], 0) == []


def test_useless_draft_stops_being_tried():
    """Nothing accepted while plain decoding is faster: the controller drafts nothing for a while."""
    from edgeqwen.speculative import DraftLength
    ctl = DraftLength(k_max=8, k=4)
    ks = []
    for _ in range(200):
        k = ctl.next_k()
        ks.append(k)
        ctl.start()
        ctl.done(k, 0, 1)
        if k == 0:
            ctl.plain_rate = 1e9   # plain decoding measured faster than any speculative round
    assert ks[:3] == [4, 3, 2] and ks.count(0) > 150


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
    r = run_cli("run", onnx_builds["int4"], "hi", "-n", "4", "--lookup")
    assert r.returncode != 0 and "need a GGUF target" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_run_and_bench_with_a_draft(tiny_builds, tmp_path):
    plain = run_cli("run", tiny_builds["f16"], "Count: one two three", "-n", "40", "-t", "0", "--raw")
    spec = run_cli("run", tiny_builds["f16"], "Count: one two three", "-n", "40", "-t", "0", "--raw",
                   "--draft", tiny_builds["q4_0"])
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout
    out = tmp_path / "rows.jsonl"
    r = run_cli("bench", tiny_builds["f16"], "--lookup", "--repeats", "1", "--prompt-tokens", "32",
                "--gen-tokens", "32", "--out", out)
    assert r.returncode == 0, r.stderr
    row = json.loads(out.read_text().splitlines()[-1])
    s = row["speculative"]
    assert s["draft"] == "lookup" and s["drafted"] >= s["accepted"] >= 0 and 0 <= s["acceptance"] <= 1
    t = run_cli("table", out)
    assert t.returncode == 0 and "+ draft lookup" in t.stdout


def test_plan_counts_a_draft_beside_the_target():
    from edgeqwen.measure.hw import fingerprint
    from edgeqwen.measure.plan import fmt_gib, plan
    amx = "amx_int8" in fingerprint(bandwidth=False)["isa"]
    r = run_cli("plan", "1.5b", "q8", "--draft", "0.5b:q4_0", "--device", "raspberry-pi-5-4gb")
    assert r.returncode == 0, r.stderr
    t, d = plan("1.5b", "q8_0", amx=amx), plan("0.5b", "q4_0", amx=amx)
    assert f"with draft 0.5b q4_0: + peak RAM {fmt_gib(d.peak_ram)}" in r.stdout
    assert f"peak RAM {fmt_gib(t.peak_ram + d.peak_ram)}, min RAM {fmt_gib(t.min_ram + d.min_ram)} together" in r.stdout
    assert "together fit on raspberry-pi-5-4gb" in r.stdout
    for args, msg in ((("0.5b", "q4_0", "--draft", "1.5b:q8_0"), "not smaller"),
                      (("1.5b", "q8", "--draft", "0.5b:int4"), "GGUF draft")):
        r = run_cli("plan", *args)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
