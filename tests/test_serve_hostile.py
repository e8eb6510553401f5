"""`serve` against clients that misbehave: disconnects (mid-body, mid-answer, non-streaming), broken encodings,
absurd bodies, signals while busy. A real server process on 127.0.0.1; its log must never show a traceback."""
import json
import signal
import socket
import threading
import time

import pytest
from bench.harness import Served
from helpers import build_name

httpx = pytest.importorskip("httpx")
pytest.importorskip("openai")

LONG = {"prompt": "Tell me everything.", "max_tokens": 100000, "temperature": 0, "ignore_eos": True}


def _short(s) -> float:
    """Seconds for a 4-token request (the server is free again)."""
    t0 = time.perf_counter()
    r = httpx.post(s.url + "/v1/completions", json={"model": s.model, "prompt": "hi", "max_tokens": 4,
                                                    "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    return time.perf_counter() - t0


def _raw(s, data: bytes, linger: float = 0.2) -> bytes:
    """Send raw bytes on a fresh connection, wait a little, close; what came back."""
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
        c.sendall(data)
        time.sleep(linger)
        c.settimeout(linger)
        try:
            return c.recv(65536)
        except (TimeoutError, ConnectionError):
            return b""


def test_abandoned_non_streaming_requests_stop_generating(hostile):
    """Ten clients ask for 100000 tokens without streaming and hang up: the next short request is answered at
    once (before, the server generated each abandoned answer to its end: 88.7 s on the real 0.5B)."""
    body = json.dumps({"model": hostile.model, **LONG}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    for _ in range(10):
        _raw(hostile, head + body, linger=0.3)
    assert _short(hostile) < 5.0
    assert hostile.metric('edgeqwen_requests_total{endpoint="/v1/completions",status="499"}') >= 10


def test_a_client_gone_mid_body_or_with_broken_chunks_is_logged_not_a_traceback(hostile):
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    _raw(hostile, head + b"Content-Length: 5000\r\n\r\n" + b'{"model": "', linger=0.1)
    _raw(hostile, head + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nnot a chunk\r\n", linger=0.3)
    _raw(hostile, head + b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"mod\r\n", linger=0.1)
    assert _short(hostile) < 5.0   # and the log is checked for tracebacks when the module's server stops


@pytest.mark.parametrize("body, status", [
    (b"[" * 100000 + b"]" * 100000, 400),            # nested too deep for the JSON parser: 400, not a 500
    (b'{"model": "m", "prompt": "\xff\xfe"}', 400),   # not UTF-8: not JSON
    (b'{"model": "M", "prompt": "\\ud800 lone \\udfff", "max_tokens": 2}', 200),   # lone surrogates: U+FFFD
    (b'{"model": "M", "prompt": "nul \\u0000 byte", "max_tokens": 2}', 200),
    (b'{"model": "M", "messages": [{"role": "user", "content": "\\udcff"}], "max_tokens": 2}', 200),
    (b'{"model": "M", "prompt": "x", "max_tokens": 2, "stop": ["\\ud800"]}', 200),
])
def test_hostile_bodies_get_a_4xx_or_an_answer(hostile, body, status):
    body = body.replace(b'"M"', json.dumps(hostile.model).encode())
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    r = httpx.post(hostile.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    assert httpx.get(hostile.url + "/health").status_code == 200


def test_max_tokens_is_capped_by_the_context_and_the_request_timeout_ends_an_answer(tiny_builds):
    s = Served([tiny_builds["q4_0"]], "--ctx", "256", "--request-timeout", "1")
    try:
        model = build_name(tiny_builds["q4_0"])
        r = httpx.post(s.url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 10**9,
                                                        "temperature": 0, "ignore_eos": True}, timeout=60).json()
        assert r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] <= 256
        assert r["choices"][0]["finish_reason"] == "length"
    finally:
        assert s.stop() == 0
    s = Served([tiny_builds["q4_0"]], "--ctx", "32768", "--request-timeout", "1")
    try:
        t0 = time.perf_counter()
        r = httpx.post(s.url + "/v1/completions", json={"model": model, **LONG}, timeout=60).json()
        assert time.perf_counter() - t0 < 5 and r["choices"][0]["finish_reason"] == "length"
        assert 0 < r["usage"]["completion_tokens"] < 100000
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("stream", [False, True])
def test_sigterm_while_busy_answers_what_runs_refuses_what_waits_and_exits_0(tiny_builds, stream):
    s = Served([tiny_builds["q4_0"]], "--ctx", "32768")
    model, got = build_name(tiny_builds["q4_0"]), {}

    def ask(key):
        try:
            with httpx.stream("POST", s.url + "/v1/completions", json={"model": model, **LONG, "stream": stream},
                              timeout=60) as r:
                got[key] = (r.status_code, b"".join(r.iter_bytes()))
        except httpx.HTTPError as e:
            got[key] = ("error", repr(e))
    threads = [threading.Thread(target=ask, args=(k,)) for k in ("running", "waiting")]
    for t in threads:
        t.start()
        time.sleep(0.5)
    t0 = time.perf_counter()
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(30) == 0 and time.perf_counter() - t0 < 15
    for t in threads:
        t.join(30)
    log = s.proc.stderr.read()
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
    assert got["running"][0] == 200, got   # answered with what it had
    assert got["waiting"][0] in (200, 503), got


def test_fuzzed_bodies_get_a_4xx_or_an_answer_never_a_500(tiny_builds):
    """Request bodies of any JSON shape in the fields the API reads, and raw bytes: 200, or a 4xx in OpenAI's
    shape; never a 500, and the server stays healthy."""
    hypothesis = pytest.importorskip("hypothesis")
    import os

    from hypothesis import strategies as st
    examples = max(20, int(os.environ.get("EDGEQWEN_FUZZ_EXAMPLES", "300")) // 10)   # each is an HTTP request
    s = Served([tiny_builds["q4_0"]], "--ctx", "256", "--request-timeout", "2")
    model = build_name(tiny_builds["q4_0"])
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**64, 2**64), st.integers(-2, 25), st.floats(),
                     st.text(max_size=20),
                     st.sampled_from(["\ud800", "\x00", model, "user", "system", "text"]))
    value = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.sampled_from(
                                                           ["role", "content", "type", "text", "x"]), inner,
                                                           max_size=3)), max_leaves=8)
    fields = st.dictionaries(st.sampled_from(["model", "messages", "prompt", "max_tokens", "temperature", "top_p",
                                              "seed", "stop", "stream", "n", "ignore_eos", "stream_options",
                                              "logprobs", "top_logprobs", "response_format", "tools",
                                              "tool_choice"]),
                             value, max_size=6)
    good = {"model": model, "max_tokens": 4}

    @hypothesis.settings(max_examples=examples, deadline=None, derandomize=True)
    @hypothesis.given(st.one_of(fields.map(lambda d: json.dumps({**good, **d}, allow_nan=True).encode()),
                                st.binary(max_size=64)), st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
    def check(body, path):
        r = httpx.post(s.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=60)
        assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text[:500])
        if r.status_code != 200:
            assert set(r.json()["error"]) >= {"message", "type", "code"}
    try:
        check()
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        assert s.stop() == 0
    log = s.proc.stderr.read()
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize("how", ["chunked", "content-length"])
def test_hostile_a_stalled_body_is_cut_off_after_the_read_timeout(tiny_builds, how):
    """A client that sends part of its body and stops: 408 after --read-timeout (serve --help says so), the
    connection closed, and the server answers others meanwhile and after."""
    s = Served([tiny_builds["q4_0"]], "--read-timeout", "1.5")
    s.model = build_name(tiny_builds["q4_0"])
    try:
        part = b'{"model": "x", "prompt": "'
        if how == "chunked":
            head = b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(part):x}\r\n".encode() + part + b"\r\n"
        else:
            head = b"Content-Length: 1000\r\n\r\n" + part
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
            c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + head)
            t0 = time.perf_counter()
            assert _short(s) < 10   # others are served while it stalls
            got = b""
            while chunk := c.recv(65536):   # until the server closes it
                got += chunk
            waited = time.perf_counter() - t0
        assert got.startswith(b"HTTP/1.1 408") and b"--read-timeout" in got, got[:300]
        assert 1.0 < waited < 8.0, waited
        assert _short(s) < 10
    finally:
        assert s.stop() == 0
    log = s.proc.stderr.read()
    assert "Traceback" not in log, log[-3000:]


def test_serve_help_states_the_read_timeout():
    from helpers import run_cli
    out = run_cli("serve", "--help").stdout
    assert "--read-timeout" in out and "408" in out
