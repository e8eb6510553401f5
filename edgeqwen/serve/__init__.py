"""`edgeqwen serve`: an OpenAI-compatible HTTP server (Starlette on uvicorn) for GGUF and ONNX builds.

One model is resident at a time (edge devices cannot hold two) and serves one sequence at a time,
so requests wait in a bounded FIFO queue; a full queue is a 503 with Retry-After. Every model call
(load, generate) runs on one worker thread, fed by the same runner stream `run` and `chat` consume.
A client that disconnects (mid-stream, or while a non-streaming answer is generated) sets a flag the worker
checks before each token, as do the per-request time limit and a shutdown (SIGTERM, Ctrl-C).
Every build is loaded once before the server listens, so an unloadable one is an `Error:` line, not a
server that answers 500; a model process that dies later (workers) is dropped and loaded again on the next
request, and /health says why meanwhile.

Parts by concern: schemas.py (requests, errors, the body reader), queue.py (the model slot, its queue and thread),
metrics.py (Prometheus), routes.py (the app and the SSE framing); this module runs it under uvicorn.

May import: the shared core and formats; never measure or cli.
"""
from __future__ import annotations

import contextlib
import logging

from .queue import ServeConfig, Server
from .routes import create_app

__all__ = ["ServeConfig", "Server", "create_app", "serve"]

_log = logging.getLogger("edgeqwen")


def serve(cfg: ServeConfig, sock, on_ready=None) -> None:
    """Serve on an already listening socket (hosts.listen: a bind failure was one line before any load) until
    SIGTERM or Ctrl-C: then every running request stops at its next token and is answered, the queue is
    refused, and the server exits 0."""
    import signal

    import uvicorn

    server = Server(cfg)

    class _Uvicorn(uvicorn.Server):
        """SIGTERM / Ctrl-C: a graceful stop and exit status 0 (uvicorn would re-raise the signal afterwards)."""

        @contextlib.contextmanager
        def capture_signals(self):
            def stop(sig, frame):
                if not self.should_exit:
                    _log.info("stopping (%s): %d request(s) in flight are stopped and answered",
                              signal.Signals(sig).name, len(server.jobs))
                server.cancel_all()
                self.force_exit = self.should_exit
                self.should_exit = True
            old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    try:
        server.load_all()
        if on_ready:
            on_ready()
        app = create_app(server)
        _Uvicorn(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10)).run(sockets=[sock])
    finally:
        server.close()
        sock.close()
