"""Prometheus metrics of the server (/metrics) and the per-request timings object. Knows nothing of the server or
of responses: the routes record what happened."""
from __future__ import annotations

import os

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
        self.running = Gauge("edgeqwen_requests_running", "Requests being answered (up to --parallel at once)",
                             registry=r)
        proc = psutil.Process(os.getpid())
        Gauge("edgeqwen_process_rss_bytes", "Resident memory of the server", registry=r).set_function(
            lambda: proc.memory_info().rss)

    def record(self, endpoint: str, status: str, n_prompt: int = 0, last=None) -> None:
        """One finished request: its status, its prompt and, if it generated, its tokens, speed and TTFT."""
        self.requests.labels(endpoint, status).inc()
        self.prompt_tokens.inc(n_prompt)
        if last is not None:
            self.generated.inc(last.generation_tokens)
            if last.generation_tokens > 1:
                self.decode.observe(last.generation_tps)
            if last.generation_tokens:
                self.ttft.observe(last.ttft_s)


def timings(last) -> dict:
    """llama-server's "timings" object of an answer, from its last Response."""
    return {"ttft_ms": round(last.ttft_s * 1000, 1), "prompt_per_second": round(last.prompt_tps, 1),
            "predicted_per_second": round(last.generation_tps, 1)}
