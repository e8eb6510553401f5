"""Several devices: llama.cpp's RPC backend (ggml-rpc) behind `edgeqwen worker` and `--workers`.

A worker serves its CPU to one client at a time; the client spreads the layers over itself and its
workers. The engine is llama.cpp's, reached through the libggml-rpc.so the llama-cpp-python wheel
ships (built with GGML_RPC=ON by tools/install-llama-cpp.sh), so a worker needs nothing `make setup`
did not install; llama.cpp's separate `rpc-server` binary would need a second compile.

Two facts about ggml-rpc shape this module:
- it aborts the whole client process when a worker vanishes or answers garbage (RPC_STATUS_ASSERT),
  so a model with workers runs in a child process (IsolatedRunner) whose death becomes one line;
- a stalled worker blocks the client in recv() forever, so the parent waits for each step with a deadline.
The protocol has no authentication: anyone who reaches a worker's port can run code paths in it.
"""
from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import os
import re
import signal
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from ...errors import RunnerError, UsageError

log = logging.getLogger("edgeqwen")

DEFAULT_PORT = 50052
MAX_WORKERS = 16                  # GGML_RPC_MAX_SERVERS
RPC_CMD_HELLO, CONN_CAPS = 14, 24  # ggml-rpc.cpp: the command byte and rpc_msg_hello_req's size
# The RPC protocol version of the llama.cpp each llama-cpp-python release vendors (ggml-rpc.h). A worker must
# have the same major version and no newer minor; unknown releases are left to llama.cpp's own check.
RPC_PROTOCOL = {"0.3.36": (7, 0, 0)}
# Deadlines for the model process, in seconds (EDGEQWEN_WORKER_TIMEOUT overrides all three).
LOAD_TIMEOUT_S = 900.0         # loading sends every remote layer's weights over the network
FIRST_TOKEN_TIMEOUT_S = 600.0  # a long prompt's prefill on a slow board
TOKEN_TIMEOUT_S = 120.0        # then each token; a stalled worker ends the reply after this


def _deadline(default: float) -> float:
    raw = os.environ.get("EDGEQWEN_WORKER_TIMEOUT")
    try:
        v = float(raw) if raw else default
    except ValueError:
        raise UsageError(f"EDGEQWEN_WORKER_TIMEOUT={raw!r} is not a number of seconds") from None
    if not 0.1 <= v <= 86400:
        raise UsageError(f"EDGEQWEN_WORKER_TIMEOUT={raw!r} must be between 0.1 and 86400 seconds")
    return v
UNSAFE_WARNING = ("llama.cpp's RPC protocol is unauthenticated and unencrypted: anyone who can reach this port "
                  "can use this machine's CPU and memory and send it malformed data. Never expose it to an open "
                  "network; use it only on a trusted LAN or through an SSH tunnel.")


class WorkerError(RunnerError):
    """A worker is unreachable, of another llama.cpp version, or died."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    def address(self) -> str:
        """host:port with the host as an IPv4 address: ggml-rpc's server takes only dotted addresses."""
        try:
            return f"{socket.gethostbyname(self.host)}:{self.port}"
        except OSError as e:
            raise WorkerError(f"worker {self}: cannot resolve {self.host!r} ({e})") from None


_HOSTPORT = re.compile(r"^([A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?):(\d{1,5})$")


def parse_endpoint(text: str) -> Endpoint:
    m = _HOSTPORT.match(text.strip())
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise UsageError(f"{text!r} is not HOST:PORT (e.g. 192.168.1.20:{DEFAULT_PORT})")
    return Endpoint(m.group(1), int(m.group(2)))


def parse_workers(text: str | None) -> list[Endpoint]:
    """'HOST:PORT,HOST:PORT' -> endpoints (at most 16, no repeats)."""
    if not text:
        return []
    eps = [parse_endpoint(p) for p in text.split(",") if p.strip()]
    if not eps:
        raise UsageError("--workers: no HOST:PORT given")
    if len(eps) > MAX_WORKERS:
        raise UsageError(f"--workers: at most {MAX_WORKERS} workers (llama.cpp's limit)")
    if len(set(eps)) != len(eps):
        raise UsageError("--workers: a worker is listed twice")
    return eps


def parse_split(text: str | None, n_workers: int) -> list[float] | None:
    """--split 'LOCAL,W1,W2,...': relative shares of the layers for this machine and each worker."""
    if text is None:
        return None
    if not n_workers:
        raise UsageError("--split needs --workers")
    try:
        parts = [float(p) for p in text.split(",")]
    except ValueError:
        raise UsageError(f"--split {text!r}: give numbers, e.g. 1,1,2") from None
    if len(parts) != n_workers + 1:
        raise UsageError(f"--split needs {n_workers + 1} shares (this machine first, then each worker); "
                         f"got {len(parts)}")
    if any(not (p >= 0 and p < 1e6) for p in parts) or sum(parts[1:]) <= 0:
        raise UsageError(f"--split {text!r}: shares must be finite, >= 0, and give the workers some layers")
    return parts


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


# --- talking to a worker ourselves: the handshake only -----------------------------------------------

def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed the connection")
        buf += chunk
    return buf


def hello(ep: Endpoint, timeout: float = 5.0) -> tuple[int, int, int]:
    """The worker's RPC protocol version, from the same HELLO llama.cpp sends first; bounded by timeout."""
    try:
        with socket.create_connection((ep.host, ep.port), timeout=timeout) as s:
            s.sendall(bytes([RPC_CMD_HELLO]) + struct.pack("<Q", CONN_CAPS) + bytes(CONN_CAPS))
            size = struct.unpack("<Q", _recv_exact(s, 8))[0]
            if size != 4 + CONN_CAPS:
                raise WorkerError(f"worker {ep} answered the handshake with {size} bytes: not a llama.cpp RPC worker "
                                  "of a compatible version")
            rsp = _recv_exact(s, size)
    except WorkerError:
        raise
    except socket.timeout:
        raise WorkerError(f"worker {ep}: no answer within {timeout:.0f} s (busy with another client, or not a "
                          "worker)") from None
    except ConnectionRefusedError:
        raise WorkerError(f"worker {ep}: connection refused (is `edgeqwen worker` running there, on that port?)") \
            from None
    except ConnectionError as e:
        raise WorkerError(f"worker {ep} {e} during the handshake: a different llama.cpp version?") from None
    except OSError as e:
        raise WorkerError(f"worker {ep}: cannot connect ({e.strerror or e})") from None
    return rsp[0], rsp[1], rsp[2]


def _answers(ep: Endpoint) -> bool:
    try:
        hello(ep, timeout=2.0)
        return True
    except RunnerError:
        return False


def local_protocol() -> tuple[int, int, int] | None:
    import importlib.metadata as md
    try:
        return RPC_PROTOCOL.get(md.version("llama_cpp_python"))
    except md.PackageNotFoundError:
        return None


def check_workers(eps: list[Endpoint], timeout: float = 5.0) -> None:
    """Every worker answers, and speaks our protocol version: one clear line otherwise, never a hang."""
    ours = local_protocol()
    for ep in eps:
        v = hello(ep, timeout)
        if ours and (v[0] != ours[0] or v[1] > ours[1]):
            raise WorkerError(f"worker {ep} speaks llama.cpp RPC protocol {'.'.join(map(str, v))}, this machine "
                              f"{'.'.join(map(str, ours))}: install the same llama-cpp-python on both (make setup)")


# --- the library calls ----------------------------------------------------------------------------

def _libs():
    import llama_cpp
    lib = Path(llama_cpp.__file__).parent / "lib"

    def soname(stem: str) -> Path | None:
        # The wheel holds copies (not links) under several names; only the one libllama links against by its
        # soname shares llama.cpp's backend registry, and another would load a second, separate ggml.
        for name in (f"{stem}.so.0", f"{stem}.0.dylib", f"{stem}.dylib", f"{stem}.so"):
            if (lib / name).exists():
                return lib / name
        return None
    rpc_so, ggml_so = soname("libggml-rpc"), soname("libggml")
    if rpc_so is None or ggml_so is None:
        raise RunnerError("this llama-cpp-python has no RPC backend (libggml-rpc): reinstall it with make setup, "
                          "which builds it with GGML_RPC=ON")
    ggml = ctypes.CDLL(str(ggml_so))
    rpc = ctypes.CDLL(str(rpc_so))
    rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    rpc.ggml_backend_rpc_start_server.restype = None
    rpc.ggml_backend_rpc_start_server.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                                                  ctypes.POINTER(ctypes.c_void_p)]
    ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    return ggml, rpc


_registered: set[str] = set()   # endpoints already given to llama.cpp in this process


def register(eps: list[Endpoint]) -> None:
    """Make each worker's devices visible to llama.cpp in this process (before a model loads)."""
    # ggml attaches gdb to print a backtrace when it aborts (a lost worker); the parent only needs the message.
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    ggml, rpc = _libs()
    for ep in eps:
        addr = ep.address()
        if addr in _registered:
            continue
        reg = rpc.ggml_backend_rpc_add_server(addr.encode())
        if not reg:
            raise WorkerError(f"worker {ep} offers no devices")
        ggml.ggml_backend_register(reg)
        _registered.add(addr)


def layer_params(n_layer: int, n_workers: int, split: list[float] | None) -> dict:
    """llama.cpp's n_gpu_layers and tensor_split for workers (its "GPU" devices) and this machine's CPU.

    llama.cpp puts the last n_gpu_layers layers (the output layer counts as one) on the devices, in
    tensor_split proportions, and keeps the rest (and the token embeddings) here. Without --split every
    layer goes to the workers, split by their free memory, as llama.cpp's own --rpc does."""
    if split is None:
        return {"n_gpu_layers": -1}
    local, remote = split[0], split[1:]
    n_remote = round((n_layer + 1) * sum(remote) / (local + sum(remote)))
    return {"n_gpu_layers": max(1, n_remote), "tensor_split": remote}


def serve_worker(host: str, port: int, threads: int, allow_remote: bool, cache_dir: Path | None = None,
                 ready=None) -> None:
    """Serve this machine's CPU to llama.cpp clients until interrupted (blocks)."""
    from ...hosts import check_host
    where = check_host(host)
    if not where.loopback and not allow_remote:
        raise UsageError(f"--host {host} is not a loopback address: add --allow-remote if you mean it. "
                         + UNSAFE_WARNING)
    if where.family != socket.AF_INET:
        raise UsageError(f"--host {host}: llama.cpp's RPC server listens on IPv4 addresses only "
                         f"(127.0.0.1 for this machine)")
    ep = Endpoint(where.addresses[0], port)
    with socket.socket() as probe:   # a clear line for a busy port, before llama.cpp's silent return
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((socket.gethostbyname(host), port))
        except OSError as e:
            raise WorkerError(f"cannot listen on {ep}: {e.strerror or e}") from None
    ggml, rpc = _libs()
    cpu = ggml.ggml_backend_dev_by_type(0)   # GGML_BACKEND_DEVICE_TYPE_CPU
    devices = (ctypes.c_void_p * 1)(cpu)
    cache = str(cache_dir).encode() if cache_dir else None
    # The server loop is C and never returns; a daemon thread keeps Ctrl-C and SIGTERM working here.
    t = threading.Thread(target=rpc.ggml_backend_rpc_start_server,
                         args=(ep.address().encode(), cache, threads, 1, devices), daemon=True)
    t.start()
    if ready:
        ready()
    while t.is_alive():
        t.join(0.5)
    raise WorkerError(f"llama.cpp's RPC server on {ep} stopped")


def worker_peak_memory(ep: Endpoint) -> int | None:
    """Peak RSS of the process listening on ep when it runs on this machine (else None)."""
    import psutil
    if not is_loopback(ep.host):
        return None
    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == ep.port and c.pid:
                with contextlib.suppress(OSError, ValueError):
                    for line in Path(f"/proc/{c.pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            return int(line.split()[1]) * 1024
                return psutil.Process(c.pid).memory_info().rss
    except (psutil.Error, OSError):
        return None
    return None


# --- a runner in a child process -----------------------------------------------------------------------

class IsolatedRunner:
    """The runner protocol, with the model in a child process: a worker that dies makes llama.cpp abort the
    child, not us, and a worker that stalls is noticed by a deadline. Used whenever --workers is given."""

    def __init__(self, build: str, *, threads=None, n_ctx=None, logits=False, lean=False, workers=(), split=None):
        import multiprocessing as mp
        self.workers = [str(w) for w in workers]
        fd, self._errlog = tempfile.mkstemp(prefix="edgeqwen-model-", suffix=".log")
        os.close(fd)
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        kw = dict(threads=threads, n_ctx=n_ctx, logits=logits, lean=lean, workers=list(workers), split=split)
        self._proc = ctx.Process(target=_child_main, args=(child, str(build), kw, self._errlog), daemon=True)
        self._proc.start()
        child.close()
        try:
            attrs = self._recv(_deadline(LOAD_TIMEOUT_S), "loading the model")
        except BaseException:
            self._stop()
            raise
        self.__dict__.update(attrs)

    # the parent side of the pipe
    def _recv(self, timeout: float, doing: str):
        if not self._conn.poll(timeout):
            self._stop()
            raise WorkerError(f"no progress in {timeout:.0f} s while {doing}: a worker ({', '.join(self.workers)}) "
                              "stalled or the network is down")
        try:
            kind, payload = self._conn.recv()
        except (EOFError, OSError):
            raise WorkerError(self._death(doing)) from None
        if kind == "error":
            raise RunnerError(payload)
        return payload

    def _death(self, doing: str) -> str:
        self._proc.join(5)
        code = self._proc.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        why = ""
        with contextlib.suppress(OSError):
            lines = [ln.strip() for ln in Path(self._errlog).read_text(errors="replace").splitlines()]
            known = [ln for ln in lines if re.search(r"RPC|connect|handshake|version mismatch", ln)]
            why = (known or [ln for ln in lines if ln] or [""])[-1]
            why = re.sub(r"^\S+:\d+:\s*", "", why)[:200]   # drop ggml's "file.cpp:566: " prefix
        self._cleanup_log()
        lost = [w for w in self.workers if not _answers(parse_endpoint(w))]
        who = f"lost worker {', '.join(lost)}" if lost else f"a worker ({', '.join(self.workers)}) refused it"
        return f"{who}: the model process died while {doing} ({how}){': ' + why if why else ''}"

    def _call(self, op: str, *args, timeout: float = 60.0):
        timeout = _deadline(timeout)
        try:
            self._conn.send((op, args))
        except (OSError, ValueError):
            raise WorkerError(self._death(op)) from None
        return self._recv(timeout, op)

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return self._call("tokenize", text, special)

    def detokenize(self, tokens: list[int]) -> str:
        return self._call("detokenize", tokens)

    def apply_chat_template(self, messages: list[dict]) -> str:
        return self._call("apply_chat_template", messages)

    def logits(self, tokens: list[int]):
        return self._call("logits", tokens, timeout=_deadline(FIRST_TOKEN_TIMEOUT_S))

    def stream(self, tokens: list[int], sampling) -> Iterator:
        self._conn.send(("stream", (tokens, sampling)))
        last, timeout, done = None, _deadline(FIRST_TOKEN_TIMEOUT_S), False
        try:
            while True:
                r = self._recv(timeout, "generating")
                if r is None:   # the child's end of a stopped stream
                    done = True
                    return
                last, timeout = r, _deadline(TOKEN_TIMEOUT_S)
                yield r
                if r.finish_reason:
                    done = True
                    return
        except KeyboardInterrupt:
            # Stop the child between tokens and hand back an "interrupted" end, as a local runner does.
            done = True
            last = self._stop_stream() or last
            if last is not None:
                yield replace(last, text="", token=None, finish_reason="interrupted")
        finally:
            if not done and self._proc.is_alive():   # the consumer stopped early, or the child raised mid-stream
                self._stop_stream()

    def _stop_stream(self):
        """Tell the child to stop generating and read up to its end marker (it answers a stop exactly once, with
        None), so the next call starts in step; returns the last response it sent."""
        last = None
        with contextlib.suppress(OSError, ValueError):
            self._conn.send(("stop", ()))
            while (r := self._recv(_deadline(TOKEN_TIMEOUT_S), "stopping")) is not None:
                last = r if not r.finish_reason else last
        return last

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._conn.send(("close", ()))
        self._stop()

    def _stop(self) -> None:
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._cleanup_log()

    def _cleanup_log(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self._errlog)


_ATTRS = ("backend", "n_ctx", "n_vocab", "regular_vocab", "load_s", "chat_template", "eos_token", "threads", "lean",
          "path", "gpu_layers")


def _child_main(conn, build: str, kw: dict, errlog: str) -> None:
    """The model process: llama.cpp's stderr (an abort's message) goes to errlog for the parent to quote."""
    fd = os.open(errlog, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 2)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent decides what Ctrl-C means
    from ...errors import EdgeqwenError
    from ...runner import load_runner
    try:
        runner = load_runner(build, isolate=False, **kw)
    except EdgeqwenError as e:
        conn.send(("error", str(e)))
        return
    conn.send(("ok", {a: getattr(runner, a) for a in _ATTRS if hasattr(runner, a)}))
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            break
        if op == "close":
            break
        if op == "stop":   # a stop that arrived after the stream ended
            conn.send(("ok", None))
            continue
        try:
            if op == "stream":
                for r in runner.stream(*args):
                    conn.send(("ok", r))
                    # Mid-stream the parent sends nothing but "stop"; after the last response it may already have
                    # sent its next request, which must stay queued for the loop above, so look only before that.
                    if not r.finish_reason and conn.poll() and conn.recv()[0] == "stop":
                        conn.send(("ok", None))
                        break
            else:
                conn.send(("ok", getattr(runner, op)(*args)))
        except EdgeqwenError as e:
            conn.send(("error", str(e)))
    runner.close()
