"""The model slot and its queue: one model resident and one sequence at a time, on one worker thread; requests
wait in a bounded FIFO queue (a full one is a 503); a job stops at its next token when its client goes away, its
time runs out or the server shuts down; a model process that died is dropped and loaded again."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from starlette.requests import Request

from ..errors import EdgeqwenError, RunnerError
from ..formats import DEFAULT
from ..formats.load import LoadOptions
from ..runner import Sampling
from .metrics import Metrics
from .schemas import ApiError, MAX_BODY


_log = logging.getLogger("edgeqwen")
REQUEST_TIMEOUT_S = 600.0   # llama-server's own default HTTP timeout
READ_TIMEOUT_S = 30.0       # for a request's whole body: a client that stalls mid-body must not hold a connection


# --- the model slot -------------------------------------------------------------------------------

@dataclass
class ServeConfig:
    builds: list[str]
    max_queue: int = 16
    api_key: str | None = None
    max_body: int = MAX_BODY
    cors: str | None = None
    load: LoadOptions = field(default_factory=LoadOptions)   # how every build loads (threads, context, devices...)
    per_build: dict[str, LoadOptions] = field(default_factory=dict)   # build argument -> load, tune's settings in
    request_timeout: float = REQUEST_TIMEOUT_S  # wall-clock seconds one request may generate for
    read_timeout: float = READ_TIMEOUT_S        # wall-clock seconds a client has to send its whole body


@dataclass
class _Slot:
    """The resident model (runner, resident: touched on the model threads) and who may use it (the rest: on the
    event loop). Requests are admitted in FIFO order by ticket: up to the model's width (its --parallel) at once
    while they ask for the same model; one for another model waits until the running ones are done."""
    names: dict[str, str]                # served id -> build argument
    meta: dict[str, dict]
    runner: object = None
    resident: str | None = None
    loading: bool = False
    waiting: int = 0
    failed: str | None = None            # why the last model process died (until the next load)
    turn: asyncio.Condition = field(default_factory=asyncio.Condition)
    active: int = 0                      # admitted, not yet finished
    active_name: str | None = None
    next_ticket: int = 0
    serving: int = 0                     # the ticket at the head of the queue
    abandoned: set = field(default_factory=set)   # tickets whose request left while waiting


class _Tasks(set):
    def add(self, task) -> None:
        super().add(task)
        task.add_done_callback(self.discard)


def _build_meta(arg: str) -> tuple[str, dict]:
    from ..home import resolve_build
    path, manifest = resolve_build(arg)
    m = manifest or {}
    name = m.get("name") or path.stem
    return name, {"id": name, "object": "model", "created": int(path.stat().st_mtime), "owned_by": "edgeqwen",
                  "format": m.get("format") or DEFAULT.name, "quant": m.get("quant"), "file_size": m.get("file_size")}


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
        self.widths = {n: self.options(b).parallel for n, b in names.items()}
        # Loads and one-at-a-time answers on one thread: llama.cpp's OpenMP threads slow down (libgomp throttles
        # their spinning) once a second thread has run a model in the process. Answers of a batched model wait on
        # threads of their own: its runner decodes on its own thread.
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeqwen-model")
        self.streams = concurrent.futures.ThreadPoolExecutor(max_workers=max(self.widths.values()),
                                                             thread_name_prefix="edgeqwen-stream")
        self._loading = threading.Lock()   # several model threads may ask for the same model at once
        self.jobs: set[Job] = set()   # running or about to run: cancelled together at shutdown
        self.pending: set = _Tasks()  # the tasks that free a finished job's place (held until they ran)
        self.closing = False
        self.loop: asyncio.AbstractEventLoop | None = None   # the server's, once a request arrived

    def options(self, build: str) -> LoadOptions:
        return self.cfg.per_build.get(build) or self.cfg.load

    # worker-thread side
    def _ensure(self, name: str):
        with self._loading:
            return self._ensure_locked(name)

    def _ensure_locked(self, name: str):
        s = self.slot
        if s.resident != name:
            s.loading = True
            try:
                if s.runner is not None:
                    s.runner.close()
                    s.runner, s.resident = None, None
                from ..formats.load import load_runner
                _log.info("loading %s", name)
                build = s.names[name]
                s.runner = load_runner(build, self.options(build))
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
        if self.loop is not None:   # waiters see `closing` and are refused
            self.loop.call_soon_threadsafe(lambda: self.pending.add(asyncio.ensure_future(_wake(self))))

    def close(self) -> None:
        def shut():
            if self.slot.runner is not None:
                self.slot.runner.close()
        self.pool.submit(shut).result()
        self.pool.shutdown()
        self.streams.shutdown()


# --- generation -------------------------------------------------------------------------------------

class Scored(NamedTuple):
    """One generated token's log-probability and the most likely alternatives, as exact bytes (the API spells them)."""
    token: bytes
    logprob: float
    top: list[tuple[bytes, float]]


@dataclass(eq=False)   # a job is itself: kept in a set of running jobs
class Job:
    name: str
    chat: list[dict] | None
    prompt: str | None
    sampling: Sampling
    stops: list[str]
    tools: list[dict] | None = None        # shown to the model (serve/tools.py)
    call_names: list[str] | None = None    # the answer's <tool_call> blocks naming these become tool_calls
    cancel: threading.Event = field(default_factory=threading.Event)
    deadline: float = float("inf")   # time.monotonic() after which it stops ("length")


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of text could start a stop string (so they are not sent yet)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                best = max(best, k)
                break
    return best


def _run_job(server: Server, job: Job, emit) -> None:
    """On the worker thread: tokenize, check the context, stream; emit(kind, payload) for each event."""
    runner = server._ensure(job.name)
    try:
        if job.chat is not None:
            from .tools import render
            tokens = runner.tokenize(render(runner, job.chat, job.tools), special=True)
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
    scored: list[tuple[int, Scored]] = []   # tokens not yet reported: where each one's text starts in pending

    def text(upto: int) -> None:
        """Send pending[:upto], after the scores of the tokens whose text starts there (logprobs asked)."""
        nonlocal scored
        if job.sampling.logprobs is not None:
            emit("scores", [t for at, t in scored if at < upto])
            scored = [(at - upto, t) for at, t in scored if at >= upto]
        emit("text", pending[:upto])

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
            # an end of generation ("stop" from the runner) is not part of the answer; a piece of a character is
            if last.logprob is not None and last.token is not None and last.finish_reason != "stop":
                scored.append((len(pending), Scored(runner.token_bytes(last.token), last.logprob,
                                                    [(runner.token_bytes(t), lp) for t, lp in last.top_logprobs])))
            pending += last.text
            hit = min((i for i in (pending.find(s) for s in job.stops) if i >= 0), default=-1)
            if hit >= 0:
                text(hit)
                last.finish_reason = "stop"
                break
            keep = _held_back(pending, job.stops) if job.stops and not last.finish_reason else 0
            if len(pending) > keep:
                text(len(pending) - keep)
                pending = pending[len(pending) - keep:]
    except RunnerError as e:   # the model process died mid-answer (IsolatedRunner): load it afresh next time
        server._drop(str(e))
        raise
    finally:
        with contextlib.suppress(RunnerError):
            stream.close()
    emit("done", last)


def _may_start(server: Server, name: str, ticket: int) -> bool:
    s = server.slot
    room = s.active == 0 or (s.active_name == name and s.active < server.widths[name])
    return server.closing or (ticket == s.serving and room)


async def admit(server: Server, name: str):
    """Wait for the model in FIFO order (several at once up to its width); a full queue is a 503."""
    s = server.slot
    server.loop = asyncio.get_running_loop()
    if server.closing:
        raise ApiError(503, "the server is shutting down", "server_busy")
    if name not in s.names:
        raise ApiError(404, f"model {name!r} is not served here; served: {', '.join(s.names)}", code="model_not_found")
    ticket = s.next_ticket
    if not _may_start(server, name, ticket) and s.waiting >= server.cfg.max_queue:
        raise ApiError(503, f"the queue is full ({server.cfg.max_queue} waiting)", "server_busy",
                       headers={"Retry-After": "2"})
    s.next_ticket += 1
    s.waiting += 1
    server.metrics.queue.set(s.waiting)
    try:
        async with s.turn:
            await s.turn.wait_for(lambda: _may_start(server, name, ticket))
            if not server.closing:
                s.active += 1
                server.metrics.running.set(s.active)
                s.active_name = name
                s.serving += 1
                _skip_abandoned(s)
                s.turn.notify_all()   # the next in line may fit beside this one
    except BaseException:   # the request left while waiting: its place must not block the queue
        s.abandoned.add(ticket)
        _skip_abandoned(s)
        raise
    finally:
        s.waiting -= 1
        server.metrics.queue.set(s.waiting)
    if server.closing:
        raise ApiError(503, "the server is shutting down", "server_busy")


def _skip_abandoned(s: _Slot) -> None:
    while s.serving in s.abandoned:
        s.abandoned.remove(s.serving)
        s.serving += 1


async def _wake(server: Server) -> None:
    async with server.slot.turn:
        server.slot.turn.notify_all()


async def _finished(server: Server) -> None:
    s = server.slot
    async with s.turn:
        s.active -= 1
        server.metrics.running.set(s.active)
        s.turn.notify_all()


def start(server: Server, job: Job) -> asyncio.Queue:
    """Run the job on the model thread (the slot, taken by admit, is released when it ends, whatever the
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
    fut = loop.run_in_executor(server.pool if server.widths[job.name] == 1 else server.streams, work)

    def done(_):
        server.jobs.discard(job)
        server.pending.add(asyncio.ensure_future(_finished(server)))
    fut.add_done_callback(done)
    return q


async def until_gone(request: Request, job: Job) -> None:
    """Set job.cancel when the client disconnects (a non-streaming request: nothing else would notice)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            job.cancel.set()
            return


async def prompt_size(q: asyncio.Queue) -> int:
    """The prompt's token count, or the error that refused it (before any response is started)."""
    kind, payload = await q.get()
    if kind == "error":
        raise payload
    return payload


async def events(q: asyncio.Queue, job: Job):
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


