"""Prometheus metrics of the server (/metrics) and the per-request timings object."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.responses import JSONResponse

from .schemas import ApiError, _error

if TYPE_CHECKING:   # annotations only: the queue holds the metrics
    from .queue import Server


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("edgeqwen_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("edgeqwen_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated = Counter("edgeqwen_generated_tokens", "Tokens generated", registry=r)
        self.decode = Histogram("edgeqwen_decode_tokens_per_second", "Decode speed per request", registry=r,
                                buckets=(1, 2, 5, 10, 20, 40, 80, 160, 320, 640, 1280))
        self.ttft = Histogram("edgeqwen_ttft_seconds", "Time to first token", registry=r,
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.queue = Gauge("edgeqwen_queue_depth", "Requests waiting for the model", registry=r)
        proc = psutil.Process(os.getpid())
        Gauge("edgeqwen_process_rss_bytes", "Resident memory of the server", registry=r).set_function(
            lambda: proc.memory_info().rss)


def _timings(last) -> dict:
    return {"ttft_ms": round(last.ttft_s * 1000, 1), "prompt_per_second": round(last.prompt_tps, 1),
            "predicted_per_second": round(last.generation_tps, 1)}


def _record(server: Server, endpoint: str, status: str, n_prompt: int = 0, last=None) -> None:
    m = server.metrics
    m.requests.labels(endpoint, status).inc()
    m.prompt_tokens.inc(n_prompt)
    if last is not None:
        m.generated.inc(last.generation_tokens)
        if last.generation_tokens > 1:
            m.decode.observe(last.generation_tps)
        if last.generation_tokens:
            m.ttft.observe(last.ttft_s)


def _failed(server: Server, endpoint: str, e: Exception) -> JSONResponse:
    """An error response (a domain error from the model thread is a 500), counted in the metrics."""
    if not isinstance(e, ApiError):
        e = ApiError(500, str(e), "server_error")
    _record(server, endpoint, str(e.status))
    return _error(e)


