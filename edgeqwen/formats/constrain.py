"""What every format's constrained decoding shares: a request's JSON Schema checked once (valid JSON Schema by
jsonschema, a size limit, and only keywords the engines enforce), before a format turns it into its engine's
grammar (gguf/grammar.py: llama.cpp's GBNF; onnx/guidance.py: onnxruntime-genai's llguidance)."""
from __future__ import annotations

import json

from ..errors import UsageError

# What both engines turn into grammar rules (llama-cpp-python's json_schema_to_gbnf and llguidance); the first
# silently drops any other keyword, and an answer that ignores it would still be called valid. Annotations that
# constrain nothing are fine.
ENFORCED = {"type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
            "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "minLength",
            "maxLength", "pattern", "format"}
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
               "readOnly", "writeOnly"}
# the `format` values it has rules for
STRING_FORMATS = {"date", "time", "date-time", "uuid"}
MAX_SCHEMA_BYTES = 64 << 10


def _check_keywords(node, where: str = "schema") -> None:
    if isinstance(node, list):
        for i, x in enumerate(node):
            _check_keywords(x, f"{where}[{i}]")
        return
    if not isinstance(node, dict):
        return
    for k, v in node.items():
        if k in ("properties", "$defs", "definitions"):
            if isinstance(v, dict):
                for name, sub in v.items():
                    _check_keywords(sub, f"{where}.{k}.{name}")
            continue
        if k not in ENFORCED and k not in ANNOTATIONS:
            raise UsageError(f"{where}: the keyword {k!r} is not supported in a constrained answer (supported: "
                             f"{', '.join(sorted(ENFORCED))})")
        if k == "format" and v not in STRING_FORMATS:
            raise UsageError(f"{where}: format {v!r} is not supported (supported: {', '.join(sorted(STRING_FORMATS))})")
        if k in ("items", "additionalProperties", "anyOf", "oneOf", "allOf", "prefixItems"):
            _check_keywords(v, f"{where}.{k}")


def valid_schema(schema, where: str = "json_schema.schema") -> str:
    """schema as JSON text, if it is a JSON Schema object of at most MAX_SCHEMA_BYTES; else a UsageError naming
    why (what a tool's parameters must be even when no grammar enforces them)."""
    if not isinstance(schema, dict):
        raise UsageError(f"{where}: give a JSON Schema object")
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_BYTES:
        raise UsageError(f"{where} is {len(text)} bytes; the limit is {MAX_SCHEMA_BYTES}")
    import jsonschema
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise UsageError(f"{where} is not a valid JSON Schema: {e.message}") from None
    except RecursionError:
        raise UsageError(f"{where} is nested too deeply") from None
    return text


def check_schema(schema, where: str = "json_schema.schema") -> str:
    """valid_schema, and only keywords the engines enforce (a schema an answer is constrained to)."""
    text = valid_schema(schema, where)
    _check_keywords(schema)
    return text
