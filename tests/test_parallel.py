"""Several conversations at once (serve --parallel): GGUF builds decode them in one batched llama.cpp context, each
in a sequence of its own. On the margin model (greedy text the same on every kernel path) every answer equals the
same request answered alone, however the requests overlap."""
import threading
import time

import pytest

from edgeqwen.runner import Sampling

PROMPTS = ["Hello", "Ring@", "Tell me a story about a dragon and a knight, at length.", "Hi", "Count with me",
           "Ring@ Ring@", "What is two plus two?", "Ring@"]


def _answer(runner, prompt, n, **kw):
    toks = runner.tokenize(runner.apply_chat_template([{"role": "user", "content": prompt}]))
    out = [r for r in runner.stream(toks, Sampling(max_tokens=n, temperature=0, ignore_eos=True, **kw))]
    return [r.token for r in out if r.token is not None], "".join(r.text for r in out)


@pytest.fixture(scope="module")
def alone(margin_builds):
    from edgeqwen.formats.load import load_runner
    r = load_runner(margin_builds["q4_0"], n_ctx=512)
    try:
        yield {(p, n): _answer(r, p, n) for p in set(PROMPTS) for n in (5, 17, 40)}
    finally:
        r.close()


@pytest.mark.parametrize("load", ["repacked", "lean"])
def test_overlapping_requests_answer_as_each_would_alone(margin_builds, alone, load):
    from edgeqwen.formats.load import load_runner
    r = load_runner(margin_builds["q4_0"], n_ctx=512, parallel=4, lean=load == "lean")
    try:
        assert r.n_ctx == 512 and r.n_seq == 4
        got, errors = {}, []

        def client(k):
            try:
                for j in range(3):   # each client asks three times: sequences are reused, prompts cached
                    p, n = PROMPTS[(k + j) % len(PROMPTS)], (5, 17, 40)[(k + j) % 3]
                    got[(k, j)] = ((p, n), _answer(r, p, n))
            except Exception as e:   # noqa: BLE001  reported below
                errors.append(e)
        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert len(got) == 12
        for key, answer in got.values():
            assert answer == alone[key], key
        with pytest.raises(Exception, match="busy"):   # a fifth at once is serve's to queue, not the runner's
            gens = [r.stream(r.tokenize("Hello"), Sampling(max_tokens=400, temperature=0, ignore_eos=True))
                    for _ in range(5)]
            for g in gens:
                next(g)
    finally:
        r.close()


def test_logprobs_grammar_and_a_cancelled_request_in_a_batch(margin_builds, alone):
    from edgeqwen.formats.load import load_runner
    from edgeqwen.formats.gguf.grammar import grammar
    r = load_runner(margin_builds["q4_0"], n_ctx=512, parallel=2)
    try:
        toks = r.tokenize(r.apply_chat_template([{"role": "user", "content": "Hello"}]))
        g = r.stream(toks, Sampling(max_tokens=400, temperature=0, ignore_eos=True))
        next(g)
        g.close()   # the client went away: its sequence is free again
        scored = list(r.stream(toks, Sampling(max_tokens=5, temperature=0, ignore_eos=True, logprobs=2)))
        assert [x.token for x in scored] == alone[("Hello", 5)][0]
        assert all(x.logprob is not None and len(x.top_logprobs) == 2 for x in scored)
        schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 8}}, "required": ["a"],
                  "additionalProperties": False}
        text = "".join(x.text for x in r.stream(toks, Sampling(max_tokens=60, temperature=0,
                                                               grammar=grammar("json_schema", schema))))
        import json
        import jsonschema
        jsonschema.validate(json.loads(text), schema)
    finally:
        r.close()


def test_parallel_needs_a_format_that_batches(margin_onnx, margin_builds):
    from edgeqwen.errors import RunnerError
    from edgeqwen.formats.load import load_runner
    with pytest.raises(RunnerError, match="--parallel needs a GGUF build"):
        load_runner(margin_onnx["int8"], parallel=2)
    with pytest.raises(RunnerError, match="--parallel"):
        load_runner(margin_builds["q4_0"], parallel=2, draft="lookup")


def test_serve_parallel_answers_each_request_as_alone(margin_builds):
    """serve --parallel 4 with 8 clients at once: up to 4 run together (the running gauge), every chat answer is
    the one the same request gets alone, streamed or not."""
    import httpx
    from bench.harness import Served
    from helpers import build_name
    s = Served([margin_builds["q4_0"]], "--parallel", "4", "--ctx", "512")
    try:
        c, model = s.client(), build_name(margin_builds["q4_0"])

        def ask(k):
            kw = dict(model=model, messages=[{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}],
                      max_tokens=(5, 17, 40)[k % 3], temperature=0, extra_body={"ignore_eos": True})
            if k % 2:
                return "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(**kw, stream=True)
                               if ch.choices)
            return c.chat.completions.create(**kw).choices[0].message.content
        together, peak, stop = {}, [0.0], threading.Event()

        def watch():
            while not stop.is_set():
                peak[0] = max(peak[0], s.metric("edgeqwen_requests_running"))
                time.sleep(0.02)
        w = threading.Thread(target=watch)
        w.start()
        ts = [threading.Thread(target=lambda k=k: together.__setitem__(k, ask(k))) for k in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
        stop.set()
        w.join()
        assert len(together) == 8
        assert 2 <= peak[0] <= 4, peak
        for k in range(8):
            assert together[k] == ask(k), k
        assert httpx.get(s.url + "/health").json()["status"] == "ok"
    finally:
        assert s.stop() == 0
    assert "Traceback" not in s.proc.stderr.read()


@pytest.mark.parametrize("args,words", [(["--parallel", "0"], "--parallel"),
                                        (["--parallel", "2", "--lookup"], "does not combine")])
def test_bad_parallel_is_one_line_before_any_load(tiny_builds, args, words):
    from helpers import invoke
    r = invoke("serve", tiny_builds["q4_0"], *args)
    assert r.returncode != 0 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_slots_are_what_fits_in_the_memory_available(tiny_builds):
    """serve's default --parallel, and its refusal of one that does not fit: plan's memory for each slot's context
    against the memory available (given here, as a small board would have it)."""
    from edgeqwen.errors import UsageError
    from edgeqwen.measure.plan import parallel_slots, plan
    b = tiny_builds["q4_0"]
    need = {n: plan("tiny", "q4_0", ctx=32768, parallel=n, resident=True).peak_ram for n in (1, 2, 3, 4, 5)}
    assert need[1] < need[2] < need[4]
    assert parallel_slots(b, 32768, None, available=100 * need[4]) == 4             # at most llama-server's 4
    assert parallel_slots(b, 32768, None, available=int(need[2] / 0.9) + 1) == 2    # as many as fit
    assert parallel_slots(b, 32768, None, available=need[1] // 2) == 1              # one, whatever fits
    assert parallel_slots(b, 32768, 5, available=100 * need[5]) == 5
    with pytest.raises(UsageError, match="--parallel 5: .* needs ~.* for 5 contexts of 32768 tokens"):
        parallel_slots(b, 32768, 5, available=need[4])


def test_plan_counts_every_slots_context():
    from helpers import invoke
    one = invoke("plan", "1.5b", "q4", "--ctx", "8192")
    four = invoke("plan", "1.5b", "q4", "--ctx", "8192", "--parallel", "4")
    assert one.returncode == four.returncode == 0, four.stderr
    assert "4 contexts of 8192 (serve --parallel 4)" in four.stdout

    def kv(out):
        return float(out.split(" KV ")[1].split(" GiB")[0])
    assert kv(four.stdout) == pytest.approx(4 * kv(one.stdout), rel=0.02)
