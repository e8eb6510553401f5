"""The one rule for text from outside (arguments, stdin, chat input, HTTP bodies, text files): UTF-8, and what
is not valid UTF-8 becomes U+FFFD, as the backends' decoders already do for a model's output bytes.

Python hands over undecodable input as lone surrogates (arguments, and stdin under a C locale, by
surrogateescape; a JSON "\\ud800" escape), which no tokenizer can encode: they are turned back into the bytes they
stood for and decoded with replacement. NUL and control characters are valid text and are kept.
"""
from __future__ import annotations


def clean(text: str) -> str:
    """text with every character that does not stand for valid UTF-8 replaced by U+FFFD."""
    try:
        text.encode("utf-8")
        return text   # the common case: nothing to do
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")   # bytes Python could not decode, given back
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")     # other lone surrogates (JSON escapes)
    return raw.decode("utf-8", "replace")


def decode(data: bytes) -> str:
    """Bytes from outside (stdin, a file) as text by the same rule."""
    return data.decode("utf-8", "replace")
