"""The Starlette app: the OpenAI-compatible endpoints, /health, /metrics, the chat page, and the SSE framing of a
streamed answer."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid

from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..errors import EdgeqwenError
from ..text import clean
from .metrics import _failed, _record, _timings
from .queue import Server, _Job, _admit, _events, _first, _start, _until_gone
from .schemas import ApiError, ChatRequest, CompletionRequest, _Gone, _error, _parse, _read_json, _sampling


_log = logging.getLogger("edgeqwen")
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
            data = await _read_json(request, cfg.max_body, cfg.read_timeout)
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


