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
import socket
import struct
import threading
from dataclasses import dataclass
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

