"""Schemas for what edgeqwen reads back from disk (result rows, manifests), checked once where it is read.

pydantic: typed models whose errors name the field, and the server's request schemas use it too.
Unknown fields are kept (rows from newer versions still merge); wrong types and missing fields are one
UsageError naming the file, the line and the field.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UsageError


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class _Stat(_Open):
    mean: float
    sd: float = 0.0
    n: int = 0


class _Device(_Open):
    cpu: str = "?"
    device: str = "?"
    isa: list[str] = []
    ram_total: int = 0


class _Build(_Open):
    name: str
    quant: str | None = None
    size: str | None = None
    format: str = "gguf"
    sha256: str | None = None
    file_size: int | None = Field(None, ge=0)


class Row(_Open):
    schema_: Literal[1] = Field(alias="schema")
    kind: Literal["bench", "eval", "fit"]
    time: str
    device: _Device
    build: _Build

    @model_validator(mode="after")
    def _by_kind(self):
        x = self.model_extra or {}
        need = {"bench": ("status", "threads"), "eval": ("text", "ppl"),
                "fit": ("min_ram", "baseline_tg", "tg_at_min", "peak_rss_unlimited", "lean")}[self.kind]
        missing = [k for k in need if k not in x]
        if missing:
            raise ValueError(f"a {self.kind} row needs {', '.join(missing)}")
        if self.kind == "bench" and x["status"] == "ok":
            for k in ("tg", "pp"):
                _Stat.model_validate(x.get(k))
        if self.kind == "fit" and not (isinstance(x["min_ram"], int) and x["min_ram"] > 0):
            raise ValueError("min_ram must be a positive number of bytes")
        return self


def _check(model: type[BaseModel], data, where: str, what: str) -> dict:
    """data as read from a file, validated: one UsageError naming the file (and line) and the field."""
    if not isinstance(data, dict):
        raise UsageError(f"{where}: {what} must be a JSON object")
    try:
        model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or what
        raise UsageError(f"{where}: {field}: {err['msg']}") from None
    return data


def check_row(data, where: str) -> dict:
    return _check(Row, data, where, "a row")


class Manifest(_Open):
    name: str
    format: Literal["gguf", "onnx"] = "gguf"
    quant: str
    file: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")   # one file inside the build folder
    file_size: int = Field(ge=0)
    sha256: str | None = None


def check_manifest(data, where: str) -> dict:
    return _check(Manifest, data, where, "an edgeqwen manifest")
