"""The one thread that runs MLX in this process.

MLX is not thread-safe, and a thread that used MLX must call `mx.clear_streams()` before it ends
(ml-explore/mlx#4327: its own cleanup runs too late, after the interpreter's). A server stepping a model from its
pool threads died at exit with "terminate called without an active exception" (SIGABRT), one run in two, before
every MLX call (builder and runner) went through `on_mlx_thread`; this thread clears its streams at exit.
"""
from __future__ import annotations

import atexit
import sys
import queue
import threading
from concurrent.futures import Future

from ...errors import RunnerError

END = object()


class _Worker:
    def __init__(self):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._t = threading.Thread(target=self._loop, name="mlx", daemon=True)
        self._t.start()
        atexit.register(self.stop)

    def _loop(self):
        while (item := self._q.get()) is not None:
            fn, fut = item
            try:
                fut.set_result(fn())
            except BaseException as e:   # handed to the caller's thread, raised there
                fut.set_exception(e)
        mx = sys.modules.get("mlx.core")   # only if MLX was imported here at all
        if mx is not None:
            mx.clear_streams()

    def call(self, fn, args, cancel: threading.Event | None):
        if not self._t.is_alive():
            raise RunnerError("the MLX thread has stopped (the process is exiting)")
        fut: Future = Future()
        self._q.put((lambda: fn(*args), fut))
        try:
            return fut.result()
        except KeyboardInterrupt:
            if cancel is None or fut.done():
                raise
            cancel.set()   # the work checks it and stops; wait, so nothing writes after the caller cleans up
            try:
                fut.result()
            except BaseException:
                pass
            raise

    def stop(self):
        if self._t.is_alive():
            self._q.put(None)
            self._t.join()


_worker: _Worker | None = None
_lock = threading.Lock()


def on_mlx_thread(fn, *args, cancel: threading.Event | None = None):
    """fn(*args) on the MLX thread; its result or exception here. cancel: set on Ctrl-C, then waited for."""
    global _worker
    with _lock:
        if _worker is None:
            _worker = _Worker()
    return _worker.call(fn, args, cancel)
