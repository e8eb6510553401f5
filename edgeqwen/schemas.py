"""Schemas for what edgeqwen reads back from disk (result rows, manifests), checked once where it is read.

pydantic: typed models whose errors name the field, and the server's request schemas use it too.
Unknown fields are kept (rows from newer versions still merge); wrong types and missing fields are one
UsageError naming the file, the line and the field.
"""
from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError,
                      field_validator, model_validator)

from .errors import SourceError, UsageError
from .formats import DEFAULT, FORMATS

FORMAT_NAMES = tuple(FORMATS)   # a manifest's format: a row of the formats table


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


# Every field `table`, claims and plots read from a row is described here with its type and range (strict: a
# string is never taken for a number), so a row that validates renders; unknown fields are kept.
Bytes = Annotated[StrictInt, Field(ge=0, le=1 << 50)]
NonNeg = Annotated[StrictInt | StrictFloat, Field(ge=0, le=1e12)]
Count = Annotated[StrictInt, Field(ge=0, le=1 << 40)]


class _Stat(_Open):
    mean: NonNeg
    sd: NonNeg = 0.0
    n: Count = 0


class _Device(_Open):
    cpu: StrictStr = "?"
    device: StrictStr = "?"
    device_id: StrictStr | None = None
    arch: StrictStr | None = None
    isa: list[StrictStr] = []
    ram_total: Bytes = 0
    bandwidth_gbs: NonNeg | None = None
    emulated: StrictBool = False
    emulator: StrictStr | None = None


class _Build(_Open):
    name: StrictStr
    recipe: StrictStr | None = None
    quant: StrictStr | None = None
    size: StrictStr | None = None
    format: StrictStr = DEFAULT.name
    sha256: StrictStr | None = None
    file_size: Bytes | None = None
    synthetic: StrictBool = False


class _Speculative(_Open):
    draft: StrictStr                 # the draft build's file name, or "lookup"
    drafted: Count = 0
    accepted: Count = 0
    acceptance: Annotated[StrictInt | StrictFloat, Field(ge=0, le=1)] = 0.0


class _BenchFields(_Open):
    status: StrictStr
    threads: Annotated[StrictInt, Field(ge=1, le=4096)]
    error: StrictStr = ""
    backend: StrictStr = "-"
    pp: _Stat | None = None
    tg: _Stat | None = None
    tg_empty: _Stat | None = None
    ttft_s: _Stat | None = None
    load_s: NonNeg | None = None
    peak_rss_sampled: Bytes | None = None
    max_rss: Bytes | None = None
    roofline_frac: NonNeg | None = None
    memory_limit: Bytes | None = None
    workers: list[StrictStr] | None = None
    lean: StrictBool = False
    prompt_tokens: Count | None = None
    gen_tokens: Count | None = None
    busy: StrictBool = False
    load: dict[StrictStr, NonNeg] | None = None
    speculative: _Speculative | None = None
    kv: Literal["f16", "q8_0"] = "f16"

    @model_validator(mode="after")
    def _ok_has_figures(self):
        if self.status == "ok":
            missing = [k for k in ("tg", "pp", "load_s") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"an ok bench row needs {', '.join(missing)}")
        return self


class _EvalFields(_Open):
    text: StrictStr
    ppl: Annotated[StrictInt | StrictFloat, Field(gt=0, le=1e12)]
    tokens_scored: Count = None   # optional, never null
    # optional, but never null: the table formats what is present
    ref_ppl: NonNeg = None
    kl_mean: NonNeg = None
    kl_p99: NonNeg = None
    top1: Annotated[StrictInt | StrictFloat, Field(ge=0, le=1)] = None
    reference: StrictStr | None = None
    kv: Literal["f16", "q8_0"] = "f16"   # the build's KV cache type while it was scored

    @model_validator(mode="after")
    def _kl_pair(self):
        if (self.kl_mean is None) != (self.kl_p99 is None):
            raise ValueError("kl_mean and kl_p99 come together")
        return self


class _Probe(_Open):
    limit: Bytes
    tg: NonNeg | None = None
    # "pass" is a keyword: read through the alias
    passed: StrictBool = Field(alias="pass")


class _FitFields(_Open):
    min_ram: Annotated[StrictInt, Field(ge=1, le=1 << 50)]
    baseline_tg: NonNeg
    tg_at_min: NonNeg
    peak_rss_unlimited: Bytes
    lean: StrictBool
    fraction: NonNeg | None = None
    probes: list[_Probe] = []


class Row(_Open):
    schema_: Literal[1] = Field(alias="schema")
    kind: Literal["bench", "eval", "fit"]
    time: StrictStr
    id: StrictStr = None   # optional, never null: rows are deduplicated by it
    device: _Device
    build: _Build


ROW_FIELDS = {"bench": _BenchFields, "eval": _EvalFields, "fit": _FitFields}


_UNION_MEMBER = re.compile(r"^(int|float|str|bool|list|dict|none|[a-z-]+\[.*\])$")


def _validate(model: type[BaseModel], data, where, what: str, kind: str, error: type[Exception]) -> BaseModel:
    """data as read from a file, validated: one error naming the file (and line) and the field."""
    if not isinstance(data, dict):
        raise error(f"{where}: {what} must be {kind}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        # a union's member names ("int", "function-after[...]") are pydantic's, not the file's
        field = ".".join(str(p) for p in err["loc"] if not _UNION_MEMBER.match(str(p))) or what
        raise error(f"{where}: {field}: {err['msg']}") from None


def check(model: type[BaseModel], data, where: str, what: str, kind: str = "a JSON object") -> dict:
    """Result rows, manifests, profiles, claims: a UsageError on a bad one; the data itself when good."""
    _validate(model, data, where, what, kind, UsageError)
    return data


def check_typed(model: type[BaseModel], data, where: str, what: str):
    """As check, returning the typed model (a config a manifest or recipe gives plan)."""
    return _validate(model, data, where, what, "a JSON object", UsageError)


def check_row(data, where: str) -> dict:
    check(Row, data, where, "a row")
    return check(ROW_FIELDS[data["kind"]], data, where, f"a {data['kind']} row")


class Manifest(_Open):
    name: str
    format: Literal[FORMAT_NAMES] = DEFAULT.name
    quant: str
    file: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")   # one file inside the build folder
    file_size: int = Field(ge=0)
    sha256: str | None = None


def check_manifest(data, where: str) -> dict:
    return check(Manifest, data, where, "an edgeqwen manifest")


# --- a checkpoint's files: config.json, the safetensors index and headers, the tokenizer --------------

Pos = Annotated[StrictInt, Field(ge=1)]
Num = StrictInt | StrictFloat


class RopeScaling(_Open):
    type: str | None = None
    rope_type: str | None = None
    factor: Num | None = Field(None, gt=0, le=1024)
    original_max_position_embeddings: Annotated[StrictInt, Field(ge=1, le=1 << 24)] | None = None

    @model_validator(mode="after")
    def _needs_factor(self):
        kind = self.rope_type or self.type
        if kind in ("yarn", "linear", "dynamic", "longrope") and self.factor is None:
            raise ValueError(f"{kind} rope scaling needs a factor")
        return self


class ModelConfig(_Open):
    """A Qwen2-family config.json, typed and bounded: what every stage reads instead of the raw dict."""
    model_type: str | None = None
    architectures: list[str] | None = None
    hidden_size: Annotated[StrictInt, Field(ge=1, le=1 << 16)]
    intermediate_size: Annotated[StrictInt, Field(ge=1, le=1 << 20)]
    num_hidden_layers: Annotated[StrictInt, Field(ge=1, le=1024)]
    num_attention_heads: Annotated[StrictInt, Field(ge=1, le=1024)]
    num_key_value_heads: Annotated[StrictInt, Field(ge=1, le=1024)]
    vocab_size: Annotated[StrictInt, Field(ge=1, le=1 << 22)]
    max_position_embeddings: Annotated[StrictInt, Field(ge=1, le=1 << 24)]
    rope_theta: Annotated[Num, Field(gt=0, le=1e12)]
    rms_norm_eps: Annotated[Num, Field(gt=0, lt=1)]
    head_dim: Annotated[StrictInt, Field(ge=1, le=1024)] | None = None
    tie_word_embeddings: StrictBool = False
    rope_scaling: RopeScaling | None = None
    bos_token_id: Annotated[StrictInt, Field(ge=0)] | None = None
    eos_token_id: Annotated[StrictInt, Field(ge=0)] | list[Annotated[StrictInt, Field(ge=0)]] | None = None

    @model_validator(mode="after")
    def _shape(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} does not divide into {self.num_attention_heads} heads")
        return self

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rope_kind(self) -> str | None:
        """The rope scaling's kind ("yarn", ...), or None for plain rope."""
        r = self.rope_scaling
        return (r.rope_type or r.type) if r else None

    def extra(self, key: str, default=None):
        """A config.json key this schema does not name (an MoE's expert counts, say)."""
        return (self.model_extra or {}).get(key, default)


class WeightIndex(_Open):
    # each value is one file beside the index: a name, never a path (no folders, no "..")
    weight_map: dict[str, Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors$")]]


class TensorEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dtype: str
    shape: Annotated[list[Annotated[StrictInt, Field(ge=0, le=1 << 32)]], Field(max_length=8)]
    data_offsets: tuple[Annotated[StrictInt, Field(ge=0)], Annotated[StrictInt, Field(ge=0)]]

    @field_validator("data_offsets")
    @classmethod
    def _ordered(cls, v):
        if v[1] < v[0]:
            raise ValueError("end before begin")
        return v


class TokenizerModel(_Open):
    vocab: dict[str, Annotated[StrictInt, Field(ge=0, lt=1 << 22)]]
    merges: list | None = None


class AddedToken(_Open):
    id: Annotated[StrictInt, Field(ge=0, lt=1 << 22)]
    content: str
    special: StrictBool = False


class TokenizerFile(_Open):
    model: TokenizerModel
    added_tokens: list[AddedToken] = []


class TokenizerConfig(_Open):
    chat_template: str | list | None = None
    eos_token: str | dict | None = None


def check_source(model: type[BaseModel], data, where, what: str):
    """A checkpoint's files: a SourceError naming the file and the field; returns the typed model."""
    return _validate(model, data, where, what, "a JSON object", SourceError)


def read_json(path, what: str, error=SourceError):
    """A JSON file as read at the boundary: unreadable, not UTF-8, not JSON, or absurdly nested are one error."""
    import json
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise error(f"{path}: {what} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: {what} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise error(f"{path}: {what} is nested too deeply") from None


def read_cache(path, what: str) -> dict:
    """A cache or state file of ours as a JSON object: absent is empty; unreadable, malformed or not an object is
    empty too, with one warning line (we write it again), never an error that stops the command."""
    if not path.exists():
        return {}
    try:
        data = read_json(path, what)
    except SourceError as e:
        data = e
    if not isinstance(data, dict):
        if str(path) not in _WARNED:   # a cache read, then updated, in one command: said once
            import logging
            why = data if isinstance(data, SourceError) else f"{path}: {what} is not a JSON object"
            logging.getLogger("edgeqwen").warning(f"{why}; ignored (edgeqwen writes it again)")
            _WARNED.add(str(path))
        return {}
    return data


_WARNED: set[str] = set()


# --- device profiles and claims (TOML) ----------------------------------------------------------------

class _Match(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device: str | None = None
    cpu: str | None = None
    ram_gib: Annotated[Num, Field(gt=0, le=1 << 16)] | None = None

    @field_validator("device", "cpu")
    @classmethod
    def _regex(cls, v):
        import re
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a regular expression ({e})") from None
        return v


class DeviceProfile(_Open):
    ram_gib: Annotated[Num, Field(gt=0, le=1 << 16)]
    bandwidth_gbs: Annotated[Num, Field(gt=0, le=1e5)]
    source: str
    match: _Match | None = None
    usable_fraction: Annotated[Num, Field(gt=0, le=1)] = 0.8
    efficiency: Annotated[Num, Field(gt=0, le=1)] = 0.6
    amx: StrictBool = False
    unified_memory: StrictBool = False   # Apple Silicon: CPU and GPU share the RAM (MLX's working-set limit)


class PublishedRow(BaseModel):
    """A measurement someone published (data/published.toml): every figure with its source."""
    model_config = ConfigDict(extra="forbid")
    device: str
    device_class: Literal["pi", "apple", "x86"]
    chip: str
    ram_gib: Annotated[Num, Field(gt=0, le=1 << 12)] | None = None
    gpu_cores: Annotated[StrictInt, Field(ge=1, le=1024)] | None = None
    bandwidth_gbs: Annotated[Num, Field(gt=0, le=1e4)] | None = None
    backend: Literal["llama.cpp CPU", "llama.cpp Metal", "Ollama", "Ollama Metal", "MLX"]
    threads: Annotated[StrictInt, Field(ge=1, le=1024)] | None = None
    model: str
    params_b: Annotated[Num, Field(gt=0, le=1e4)]
    quant: str
    file_gib: Annotated[Num, Field(gt=0, le=1e4)] | None = None
    test: str
    tok_s: Annotated[Num, Field(gt=0, le=1e6)]
    source: Annotated[str, Field(pattern=r"^https://")]
    source_date: str | None = None
    ambiguous: StrictBool = False
    note: str | None = None


class Claim(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    text: str | None = None
    model: str
    quant: str
    device: str
    format: str | None = None
    min_decode_tps: Annotated[Num, Field(gt=0, le=1e6)] | None = None
    max_peak_rss_gib: Annotated[Num, Field(gt=0, le=1 << 16)] | None = None
    ctx: Annotated[StrictInt, Field(ge=16, le=1 << 24)] | None = None
    source: str | None = None
    fits: StrictBool | None = None
