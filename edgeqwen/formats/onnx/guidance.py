"""Structured output for ONNX builds: onnxruntime-genai's guidance (llguidance inside it) takes a JSON Schema or a
Lark grammar for a request's response_format or a forced tool call; the schema is checked first as for every format
(formats/constrain.py). llguidance lets JSON have any whitespace between tokens, so a model could pad an answer
with spaces until max_tokens: the schema asks for compact JSON instead (its "x-guidance" options)."""
from __future__ import annotations

import json

from ..constrain import check_schema

COMPACT = {"x-guidance": {"whitespace_flexible": False}}


def guidance(kind: str, schema: dict | None = None) -> str:
    """(genai's guidance type, its data) as JSON text, the ONNX runner's Sampling.grammar: "json_object" (any
    object), "json_schema" (that schema) or "tool_call" (one <tool_call> block whose JSON follows schema)."""
    if kind == "json_object":
        return json.dumps({"type": "json_schema", "data": json.dumps({"type": "object", **COMPACT})})
    check_schema(schema)
    compact = json.dumps({**schema, **COMPACT})
    if kind == "tool_call":   # serve/tools.py's convention
        lark = 'start: "<tool_call>\\n" body "\\n</tool_call>"\nbody: %json ' + compact
        return json.dumps({"type": "lark_grammar", "data": lark})
    return json.dumps({"type": "json_schema", "data": compact})
