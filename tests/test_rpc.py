"""Several devices through llama.cpp's RPC backend: real workers on 127.0.0.1, free ports, the tiny model."""
from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from bench.harness import Served, free_port
from helpers import invoke, run_cli

pytest.importorskip("llama_cpp")


def greedy(build, n=24, **kw):
    from edgeqwen.formats.load import load_runner
    from edgeqwen.runner import Sampling, generate_text
    r = load_runner(build, n_ctx=512, **kw)
    try:
        return [x.token for x in generate_text(r, "Hello there", Sampling(max_tokens=n, temperature=0,
                                                                           ignore_eos=True), raw=True)]
    finally:
        r.close()


def test_split_over_two_workers_gives_the_same_tokens(margin_builds, margin_load, tiny_builds, workers):
    """The margin model's text, split over the workers (whose CPU backends keep no repacked weights), is what this
    machine alone says on either of its kernel paths. The text alone would not see a layer lost on the way (the
    margin model's layers barely move its logits), so the random model's logits must agree too."""
    import numpy as np

    from edgeqwen.formats.gguf.rpc import parse_workers
    from edgeqwen.formats.load import load_runner
    eps = parse_workers(",".join(w.ep for w in workers))
    for q in ("f16", "q8_0", "q4_0"):
        alone = greedy(margin_builds[q], **margin_load["kw"])
        assert greedy(margin_builds[q], workers=eps, split=[1, 1, 1], lean=True) == alone, q
    # the default split: every layer on the workers
    assert greedy(margin_builds["q8_0"], workers=eps, lean=True) == greedy(margin_builds["q8_0"],
                                                                              **margin_load["kw"])
    if margin_load["name"] != "lean":
        return
    for q, kw in (("q8_0", {"split": [1, 1, 1]}), ("q4_0", {})):
        got = []
        for more in ({}, {"workers": eps, **kw}):
            r = load_runner(tiny_builds[q], n_ctx=128, logits=True, lean=True, **more)
            try:
                got.append(r.logits(r.tokenize("Hello there, how are you today?")))
            finally:
                r.close()
        spread = float(np.abs(got[0]).max())
        assert np.abs(got[0] - got[1]).max() < 1e-3 * spread, (q, float(np.abs(got[0] - got[1]).max()), spread)


def test_split_really_puts_layers_on_the_workers(tiny_builds, workers):
    """Not just the same answer: the workers hold the weights (their memory grows), and the layer count is right."""
    from edgeqwen.formats.gguf.rpc import layer_params, parse_workers, worker_peak_memory
    assert layer_params(2, 2, [1, 1, 1]) == {"n_gpu_layers": 2, "tensor_split": [1, 1]}
    assert layer_params(24, 1, [3, 1]) == {"n_gpu_layers": 6, "tensor_split": [1]}
    assert layer_params(24, 2, None) == {"n_gpu_layers": -1}
    eps = parse_workers(",".join(w.ep for w in workers))
    before = [worker_peak_memory(e) for e in eps]
    from edgeqwen.formats.load import load_runner
    r = load_runner(tiny_builds["f16"], n_ctx=512, workers=eps, split=[1, 1, 1])
    assert r.gpu_layers == 2 and r.workers == [str(e) for e in eps]
    after = [worker_peak_memory(e) for e in eps]
    r.close()
    # each worker received a layer of the tiny f16 model (~1.5 MB) plus its KV and compute buffers
    assert all(b and a and a - b > 1 << 20 for a, b in zip(after, before)), (before, after)


def test_worker_killed_mid_reply_ends_it_with_one_line(tiny_builds, workers):
    from edgeqwen.errors import RunnerError
    from edgeqwen.formats.gguf.rpc import parse_workers
    from edgeqwen.formats.load import load_runner
    from edgeqwen.runner import Sampling
    eps = parse_workers(",".join(w.ep for w in workers))
    r = load_runner(tiny_builds["f16"], n_ctx=4096, workers=eps, split=[1, 1, 1])
    got = 0
    t_kill = None
    with pytest.raises(RunnerError) as e:
        for _ in r.stream(r.tokenize("Hello"), Sampling(max_tokens=4000, temperature=0, ignore_eos=True)):
            got += 1
            if got == 5:
                workers[1].kill()
                t_kill = time.time()
    assert time.time() - t_kill < 15
    assert f"lost worker {workers[1].ep}" in str(e.value) and "\n" not in str(e.value)
    r.close()


def test_stalled_worker_is_a_deadline_not_a_hang(tiny_builds, workers, monkeypatch):
    from edgeqwen.errors import RunnerError
    from edgeqwen.formats.gguf.rpc import parse_workers
    from edgeqwen.formats.load import load_runner
    from edgeqwen.runner import Sampling
    eps = parse_workers(",".join(w.ep for w in workers))
    r = load_runner(tiny_builds["f16"], n_ctx=4096, workers=eps, split=[1, 1, 1])
    monkeypatch.setenv("EDGEQWEN_WORKER_TIMEOUT", "3")   # read at each wait: loading keeps its own deadline
    t0 = None
    with pytest.raises(RunnerError, match="no progress in 3 s while generating"):
        for i, _ in enumerate(r.stream(r.tokenize("Hello"), Sampling(max_tokens=4000, temperature=0,
                                                                      ignore_eos=True))):
            if i == 3:
                workers[0].kill(signal.SIGSTOP)
                t0 = time.time()
    assert time.time() - t0 < 20
    workers[0].kill(signal.SIGCONT)
    r.close()


def test_cli_run_with_workers_and_errors(tiny_builds, workers):
    eps = ",".join(w.ep for w in workers)
    p = run_cli("run", tiny_builds["q8_0"], "Hello", "-t", "0", "-n", "8", "--workers", eps, "--split", "1,1,1",
                "--json")
    assert p.returncode == 0, p.stderr
    port = free_port()   # nobody listens here
    p = run_cli("run", tiny_builds["q8_0"], "Hello", "--workers", f"127.0.0.1:{port}", timeout=30)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "connection refused" in p.stderr
    twice = f"{workers[0].ep},{workers[0].ep}"
    for bad, msg in [("nohost", "is not HOST:PORT"), ("a:70000", "is not HOST:PORT"), (twice, "listed twice")]:
        p = invoke("run", tiny_builds["q8_0"], "Hello", "--workers", bad)
        assert p.returncode == 2 and msg in p.stderr, (bad, p.stderr)
    p = invoke("run", tiny_builds["q8_0"], "Hello", "--workers", eps, "--split", "1,1")
    assert p.returncode == 2 and "needs 3 shares" in p.stderr
    p = invoke("run", tiny_builds["q8_0"], "Hello", "--split", "1,1")
    assert p.returncode == 2 and "--split needs --workers" in p.stderr


def test_onnx_build_refuses_workers(onnx_builds, workers):
    p = run_cli("run", onnx_builds["int8"], "Hello", "--workers", workers[0].ep)
    assert p.returncode == 1 and "needs a build whose backend can use them (GGUF)" in p.stderr


def test_non_loopback_bind_needs_allow_remote():
    p = invoke("worker", "--host", "0.0.0.0", "--port", str(free_port()))
    assert p.returncode == 2 and "--allow-remote" in p.stderr and "unauthenticated" in p.stderr


def test_remote_bind_prints_the_warning_every_start():
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "edgeqwen.cli", "worker", "--host", "0.0.0.0", "--port", str(port),
                          "--allow-remote", "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    try:
        first = p.stderr.readline()
        assert first.startswith("Warning: listening on 0.0.0.0") and "unauthenticated" in first
    finally:
        p.kill()
        p.wait(10)


def test_busy_port_is_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        p = run_cli("worker", "--port", str(s.getsockname()[1]), timeout=30)
    assert p.returncode == 1 and p.stderr.startswith("Error: cannot listen on")


def _fake_server(answer: bytes | None):
    """A listener that answers the handshake with `answer` (None: accepts, then never answers)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    conns = []

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            conns.append(c)
            if answer is not None:
                c.recv(1 + 8 + 24)
                c.sendall(answer)
    threading.Thread(target=serve, daemon=True).start()
    return srv, f"127.0.0.1:{srv.getsockname()[1]}"


def test_other_version_and_silent_worker_are_one_line_in_bounded_time(tiny_builds):
    from edgeqwen.formats.gguf.rpc import CONN_CAPS
    srv, ep = _fake_server(struct.pack("<Q", 4 + CONN_CAPS) + bytes([8, 0, 0, 0]) + bytes(CONN_CAPS))
    p = run_cli("run", tiny_builds["q8_0"], "Hello", "--workers", ep, timeout=30)
    srv.close()
    assert p.returncode == 1 and "protocol 8.0.0, this machine 7.0.0" in p.stderr and p.stderr.count("\n") == 1
    srv, ep = _fake_server(None)
    t0 = time.time()
    p = run_cli("run", tiny_builds["q8_0"], "Hello", "--workers", ep, timeout=30)
    srv.close()
    assert p.returncode == 1 and "no answer within 5 s" in p.stderr and time.time() - t0 < 20


def test_bench_row_records_workers(tiny_builds, workers, tmp_path):
    import json
    out = tmp_path / "rows.jsonl"
    eps = ",".join(w.ep for w in workers)
    p = run_cli("bench", tiny_builds["q8_0"], "--workers", eps, "--split", "1,1,1", "--prompt-tokens", "16",
                "--gen-tokens", "8", "--repeats", "1", "--out", out, timeout=600)
    assert p.returncode == 0, p.stderr
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["status"] == "ok" and row["workers"] == eps.split(",") and row["split"] == [1, 1, 1]
    assert all(v and v > 10 << 20 for v in row["worker_peak_rss"].values())


def test_serve_with_workers_answers_through_the_openai_client(margin_builds, workers):
    """The server's model slot loads through the same path: greedy text equals a local run's."""
    pytest.importorskip("openai")
    from helpers import build_name
    eps = ",".join(w.ep for w in workers)
    s = Served([margin_builds["q8_0"]], "--workers", eps, "--split", "1,1,1", "--lean")
    try:
        r = s.client().completions.create(model=build_name(margin_builds["q8_0"]), prompt="Hello", max_tokens=8,
                                          temperature=0)
        text = r.choices[0].text
    finally:
        s.stop()
    p = run_cli("run", margin_builds["q8_0"], "Hello", "--raw", "-t", "0", "-n", "8", "--json")
    assert p.returncode == 0 and text == json.loads(p.stdout)["text"]


def test_the_model_process_stays_in_step_after_a_closed_stream_or_an_error(tiny_builds, workers):
    """A consumer that stops reading (a server's client hanging up) or a refused prompt must not leave the
    child's replies queued for the next call."""
    from edgeqwen.errors import RunnerError
    from edgeqwen.formats.gguf.rpc import parse_workers
    from edgeqwen.formats.load import load_runner
    from edgeqwen.runner import Sampling
    eps = parse_workers(",".join(w.ep for w in workers))
    r = load_runner(tiny_builds["q8_0"], n_ctx=256, workers=eps, split=[1, 1, 1], lean=True)
    try:
        greedy5 = Sampling(max_tokens=5, temperature=0, ignore_eos=True)
        want = [x.token for x in r.stream(r.tokenize("Hello"), greedy5)]
        it = r.stream(r.tokenize("Hello"), Sampling(max_tokens=200, temperature=0, ignore_eos=True))
        next(it), next(it)
        it.close()
        assert [x.token for x in r.stream(r.tokenize("Hello"), greedy5)] == want
        with pytest.raises(RunnerError, match="the context holds"):
            list(r.stream(list(range(300)), greedy5))
        assert r.tokenize("Hello") == r.tokenize("Hello") and \
            [x.token for x in r.stream(r.tokenize("Hello"), greedy5)] == want
    finally:
        r.close()


def test_worker_host_checks_are_the_servers(tiny_builds):
    """One host check for serve and worker: ::1 is loopback (ggml-rpc listens on IPv4 only: one line saying so),
    an empty host is refused rather than meaning every interface."""
    p = invoke("worker", "--host", "::1", "--port", str(free_port()))
    assert p.returncode == 2 and "IPv4 addresses only" in p.stderr and "not a loopback" not in p.stderr, p.stderr
    p = invoke("worker", "--host", "", "--port", str(free_port()))
    assert p.returncode == 2 and "--host is empty" in p.stderr


def test_serve_reloads_a_model_process_that_died_and_health_says_why(tiny_builds, workers):
    pytest.importorskip("openai")
    import httpx
    from helpers import build_name
    model = build_name(tiny_builds["q8_0"])
    s = Served([tiny_builds["q8_0"]], "--workers", ",".join(w.ep for w in workers), "--split", "1,1,1", "--lean",
               "--ctx", "4096")
    try:
        body = {"model": model, "prompt": "Hello", "max_tokens": 3000, "temperature": 0, "ignore_eos": True}
        killer = threading.Timer(1.0, workers[1].kill)
        killer.start()
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=120)
        killer.join()
        assert r.status_code == 500 and f"lost worker {workers[1].ep}" in r.json()["error"]["message"], r.text
        h = httpx.get(s.url + "/health", timeout=10)
        assert h.status_code == 503 and "lost worker" in h.json()["error"]
        port = workers[1].port   # the worker comes back on its port: the next request loads the model again
        workers[1].proc.wait(10)
        back = subprocess.Popen([sys.executable, "-m", "edgeqwen.cli", "worker", "--port", str(port), "--threads",
                                 "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        workers[1].proc = back
        time.sleep(2)
        r = httpx.post(s.url + "/v1/completions", json={**body, "max_tokens": 4}, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200
    finally:
        assert s.stop() == 0
