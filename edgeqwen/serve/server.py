"""`edgeqwen serve`: an OpenAI-compatible HTTP server (Starlette on uvicorn) for GGUF and ONNX builds.

One model is resident at a time (edge devices cannot hold two) and serves one sequence at a time,
so requests wait in a bounded FIFO queue; a full queue is a 503 with Retry-After. Every model call
(load, generate) runs on one worker thread, fed by the same runner stream `run` and `chat` consume.
A client that disconnects (mid-stream, or while a non-streaming answer is generated) sets a flag the worker
checks before each token, as do the per-request time limit and a shutdown (SIGTERM, Ctrl-C).
Every build is loaded once before the server listens, so an unloadable one is an `Error:` line, not a
server that answers 500; a model process that dies later (workers) is dropped and loaded again on the next
request, and /health says why meanwhile.

One module of ~550 lines on purpose: request schemas, the queue, the model thread and the SSE framing are
one request's path, and they share the job and slot types.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..errors import EdgeqwenError, RunnerError
from ..runner import Sampling
from ..text import clean

_log = logging.getLogger("edgeqwen")
MAX_BODY = 1 << 20
REQUEST_TIMEOUT_S = 600.0   # llama-server's own default HTTP timeout


# --- request schemas (pydantic: types and ranges checked once, at the boundary) -------------------

class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)   # OpenAI clients send fields we ignore
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1)
    ignore_eos: bool = False   # llama-server's extension: generate max_tokens whatever the model says


class _Part(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[_Part]

    def text(self) -> str:
        return clean(self.content if isinstance(self.content, str) else "".join(p.text for p in self.content))


class ChatRequest(_Req):
    messages: list[_Message] = Field(min_length=1)


class CompletionRequest(_Req):
    prompt: str | list[str]


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse({"error": {"message": e.message, "type": e.type, "code": e.code}}, status_code=e.status,
                        headers=e.headers)


# --- the model slot -------------------------------------------------------------------------------

@dataclass
class ServeConfig:
    builds: list[str]
    threads: int | None = None
    ctx: int | None = None
    max_queue: int = 16
    api_key: str | None = None
    max_body: int = MAX_BODY
    cors: str | None = None
    load: dict = field(default_factory=dict)   # load_runner's lean / workers / split
    request_timeout: float = REQUEST_TIMEOUT_S  # wall-clock seconds one request may generate for


@dataclass
class _Slot:
    """The resident model, touched only on the worker thread."""
    names: dict[str, str]                # served id -> build argument
    meta: dict[str, dict]
    runner: object = None
    resident: str | None = None
    loading: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: int = 0
    failed: str | None = None            # why the last model process died (until the next load)


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


def _build_meta(arg: str) -> tuple[str, dict]:
    from ..home import resolve_build
    path, manifest = resolve_build(arg)
    m = manifest or {}
    name = m.get("name") or path.stem
    return name, {"id": name, "object": "model", "created": int(path.stat().st_mtime), "owned_by": "edgeqwen",
                  "format": m.get("format", "gguf"), "quant": m.get("quant"), "file_size": m.get("file_size")}


class Server:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        names, meta = {}, {}
        for b in cfg.builds:
            n, d = _build_meta(b)
            if n in names:
                raise EdgeqwenError(f"two builds are both named {n!r}")
            names[n], meta[n] = b, d
        self.slot = _Slot(names, meta)
        self.metrics = Metrics()
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeqwen-model")
        self.jobs: set[_Job] = set()   # running or about to run: cancelled together at shutdown
        self.closing = False

    # worker-thread side
    def _ensure(self, name: str):
        s = self.slot
        if s.resident != name:
            s.loading = True
            try:
                if s.runner is not None:
                    s.runner.close()
                    s.runner, s.resident = None, None
                from ..formats.load import load_runner
                _log.info("loading %s", name)
                s.runner = load_runner(s.names[name], threads=self.cfg.threads, n_ctx=self.cfg.ctx, **self.cfg.load)
                s.resident, s.failed = name, None
            finally:
                s.loading = False
        return s.runner

    def _drop(self, why: str) -> None:
        """The model process died (a worker lost): forget it; the next request loads it again."""
        s = self.slot
        _log.warning("the model process of %s died: %s; it is loaded again on the next request", s.resident, why)
        with contextlib.suppress(Exception):
            s.runner.close()
        s.runner, s.resident, s.failed = None, None, why

    def load_all(self) -> None:
        """Before listening: load every build once (an unloadable one raises its RunnerError here), the first last,
        and keep it resident."""
        names = list(self.slot.names)
        for name in names[1:] + names[:1]:
            self.pool.submit(self._ensure, name).result()

    def cancel_all(self) -> None:
        """Shutting down: refuse what waits, stop what runs at its next token."""
        self.closing = True
        for job in list(self.jobs):
            job.cancel.set()

    def close(self) -> None:
        def shut():
            if self.slot.runner is not None:
                self.slot.runner.close()
        self.pool.submit(shut).result()
        self.pool.shutdown()


# --- generation -------------------------------------------------------------------------------------

@dataclass
class _Job:
    name: str
    chat: list[dict] | None
    prompt: str | None
    sampling: Sampling
    stops: list[str]
    cancel: threading.Event = field(default_factory=threading.Event)
    deadline: float = float("inf")   # time.monotonic() after which it stops ("length")

    __hash__ = object.__hash__


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of text could start a stop string (so they are not sent yet)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                best = max(best, k)
                break
    return best


def _run_job(server: Server, job: _Job, emit) -> None:
    """On the worker thread: tokenize, check the context, stream; emit(kind, payload) for each event."""
    runner = server._ensure(job.name)
    try:
        if job.chat is not None:
            tokens = runner.tokenize(runner.apply_chat_template(job.chat), special=True)
        else:
            tokens = runner.tokenize(job.prompt, special=True)
    except EdgeqwenError as e:
        raise ApiError(400, str(e)) from None
    if not tokens:
        raise ApiError(400, "the prompt is empty")
    if len(tokens) >= runner.n_ctx:
        raise ApiError(400, f"the prompt is {len(tokens)} tokens and the context holds {runner.n_ctx}: "
                            f"{len(tokens) - runner.n_ctx + 1} tokens too many", code="context_length_exceeded")
    emit("prompt", len(tokens))
    pending, last = "", None
    stream = runner.stream(tokens, job.sampling)
    try:
        for last in stream:
            if job.cancel.is_set():
                last.finish_reason = "cancelled"
                break
            if time.monotonic() > job.deadline:
                _log.info("a request reached --request-timeout %.0f s after %d tokens: stopped",
                          server.cfg.request_timeout, last.generation_tokens)
                last.finish_reason = "length"
                break
            pending += last.text
            hit = min((i for i in (pending.find(s) for s in job.stops) if i >= 0), default=-1)
            if hit >= 0:
                emit("text", pending[:hit])
                last.finish_reason = "stop"
                break
            keep = _held_back(pending, job.stops) if job.stops and not last.finish_reason else 0
            if len(pending) > keep:
                emit("text", pending[:len(pending) - keep])
                pending = pending[len(pending) - keep:]
    except RunnerError as e:   # the model process died mid-answer (IsolatedRunner): load it afresh next time
        server._drop(str(e))
        raise
    finally:
        with contextlib.suppress(RunnerError):
            stream.close()
    emit("done", last)


def _sampling(req: _Req, n_default: int) -> Sampling:
    return Sampling(max_tokens=req.max_completion_tokens or req.max_tokens or n_default,
                    temperature=0.7 if req.temperature is None else req.temperature,
                    top_p=0.8 if req.top_p is None else req.top_p, seed=req.seed, ignore_eos=req.ignore_eos)


async def _admit(server: Server, name: str):
    """Wait for the model slot in FIFO order; a full queue is a 503."""
    s = server.slot
    if server.closing:
        raise ApiError(503, "the server is shutting down", "server_busy")
    if name not in s.names:
        raise ApiError(404, f"model {name!r} is not served here; served: {', '.join(s.names)}", code="model_not_found")
    if s.lock.locked() and s.waiting >= server.cfg.max_queue:
        raise ApiError(503, f"the queue is full ({server.cfg.max_queue} waiting)", "server_busy",
                       headers={"Retry-After": "2"})
    s.waiting += 1
    server.metrics.queue.set(s.waiting)
    try:
        await s.lock.acquire()
    finally:
        s.waiting -= 1
        server.metrics.queue.set(s.waiting)
    if server.closing:
        s.lock.release()
        raise ApiError(503, "the server is shutting down", "server_busy")


def _start(server: Server, job: _Job) -> asyncio.Queue:
    """Run the job on the model thread (the slot, taken by _admit, is released when it ends, whatever the
    client does); its events arrive on the returned queue."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    job.deadline = time.monotonic() + server.cfg.request_timeout
    server.jobs.add(job)

    def emit(kind, payload):
        loop.call_soon_threadsafe(q.put_nowait, (kind, payload))

    def work():
        try:
            _run_job(server, job, emit)
        except BaseException as e:  # noqa: B036  handed to the request's task, which turns it into a response
            emit("error", e)
    fut = loop.run_in_executor(server.pool, work)

    def done(_):
        server.jobs.discard(job)
        server.slot.lock.release()
    fut.add_done_callback(done)
    return q


async def _until_gone(request: Request, job: _Job) -> None:
    """Set job.cancel when the client disconnects (a non-streaming request: nothing else would notice)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            job.cancel.set()
            return


async def _first(q: asyncio.Queue) -> int:
    """The prompt's token count, or the error that refused it (before any response is started)."""
    kind, payload = await q.get()
    if kind == "error":
        raise payload
    return payload


async def _events(q: asyncio.Queue, job: _Job):
    """The worker's text and done events; closing this iterator (a client gone) cancels the job."""
    try:
        while True:
            kind, payload = await q.get()
            if kind == "error":
                raise payload
            yield kind, payload
            if kind == "done":
                return
    finally:
        job.cancel.set()


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


class _Gone(Exception):
    """The client went away before its request was read (a normal event: one log line, no response)."""


async def _read_json(request: Request, limit: int) -> dict:
    from starlette.requests import ClientDisconnect
    size = request.headers.get("content-length")
    if size and size.isdigit() and int(size) > limit:
        raise ApiError(413, f"the request body is {size} bytes; the limit is {limit}", code="body_too_large")
    body = b""
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")
    except ClientDisconnect:
        raise _Gone from None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the body is not valid JSON") from None
    except RecursionError:
        raise ApiError(400, "the body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    return data


def _parse(model: type[BaseModel], data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "body"
        raise ApiError(400, f"{where}: {err['msg']}", code="invalid_value") from None


# --- the app ------------------------------------------------------------------------------------------

def create_app(server: Server) -> Starlette:
    cfg = server.cfg

    def authorized(request: Request) -> None:
        if not cfg.api_key:
            return
        got = request.headers.get("authorization", "")
        token = got[7:] if got.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error",
                           "invalid_api_key")

    async def generate(request: Request, kind: str):
        endpoint = f"/v1/{kind}"
        try:
            authorized(request)
            data = await _read_json(request, cfg.max_body)
            req = _parse(ChatRequest if kind == "chat/completions" else CompletionRequest, data)
            if req.n != 1:
                raise ApiError(400, "n > 1 is not supported: a context serves one sequence", code="invalid_value")
            stops = [clean(x) for x in ([req.stop] if isinstance(req.stop, str) else list(req.stop or []))]
            if isinstance(req, ChatRequest):
                chat = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in req.messages]
                job = _Job(req.model, chat, None, _sampling(req, 1 << 30), stops)
            else:
                prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
                if len(prompts) != 1:
                    raise ApiError(400, "prompt: give one string", code="invalid_value")
                job = _Job(req.model, None, clean(prompts[0]), _sampling(req, 1 << 30), stops)
            await _admit(server, req.model)
            q = _start(server, job)
            n_prompt = await _first(q)
        except (ApiError, EdgeqwenError) as e:
            return _failed(server, endpoint, e)
        except _Gone:
            _log.info("%s: the client disconnected before its request was read", endpoint)
            _record(server, endpoint, "499")
            return Response(status_code=499)
        rid = ("chatcmpl-" if kind.startswith("chat") else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        events = _events(q, job)
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return _sse(server, endpoint, events, rid, created, req.model, kind, include_usage, job, n_prompt)
        watcher = asyncio.create_task(_until_gone(request, job))
        try:
            text, last = [], None
            async for ev, payload in events:
                if ev == "text":
                    text.append(payload)
                else:
                    last = payload
        except (ApiError, EdgeqwenError) as e:
            return _failed(server, endpoint, e)
        finally:
            watcher.cancel()
        if last.finish_reason == "cancelled" and job.cancel.is_set() and not server.closing:
            _log.info("%s: the client disconnected after %d tokens: stopped", endpoint, last.generation_tokens)
            _record(server, endpoint, "499", n_prompt, last)
            return Response(status_code=499)
        _record(server, endpoint, "200", n_prompt, last)
        usage = {"prompt_tokens": n_prompt, "completion_tokens": last.generation_tokens,
                 "total_tokens": n_prompt + last.generation_tokens}
        content = "".join(text)
        finish = "length" if last.finish_reason == "length" else "stop"
        choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
                  if kind.startswith("chat") else {"index": 0, "text": content, "finish_reason": finish})
        return JSONResponse({"id": rid, "object": "chat.completion" if kind.startswith("chat") else "text_completion",
                             "created": created, "model": req.model, "choices": [choice], "usage": usage,
                             "timings": _timings(last)})

    async def chat_completions(request):
        return await generate(request, "chat/completions")

    async def completions(request):
        return await generate(request, "completions")

    async def models(request):
        try:
            authorized(request)
        except ApiError as e:
            return _error(e)
        return JSONResponse({"object": "list", "data": list(server.slot.meta.values())})

    async def health(request):
        s = server.slot
        if s.failed and not s.loading:
            return JSONResponse({"status": "error", "error": s.failed}, status_code=503)
        if s.loading or s.runner is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})
        return JSONResponse({"status": "ok", "model": s.resident})

    async def metrics(request):
        try:
            authorized(request)
        except ApiError as e:
            return _error(e)
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def page(request):
        from ..resources import data
        return HTMLResponse(data("chat.html").read_text(encoding="utf-8"))

    async def not_found(request, exc):
        return _error(ApiError(404, f"no route {request.url.path}", code="not_found"))

    async def method_not_allowed(request, exc):
        return _error(ApiError(405, f"{request.method} is not allowed on {request.url.path}"))

    async def crashed(request, exc):
        _log.exception("unhandled error")
        return _error(ApiError(500, "internal error", "server_error"))

    routes = [Route("/", page), Route("/health", health), Route("/metrics", metrics),
              Route("/v1/models", models), Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    middleware = []
    if cfg.cors:
        from starlette.middleware import Middleware
        from starlette.middleware.cors import CORSMiddleware
        middleware.append(Middleware(CORSMiddleware, allow_origins=[cfg.cors], allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={404: not_found, 405: method_not_allowed, 500: crashed})


def _sse(server, endpoint, events, rid, created, model, kind, include_usage, job, n_prompt):
    from sse_starlette.sse import EventSourceResponse
    chat = kind.startswith("chat")
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta=None, finish=None, usage=None, timings=None):
        choices = [] if usage is not None else [
            {"index": 0, "delta": delta or {}, "finish_reason": finish} if chat
            else {"index": 0, "text": (delta or {}).get("content", ""), "finish_reason": finish}]
        d = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
        if usage is not None:
            d["usage"] = usage
            d["timings"] = timings
        return {"data": json.dumps(d)}

    async def gen():
        status, last = "200", None
        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            async for ev, payload in events:
                if ev == "text":
                    if payload:
                        yield chunk({"content": payload})
                else:
                    last = payload
            finish = "length" if last.finish_reason == "length" else "stop"
            yield chunk({}, finish)
            if include_usage:
                yield chunk(usage={"prompt_tokens": n_prompt, "completion_tokens": last.generation_tokens,
                                   "total_tokens": n_prompt + last.generation_tokens}, timings=_timings(last))
            yield {"data": "[DONE]"}
        except ApiError as e:
            status = str(e.status)
            yield {"data": json.dumps({"error": {"message": e.message, "type": e.type, "code": e.code}})}
        except EdgeqwenError as e:
            status = "500"
            yield {"data": json.dumps({"error": {"message": str(e), "type": "server_error", "code": None}})}
        except asyncio.CancelledError:   # the client went away: the worker stops before its next token
            status = "499"
            raise
        finally:
            job.cancel.set()
            await events.aclose()
            _record(server, endpoint, status, n_prompt, last)
    return EventSourceResponse(gen(), ping=15)


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
