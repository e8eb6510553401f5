"""`edgeqwen serve` and `edgeqwen worker` in child processes, ready once they answer: the same harness for the
benchmarks and the tests (tests/ imports it), so a figure in a report comes from the process a test checked."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, seconds: float, what: str) -> None:
    """Until url/health answers 200; a process that exits first, or a deadline, is a RuntimeError."""
    import httpx
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {proc.stderr.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not become healthy")


class Served:
    """`edgeqwen serve BUILDS... ARGS` on 127.0.0.1, healthy within a minute or an error with its stderr."""

    def __init__(self, builds, *args, env=None, url_host="127.0.0.1", threads: int = 2):
        self.port = free_port()
        self.url = f"http://{url_host}:{self.port}"
        e = dict(os.environ)
        e.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "edgeqwen.cli", "serve", *map(str, builds),
                                      "--port", str(self.port), "--threads", str(threads), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)
        try:
            wait_healthy(self.proc, self.url, 60, "server")
        except RuntimeError:
            self.stop()
            raise

    def client(self, key="none"):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def rss(self) -> int:
        import psutil
        return psutil.Process(self.proc.pid).memory_info().rss

    def metric(self, name: str) -> float:
        import httpx
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()
        return self.proc.returncode


class Worker:
    """`edgeqwen worker` in its own process, ready once it answers the RPC handshake."""

    def __init__(self, *extra: str, preexec_fn=None):
        from edgeqwen.formats.gguf.rpc import hello, parse_endpoint
        self.port = free_port()
        self.ep = f"127.0.0.1:{self.port}"
        threads = [] if "--threads" in extra else ["--threads", "1"]
        self.proc = subprocess.Popen([sys.executable, "-m", "edgeqwen.cli", "worker", "--port", str(self.port),
                                      *threads, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, preexec_fn=preexec_fn)
        deadline = time.time() + 30
        while True:
            try:
                hello(parse_endpoint(self.ep), timeout=1)
                return
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"worker did not start: {self.proc.stderr.read()}") from None
                time.sleep(0.2)

    def kill(self, sig=signal.SIGKILL):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
