"""Recipes: TOML files in edgeqwen/data/recipes/ that say what a model size is and where it comes from.

Parsed strictly: an unknown key, size or quant fails with the valid choices in the message.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from .arch import ARCHS, Arch
from .errors import RecipeError, UsageError
from .formats import FORMATS as _FORMATS
from .formats import named_quants

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# Every llama.cpp file type by its lower-case name, taken from gguf's own enum.
GGUF_QUANTS: dict[str, gguf.LlamaFileType] = {
    t.name.removeprefix("MOSTLY_").removeprefix("ALL_").lower(): t
    for t in gguf.LlamaFileType if t is not gguf.LlamaFileType.GUESSED
}
# Written directly by the converter, no quantize pass.
CONVERTER_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                   "bf16": gguf.GGMLQuantizationType.BF16}
# libllama refuses these without an importance matrix, which edgeqwen does not compute (checked:
# the vendored llama.cpp says "this quantization requires an imatrix!" for each).
NEEDS_IMATRIX = {"iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "q2_k_s"}
# Meaningless for a dense model, or not a type llama_model_quantize writes ("invalid output file type").
NOT_FOR_DENSE = {"mxfp4_moe", "nvfp4"}
# The other formats' quant names are their rows' (the formats table): ONNX precisions (onnxruntime-genai decoders,
# block-32 weights; onnx/export.py's PRECISIONS says how each quantizes) and MLX's affine 4/8-bit and bf16.
FORMATS = tuple(_FORMATS)
# The short names every recipe ships with; a recipe's [aliases] may add more.
DEFAULT_ALIASES = {"q4": "q4_k_m", "q8": "q8_0"}

_TOP_KEYS = {"name", "size", "arch", "hub_repo", "revision", "context_length", "tied_embeddings",
             "description", "aliases", "config"}
_REQUIRED = {"name", "size", "arch", "hub_repo", "revision", "context_length", "tied_embeddings", "config"}


@dataclass(frozen=True)
class Recipe:
    name: str
    size: str
    arch: Arch
    hub_repo: str
    revision: str
    context_length: int
    tied_embeddings: bool
    config: dict
    aliases: dict = field(default_factory=dict)
    description: str = ""
    path: Path | None = None

    def quant_names(self) -> list[str]:
        return sorted(self.aliases) + [q for f in _FORMATS.values() for q in quants_of(f.name)]

    def resolve_quant(self, quant: str, fmt: str | None = None) -> str:
        """'q4' -> 'q4_k_m'; checks the name against every llama.cpp file type and the ONNX precisions.

        fmt ('gguf'/'onnx') insists on a format; by default the name decides it.
        """
        q = quant.lower()
        q = self.aliases.get(q, DEFAULT_ALIASES.get(q, q))
        if fmt is not None and fmt not in FORMATS:
            raise UsageError(f"unknown format {fmt!r}; choose {' or '.join(FORMATS)}")
        for row in _FORMATS.values():   # the formats with names of their own (GGUF owns the rest)
            if not row.quants:
                continue
            if q in row.quants:
                if fmt not in (None, row.name):
                    raise UsageError(f"{quant!r} is {row.quant_word}; {fmt} quants: {', '.join(quants_of(fmt))}")
                return q
            if fmt == row.name:
                raise UsageError(f"{quant!r} is not {row.quant_word}; choose {', '.join(row.quants)}")
        if q not in GGUF_QUANTS:
            raise UsageError(f"unknown quant {quant!r}; choose one of: {', '.join(self.quant_names())}")
        if q in NEEDS_IMATRIX:
            raise UsageError(f"{q} needs an importance matrix, which edgeqwen does not compute; "
                             "use q3_k_s, q2_k or a larger type")
        if q in NOT_FOR_DENSE:
            raise UsageError(f"{q} cannot be built by llama.cpp's quantizer for a dense model like {self.name}")
        return q

    def hf_config(self) -> dict:
        """The full config.json this recipe describes (what --synthetic writes)."""
        cfg = dict(self.arch.synthetic_defaults)
        cfg.update(self.config)
        cfg["tie_word_embeddings"] = self.tied_embeddings
        cfg.setdefault("max_position_embeddings", self.context_length)
        return cfg


def quants_of(fmt: str) -> list[str]:
    """The quant names a format builds: its row's, or for the default row every buildable llama.cpp file type."""
    row = _FORMATS[fmt]
    return buildable_gguf_quants() if row.default else list(row.quants)


def buildable_gguf_quants() -> list[str]:
    """The llama.cpp file types edgeqwen can build (those needing an imatrix, or MoE-only, left out)."""
    return sorted(set(GGUF_QUANTS) - NEEDS_IMATRIX - NOT_FOR_DENSE)


def load_toml(path, what: str = "file") -> dict:
    """Parse a TOML file (a Path or a packaged resource); a missing or malformed one is one clear UsageError."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"{path}: cannot read {what} ({e})") from None


def _fail(path: Path, msg: str) -> RecipeError:
    return RecipeError(f"recipe {path.name}: {msg}")


def parse_recipe(path) -> Recipe:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise _fail(path, f"cannot read: {e}") from None
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise _fail(path, f"unknown key(s) {', '.join(sorted(unknown))}; valid keys: {', '.join(sorted(_TOP_KEYS))}")
    missing = _REQUIRED - set(data)
    if missing:
        raise _fail(path, f"missing key(s) {', '.join(sorted(missing))}")
    if data["arch"] not in ARCHS:
        raise _fail(path, f"unknown arch {data['arch']!r}; known: {', '.join(ARCHS)}")
    arch = ARCHS[data["arch"]]
    config = dict(data["config"])
    absent = [k for k in arch.required_config if k not in config]
    if absent:
        raise _fail(path, f"[config] lacks {', '.join(absent)}")
    aliases = {k.lower(): v.lower() for k, v in data.get("aliases", {}).items()}
    for alias, target in aliases.items():
        if target not in GGUF_QUANTS and target not in named_quants():
            raise _fail(path, f"alias {alias} -> {target!r} is not a quant type; choose from {', '.join(GGUF_QUANTS)}")
    for key, typ in (("context_length", int), ("tied_embeddings", bool), ("revision", str), ("hub_repo", str)):
        if not isinstance(data[key], typ):
            raise _fail(path, f"{key} must be a {typ.__name__}")
    return Recipe(name=data["name"], size=str(data["size"]).lower(), arch=arch, hub_repo=data["hub_repo"],
                  revision=data["revision"], context_length=data["context_length"],
                  tied_embeddings=data["tied_embeddings"], config=config, aliases=aliases,
                  description=data.get("description", ""), path=path)


def recipe_files() -> list:
    """EDGEQWEN_RECIPES folders first, then the recipes shipped in the package."""
    import os

    from .resources import recipe_files as packaged
    dirs = [Path(p) for p in os.environ.get("EDGEQWEN_RECIPES", "").split(os.pathsep) if p]
    return [f for d in dirs if d.is_dir() for f in sorted(d.glob("*.toml"))] + packaged()


def load_recipes() -> dict[str, Recipe]:
    """All recipes, keyed by name ('qwen2-1.5b'); the first file with a name wins."""
    out: dict[str, Recipe] = {}
    for path in recipe_files():
        r = parse_recipe(path)
        out.setdefault(r.name, r)
    return out


def get_recipe(key: str) -> Recipe:
    recipes = load_recipes()
    k = key.lower()
    if k in recipes:
        return recipes[k]
    by_size = [r for r in recipes.values() if r.size == k]
    if len(by_size) == 1:
        return by_size[0]
    if len(by_size) > 1:
        names = ", ".join(sorted(r.name for r in by_size))
        raise UsageError(f"size {key!r} matches several recipes ({names}); name one")
    sizes = sorted({r.size for r in recipes.values()}, key=_size_key)
    raise UsageError(f"unknown model {key!r}; choose a size ({', '.join(sizes)}) or a recipe name "
                     f"({', '.join(sorted(recipes))})")


def _size_key(s: str) -> float:
    try:
        return float(s.rstrip("bm"))
    except ValueError:
        return 0.0
