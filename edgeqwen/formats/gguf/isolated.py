"""A model spread over llama.cpp RPC workers runs in a child process: ggml-rpc aborts the whole process when a
worker vanishes or answers garbage, so the child dies, not us, and its death becomes one line; a stalled worker
is noticed by a deadline on each step. formats/load.py chooses this runner whenever --workers is given.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from ...errors import RunnerError

from .rpc import (FIRST_TOKEN_TIMEOUT_S, LOAD_TIMEOUT_S, TOKEN_TIMEOUT_S, WorkerError, _answers, _deadline,
                  parse_endpoint)


class IsolatedRunner:
    """The runner protocol, with the model in a child process: a worker that dies makes llama.cpp abort the
    child, not us, and a worker that stalls is noticed by a deadline. Used whenever --workers is given.

    open_here(build, options) opens the model in the child: load_runner with isolation off, passed in by its caller
    so that this module does not import formats/load.py back."""

    def __init__(self, build: str, options, open_here):
        import multiprocessing as mp
        self.workers = [str(w) for w in options.workers]
        fd, self._errlog = tempfile.mkstemp(prefix="edgeqwen-model-", suffix=".log")
        os.close(fd)
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, args=(child, str(build), options, open_here, self._errlog),
                                 daemon=True)
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

    def token_bytes(self, tok: int) -> bytes:
        return self._call("token_bytes", tok)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        return self._call("apply_chat_template", messages, tools)

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


def _child_main(conn, build: str, options, open_here, errlog: str) -> None:
    """The model process: llama.cpp's stderr (an abort's message) goes to errlog for the parent to quote."""
    fd = os.open(errlog, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 2)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent decides what Ctrl-C means
    from ...errors import EdgeqwenError
    try:
        runner = open_here(build, options)
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
