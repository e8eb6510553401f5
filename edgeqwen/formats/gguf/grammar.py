"""Structured output for GGUF builds: a request's response_format as a GBNF grammar for llama.cpp's grammar
sampler, through llama-cpp-python's own JSON-schema converter (not ours). That converter skips keywords it does not
know, so a schema is checked first: valid JSON Schema (jsonschema), and only keywords the grammar enforces."""
from __future__ import annotations

import json
import re

from ...errors import UsageError

# What llama-cpp-python's json_schema_to_gbnf turns into grammar rules; any other keyword would be silently
# dropped, and an answer that ignores it would still be called valid. Annotations that constrain nothing are fine.
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


def grammar(kind: str, schema: dict | None = None) -> str:
    """The GBNF grammar of a response format: "json_object" (any JSON object) or "json_schema" (that schema), or
    of "tool_call": one `<tool_call>` block (serve/tools.py's convention) whose JSON follows schema; a schema that is
    not valid JSON Schema or asks for what the grammar cannot enforce is a UsageError."""
    from llama_cpp import llama_grammar
    if kind == "json_object":
        return llama_grammar.JSON_GBNF
    if kind == "tool_call":   # the converter's root becomes the block's body
        body = re.sub(r"^root ::=", "tool-call-body ::=", grammar("json_schema", schema), count=1, flags=re.M)
        return 'root ::= "<tool_call>\\n" tool-call-body "\\n</tool_call>"\n' + body
    if not isinstance(schema, dict):
        raise UsageError("json_schema.schema: give a JSON Schema object")
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_BYTES:
        raise UsageError(f"json_schema.schema is {len(text)} bytes; the limit is {MAX_SCHEMA_BYTES}")
    import jsonschema
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise UsageError(f"json_schema.schema is not a valid JSON Schema: {e.message}") from None
    except RecursionError:
        raise UsageError("json_schema.schema is nested too deeply") from None
    _check_keywords(schema)
    try:
        return llama_grammar.json_schema_to_gbnf(text)
    except RecursionError:
        raise UsageError("json_schema.schema is nested too deeply") from None
    except Exception as e:   # the converter's own refusals (an unresolvable $ref, ...) are the schema's
        raise UsageError(f"json_schema.schema cannot be turned into a grammar ({type(e).__name__}: {e})") from None
