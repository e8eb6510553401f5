"""Structured output for GGUF builds: a request's response_format as a GBNF grammar for llama.cpp's grammar
sampler, through llama-cpp-python's own JSON-schema converter (not ours). That converter skips keywords it does not
know, so a schema is checked first (formats/constrain.py)."""
from __future__ import annotations

import re

from ...errors import UsageError
from ..constrain import check_schema


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
    text = check_schema(schema)
    try:
        return llama_grammar.json_schema_to_gbnf(text)
    except RecursionError:
        raise UsageError("json_schema.schema is nested too deeply") from None
    except Exception as e:   # the converter's own refusals (an unresolvable $ref, ...) are the schema's
        raise UsageError(f"json_schema.schema cannot be turned into a grammar ({type(e).__name__}: {e})") from None
