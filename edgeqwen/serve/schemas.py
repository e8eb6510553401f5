"""The HTTP API's requests and errors: pydantic schemas (types and ranges checked once, at the boundary),
the body reader (size limit, invalid or too deeply nested JSON, a client gone mid-body) and OpenAI's error shape."""
from __future__ import annotations

import json
import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..runner import Sampling
from ..text import clean


_log = logging.getLogger("edgeqwen")
MAX_BODY = 1 << 20


# --- request schemas (pydantic: types and ranges checked once, at the boundary) -------------------

class _JsonSchema(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field("schema", max_length=64)
    schema_: dict = Field(alias="schema")
    strict: bool | None = None   # always enforced here: a grammar allows nothing else


class ResponseFormat(BaseModel):
    """OpenAI's response_format: free text, any JSON object, or JSON that follows a schema."""
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: _JsonSchema | None = None


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
    response_format: ResponseFormat | None = None


class _Part(BaseModel):
    type: Literal["text"]
    text: str


class _Function(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")   # OpenAI's rule for a function's name
    arguments: str = Field(max_length=MAX_BODY)


class _ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field("", max_length=256)
    type: Literal["function"] = "function"
    function: _Function


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[_Part] | None = None
    tool_calls: list[_ToolCall] | None = None   # an assistant's earlier calls
    tool_call_id: str | None = Field(None, max_length=256)   # a tool's result answers this call

    def text(self) -> str:
        if self.content is None:
            if self.role == "assistant" and self.tool_calls:
                return ""
            raise ApiError(400, f"messages: a {self.role} message needs content", code="invalid_value")
        return clean(self.content if isinstance(self.content, str) else "".join(p.text for p in self.content))


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(None, max_length=8192)
    parameters: dict | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDef


class _Named(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


class _ToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: _Named


class ChatRequest(_Req):
    messages: list[_Message] = Field(min_length=1)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | _ToolChoice | None = None
    parallel_tool_calls: bool | None = None   # several calls in one answer are always allowed
    logprobs: StrictBool | None = None   # "yes" is not a boolean
    top_logprobs: int | None = Field(None, ge=0, le=20)   # OpenAI's range

    def wanted_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", code="invalid_value")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Req):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)   # the legacy API's: this many alternatives per token

    def wanted_logprobs(self) -> int | None:
        return self.logprobs


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse({"error": {"message": e.message, "type": e.type, "code": e.code}}, status_code=e.status,
                        headers=e.headers)


def sampling(req: ChatRequest | CompletionRequest, n_default: int, grammar: str | None = None) -> Sampling:
    return Sampling(max_tokens=req.max_completion_tokens or req.max_tokens or n_default,
                    temperature=0.7 if req.temperature is None else req.temperature,
                    top_p=0.8 if req.top_p is None else req.top_p, seed=req.seed, ignore_eos=req.ignore_eos,
                    grammar=grammar, logprobs=req.wanted_logprobs())


class Gone(Exception):
    """The client went away before its request was read (a normal event: one log line, no response)."""


async def read_json(request: Request, limit: int, timeout: float) -> dict:
    import asyncio

    from starlette.requests import ClientDisconnect
    size = request.headers.get("content-length")
    if size and size.isdigit() and int(size) > limit:
        raise ApiError(413, f"the request body is {size} bytes; the limit is {limit}", code="body_too_large")
    body = b""
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ApiError(413, f"the request body is over the limit of {limit} bytes",
                                   code="body_too_large")
    except ClientDisconnect:
        raise Gone from None
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s (--read-timeout)",
                       code="request_timeout") from None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the body is not valid JSON") from None
    except RecursionError:
        raise ApiError(400, "the body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    return data


def parse(model: type[BaseModel], data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "body"
        raise ApiError(400, f"{where}: {err['msg']}", code="invalid_value") from None


