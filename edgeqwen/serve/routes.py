"""The Starlette app: the OpenAI-compatible endpoints, /health, /metrics, the chat page, and the SSE framing of a
streamed answer. Handlers find the server on the app (request.app.state.server); every response is built here."""
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
from .metrics import timings
from .queue import Job, Server, admit, events, prompt_size, start, until_gone
from .schemas import ApiError, ChatRequest, CompletionRequest, Gone, error_response, parse, read_json, sampling

_log = logging.getLogger("edgeqwen")


def create_app(server: Server) -> Starlette:
    """The app serving server's models (CORS only if the server's config names an origin)."""
    routes = [Route("/", page), Route("/static/{name:path}", static), Route("/health", health),
              Route("/metrics", metrics), Route("/v1/models", models),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    middleware = []
    if server.cfg.cors:
        from starlette.middleware import Middleware
        from starlette.middleware.cors import CORSMiddleware
        middleware.append(Middleware(CORSMiddleware, allow_origins=[server.cfg.cors], allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={404: not_found, 405: method_not_allowed, 500: crashed})
    app.state.server = server
    return app


def _server(request: Request) -> Server:
    return request.app.state.server


def _authorize(request: Request) -> None:
    """--api-key given: the request carries it as a bearer token, or it is a 401."""
    key = _server(request).cfg.api_key
    if not key:
        return
    got = request.headers.get("authorization", "")
    token = got[7:] if got.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(token.encode(), key.encode()):
        raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error",
                       "invalid_api_key")


def _failed(server: Server, endpoint: str, e: Exception) -> JSONResponse:
    """An error response (a domain error from the model thread is a 500), counted in the metrics."""
    if not isinstance(e, ApiError):
        e = ApiError(500, str(e), "server_error")
    server.metrics.record(endpoint, str(e.status))
    return error_response(e)


def _grammar(server: Server, req, forced: dict | None = None) -> str | None:
    """The grammar a request's response_format (or a named or required tool call: forced, the call's schema) asks
    for, from its model's format row; a format that cannot constrain an answer is a 400, never free text."""
    from ..errors import UsageError
    from ..formats import FORMATS
    rf = req.response_format
    if (rf is None or rf.type == "text") and forced is None:
        return None
    if forced is not None and rf is not None and rf.type != "text":
        raise ApiError(400, "response_format and a required or named tool_choice cannot both shape one answer",
                       code="invalid_value")
    choice = getattr(req, "tool_choice", None)
    what = (f"response_format {rf.type}" if forced is None
            else f"tool_choice {choice if isinstance(choice, str) else 'function'}")
    meta = server.slot.meta.get(req.model)
    if meta is None:
        return None   # admit answers 404 for a model not served here
    fmt = FORMATS.get(meta.get("format"))
    if fmt is None or not fmt.constrained:
        which = " or ".join(f.label for f in FORMATS.values() if f.constrained)
        raise ApiError(400, f"{what}: {req.model} is a {fmt.label if fmt else 'foreign'} build; "
                            f"constraining an answer needs a {which} build", code="unsupported_value")
    if forced is not None:
        try:
            return fmt.load("constrained")("tool_call", forced)
        except UsageError as e:
            raise ApiError(400, f"tools: {e}", code="invalid_value") from None
    if rf.type == "json_schema" and rf.json_schema is None:
        raise ApiError(400, "response_format: type json_schema needs a json_schema object", code="invalid_value")
    try:
        return fmt.load("constrained")(rf.type, rf.json_schema.schema_ if rf.json_schema else None)
    except UsageError as e:
        raise ApiError(400, f"response_format: {e}", code="invalid_value") from None


def _message(m) -> dict:
    """A request's message as the model thread renders it (a call's arguments parsed: templates write them)."""
    out = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.tool_calls:
        calls = []
        for c in m.tool_calls:
            try:
                args = json.loads(c.function.arguments)
            except ValueError:
                args = None
            if not isinstance(args, dict):
                raise ApiError(400, f"messages: the arguments of a call to {c.function.name} are not a JSON object",
                               code="invalid_value")
            calls.append({"name": c.function.name, "arguments": args, "id": c.id})
        out["tool_calls"] = calls
    if m.role == "tool":
        out["tool_call_id"] = m.tool_call_id or ""
    return out


def _job(server: Server, req, kind: str) -> Job:
    """The model thread's work for a parsed request."""
    if req.n != 1:
        raise ApiError(400, "n > 1 is not supported: a context serves one sequence", code="invalid_value")
    stops = [clean(x) for x in ([req.stop] if isinstance(req.stop, str) else list(req.stop or []))]
    if isinstance(req, ChatRequest):
        from .tools import call_schema, checked_tools
        tools, forced = checked_tools(req)
        grammar = _grammar(server, req, call_schema(tools, forced) if forced else None)
        chat = [_message(m) for m in req.messages]
        return Job(req.model, chat, None, sampling(req, 1 << 30, grammar), stops, tools=tools,
                   call_names=[t["function"]["name"] for t in tools] if tools else None)
    grammar = _grammar(server, req)
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if len(prompts) != 1:
        raise ApiError(400, "prompt: give one string", code="invalid_value")
    return Job(req.model, None, clean(prompts[0]), sampling(req, 1 << 30, grammar), stops)


async def _generate(request: Request, kind: str):
    server = _server(request)
    endpoint = f"/v1/{kind}"
    try:
        _authorize(request)
        data = await read_json(request, server.cfg.max_body, server.cfg.read_timeout)
        req = parse(ChatRequest if kind == "chat/completions" else CompletionRequest, data)
        job = _job(server, req, kind)
        await admit(server, req.model)
        q = start(server, job)
        n_prompt = await prompt_size(q)
    except (ApiError, EdgeqwenError) as e:
        return _failed(server, endpoint, e)
    except Gone:
        _log.info("%s: the client disconnected before its request was read", endpoint)
        server.metrics.record(endpoint, "499")
        return Response(status_code=499)
    rid = ("chatcmpl-" if kind.startswith("chat") else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    answer = events(q, job)
    if req.stream:
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return _sse(server, endpoint, answer, rid, created, req.model, kind, include_usage, job, n_prompt)
    watcher = asyncio.create_task(until_gone(request, job))
    try:
        text, last, scored = [], None, []
        async for ev, payload in answer:
            if ev == "text":
                text.append(payload)
            elif ev == "scores":
                scored += payload
            else:
                last = payload
    except (ApiError, EdgeqwenError) as e:
        return _failed(server, endpoint, e)
    finally:
        watcher.cancel()
    if last.finish_reason == "cancelled" and job.cancel.is_set() and not server.closing:
        _log.info("%s: the client disconnected after %d tokens: stopped", endpoint, last.generation_tokens)
        server.metrics.record(endpoint, "499", n_prompt, last)
        return Response(status_code=499)
    server.metrics.record(endpoint, "200", n_prompt, last)
    usage = {"prompt_tokens": n_prompt, "completion_tokens": last.generation_tokens,
             "total_tokens": n_prompt + last.generation_tokens}
    content = "".join(text)
    finish = "length" if last.finish_reason == "length" else "stop"
    message = {"role": "assistant", "content": content}
    if job.call_names:
        from .tools import Calls
        split = Calls(job.call_names)
        parts = split.feed(content) + split.finish()
        calls = [x for k, x in parts if k == "call"]
        if calls:
            message = {"role": "assistant", "content": "".join(x for k, x in parts if k == "content") or None,
                       "tool_calls": calls}
            finish = "tool_calls"
    choice = ({"index": 0, "message": message, "finish_reason": finish}
              if kind.startswith("chat") else {"index": 0, "text": content, "finish_reason": finish})
    if job.sampling.logprobs is not None:
        choice["logprobs"] = logprobs_json(scored, kind.startswith("chat"))
    return JSONResponse({"id": rid, "object": "chat.completion" if kind.startswith("chat") else "text_completion",
                         "created": created, "model": req.model, "choices": [choice], "usage": usage,
                         "timings": timings(last)})


async def chat_completions(request: Request):
    return await _generate(request, "chat/completions")


async def completions(request: Request):
    return await _generate(request, "completions")


async def models(request: Request):
    try:
        _authorize(request)
    except ApiError as e:
        return error_response(e)
    return JSONResponse({"object": "list", "data": list(_server(request).slot.meta.values())})


async def health(request: Request):
    s = _server(request).slot
    if s.failed and not s.loading:
        return JSONResponse({"status": "error", "error": s.failed}, status_code=503)
    if s.loading or s.runner is None:
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})
    return JSONResponse({"status": "ok", "model": s.resident})


async def metrics(request: Request):
    try:
        _authorize(request)
    except ApiError as e:
        return error_response(e)
    return Response(generate_latest(_server(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


# The page's own files, by name (nothing from the request becomes a path).
STATIC = {"chat.js": ("chat.js",), "vendor/marked.umd.js": ("vendor", "marked.umd.js"),
          "vendor/purify.min.js": ("vendor", "purify.min.js")}
# scripts only from this server (none inline, so an injected one cannot run), no images or frames from anywhere
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; "
               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


async def page(request: Request):
    from ..resources import data
    return HTMLResponse(data("chat.html").read_text(encoding="utf-8"),
                        headers={"Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff"})


async def static(request: Request):
    from ..resources import data
    parts = STATIC.get(request.path_params["name"])
    if parts is None:
        return error_response(ApiError(404, f"no route {request.url.path}", code="not_found"))
    return Response(data(*parts).read_text(encoding="utf-8"), media_type="text/javascript",
                    headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


async def not_found(request: Request, exc):
    return error_response(ApiError(404, f"no route {request.url.path}", code="not_found"))


async def method_not_allowed(request: Request, exc):
    return error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}"))


async def crashed(request: Request, exc):
    _log.exception("unhandled error")
    return error_response(ApiError(500, "internal error", "server_error"))


def _token(b: bytes) -> str:
    return b.decode("utf-8", "replace")   # a piece of a character: its exact bytes are in "bytes"


def logprobs_json(scored: list, chat: bool, offset: int = 0) -> dict:
    """OpenAI's logprobs object for these tokens: chat's content list, or the legacy completions' columns
    (text_offset counts characters from offset, each token's as its bytes decode)."""
    if chat:
        return {"content": [{"token": _token(s.token), "logprob": s.logprob, "bytes": list(s.token),
                             "top_logprobs": [{"token": _token(b), "logprob": lp, "bytes": list(b)} for b, lp in s.top]}
                            for s in scored], "refusal": None}
    offsets = []
    for s in scored:
        offsets.append(offset)
        offset += len(_token(s.token))
    return {"tokens": [_token(s.token) for s in scored], "token_logprobs": [s.logprob for s in scored],
            "top_logprobs": [{_token(b): lp for b, lp in s.top} for s in scored], "text_offset": offsets}


def _sse(server, endpoint, events, rid, created, model, kind, include_usage, job, n_prompt):
    from sse_starlette.sse import EventSourceResponse
    chat = kind.startswith("chat")
    obj = "chat.completion.chunk" if chat else "text_completion"

    want = job.sampling.logprobs is not None
    done = [0]   # characters sent so far (the legacy text_offset)

    def chunk(delta=None, finish=None, usage=None, timings=None, scored=None):
        choices = [] if usage is not None else [
            {"index": 0, "delta": delta or {}, "finish_reason": finish} if chat
            else {"index": 0, "text": (delta or {}).get("content", ""), "finish_reason": finish}]
        if want and scored is not None and choices:
            choices[0]["logprobs"] = logprobs_json(scored, chat, done[0])
        d = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
        if usage is not None:
            d["usage"] = usage
            d["timings"] = timings
        return {"data": json.dumps(d)}

    async def gen():
        status, last, scored, n_calls = "200", None, [], 0
        split = None
        if job.call_names:
            from .tools import Calls
            split = Calls(job.call_names)

        def parts(text):   # content deltas, and each call whole (OpenAI's index says which call a delta extends)
            nonlocal n_calls
            for k, x in (split.feed(text) if text is not None else split.finish()) if split else [("content", text)]:
                if k == "call":
                    yield {"tool_calls": [{"index": n_calls, **x}]}
                    n_calls += 1
                elif x:
                    yield {"content": x}
        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            async for ev, payload in events:
                if ev == "text":
                    if payload:
                        for delta in parts(payload):
                            yield chunk(delta, scored=scored)
                            scored = []
                        done[0] += len(payload)
                elif ev == "scores":
                    scored += payload
                else:
                    last = payload
            if split:
                for delta in parts(None):
                    yield chunk(delta, scored=scored)
                    scored = []
            finish = "tool_calls" if n_calls else "length" if last.finish_reason == "length" else "stop"
            yield chunk({}, finish)
            if include_usage:
                yield chunk(usage={"prompt_tokens": n_prompt, "completion_tokens": last.generation_tokens,
                                   "total_tokens": n_prompt + last.generation_tokens}, timings=timings(last))
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
            server.metrics.record(endpoint, status, n_prompt, last)
    return EventSourceResponse(gen(), ping=15)


