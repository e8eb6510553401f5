"""Tool calls (OpenAI's `tools` and `tool_choice`): the tools reach the model through its own chat template when
that has a tools section, and otherwise in Qwen2.5's convention (the tools listed in the system turn, each call a
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` block, each result a `<tool_response>` block in a user
turn); the blocks in an answer become OpenAI `tool_calls`, streamed or not. A named or required call is
grammar-constrained on formats that can constrain an answer (the format row's `constrained`)."""
from __future__ import annotations

import json
import uuid

from .schemas import ApiError, ChatRequest

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# Qwen2.5's own wording (its chat template's tools section), which its models were trained to follow
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
HEADER = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
          "with function signatures within <tools></tools> XML tags:\n<tools>")
FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
          "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
          "<args-json-object>}\n</tool_call>")


def template_has_tools(template: str | None) -> bool:
    """A chat template that renders a `tools` variable itself (Jinja), as Qwen2.5's and most newer ones do."""
    return bool(template) and "tools" in template


def checked_tools(req: ChatRequest) -> tuple[list[dict] | None, list[str] | None]:
    """(the tools to show the model, the names a call must be one of: None for free text) for a request; bad
    tools or a tool_choice that names no given tool are a 400."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise ApiError(400, "tool_choice needs tools", code="invalid_value")
        return None, None
    from ..errors import UsageError
    from ..formats.constrain import valid_schema
    names = [t.function.name for t in req.tools]
    if len(set(names)) != len(names):
        raise ApiError(400, "tools: two functions have the same name", code="invalid_value")
    for t in req.tools:
        if t.function.parameters is not None:
            try:
                valid_schema(t.function.parameters, f"tools: {t.function.name}'s parameters")
            except UsageError as e:
                raise ApiError(400, str(e), code="invalid_value") from None
    if choice == "none":
        return None, None
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    if choice is None or choice == "auto":
        return tools, None
    if choice == "required":
        return tools, names
    if choice.function.name not in names:
        raise ApiError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools "
                            f"({', '.join(names)})", code="invalid_value")
    return tools, [choice.function.name]


def call_schema(tools: list[dict], names: list[str]) -> dict:
    """The JSON Schema of one call to any of names: its name, and arguments that follow that tool's parameters."""
    params = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools}
    one = [{"type": "object", "properties": {"name": {"const": n}, "arguments": params[n]},
            "required": ["name", "arguments"]} for n in names]
    return one[0] if len(one) == 1 else {"anyOf": one}


def in_convention(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """messages for a template without a tools section: the tools in the system turn, earlier calls as blocks in
    the assistant's text, results as <tool_response> blocks in user turns (consecutive ones together)."""
    out = [dict(m) for m in messages]
    if tools:
        listing = HEADER + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools) + FOOTER
        if out and out[0]["role"] == "system":
            out[0]["content"] = out[0]["content"] + listing
        else:
            out.insert(0, {"role": "system", "content": DEFAULT_SYSTEM + listing})
    merged: list[dict] = []
    for m in out:
        if m["role"] == "assistant" and m.get("tool_calls"):
            blocks = [f"{OPEN}\n" + json.dumps({"name": c["name"], "arguments": c["arguments"]}, ensure_ascii=False)
                      + f"\n{CLOSE}" for c in m["tool_calls"]]
            m = {"role": "assistant", "content": "\n".join(([m["content"]] if m["content"] else []) + blocks)}
        elif m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if merged and merged[-1].get("from_tools"):
                merged[-1]["content"] += "\n" + block
                continue
            m = {"role": "user", "content": block, "from_tools": True}
        merged.append(m)
    return [{k: v for k, v in m.items() if k != "from_tools"} for m in merged]


def template_messages(messages: list[dict]) -> list[dict]:
    """messages as Hugging Face templates read them: a call's arguments as an object."""
    return [{**m, "tool_calls": [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                                 for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages]


def render(runner, messages: list[dict], tools: list[dict] | None) -> str:
    """The prompt text: the model's own template with the tools when it has a tools section, else the convention."""
    if template_has_tools(runner.chat_template):
        return runner.apply_chat_template(template_messages(messages), tools=tools)
    return runner.apply_chat_template(in_convention(messages, tools))


def _call(body: str, allowed: set[str]) -> dict | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("name") not in allowed:
        return None
    args = data.get("arguments", {})
    if isinstance(args, str):   # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": data["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


class Calls:
    """An answer's text, fed as it streams, split into content and calls: ("content", text) and ("call", call)
    events. Text that could be the start of a block is held back; a block that is not a call to a given tool
    (bad JSON, an unknown name) stays content; whitespace beside calls is dropped."""

    def __init__(self, names: list[str]):
        self.allowed, self.buf, self.ws, self.n = set(names), "", "", 0

    def _content(self, text: str, out: list) -> None:
        if not text:
            return
        if not text.strip():
            self.ws += text
            return
        out.append(("content", (self.ws if not self.n else "") + text))
        self.ws = ""

    def feed(self, text: str) -> list[tuple[str, object]]:
        self.buf += text
        out: list = []
        while True:
            i = self.buf.find(OPEN)
            if i < 0:
                keep = next((k for k in range(min(len(OPEN) - 1, len(self.buf)), 0, -1)
                             if self.buf.endswith(OPEN[:k])), 0)
                self._content(self.buf[:len(self.buf) - keep], out)
                self.buf = self.buf[len(self.buf) - keep:]
                return out
            self._content(self.buf[:i], out)
            j = self.buf.find(CLOSE, i)
            if j < 0:
                self.buf = self.buf[i:]
                return out
            call = _call(self.buf[i + len(OPEN):j], self.allowed)
            if call is None:
                self._content(self.buf[i:j + len(CLOSE)], out)
            else:
                self.n += 1
                self.ws = ""
                out.append(("call", call))
            self.buf = self.buf[j + len(CLOSE):]

    def finish(self) -> list[tuple[str, object]]:
        out: list = []
        rest, self.buf = self.buf, ""
        self._content(rest, out)
        return out
