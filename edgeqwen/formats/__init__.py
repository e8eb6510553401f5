"""Build formats as rows of one table: what each quant name means, how it is built, run and checked.

Adding a backend is one folder (its builder, runner and layout) plus one row here.
Functions and classes are named as "module:attr" strings so that importing this table never
imports a backend (llama_cpp, onnxruntime).
"""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import RunnerError


@dataclass(frozen=True)
class Format:
    """One format's row: its names and files, where its code is, and what it can do. Code outside the format's own
    package asks the row (fmt.drafts, fmt.kv_settings, ...), never compares a format's name."""
    name: str
    label: str                       # how people write it ("GGUF quants: ...")
    quant_word: str                  # one of its quant names, in a message ("'q4_k_m' is a GGUF quant")
    quants: tuple[str, ...]          # quant names that make this format (the default row's come from gguf's enum)
    reference_quant: str             # what eval compares a build against
    model_file: str                  # the file a build folder's manifest points at
    hashed_files: tuple[str, ...]    # the files the manifest's sha256 covers, in order
    builder: str                     # "module:function(req, ckpt, quant, name, tmp, manifest, log, progress)"
    runner: str                      # "module:Class(model, threads=, n_ctx=, manifest=)"
    needs: str                       # the import the runner needs
    engine: str                      # what runs it, as an error names it ("llama.cpp crashed ...")
    install: str                     # how to install it
    suffixes: tuple[str, ...]        # model files of this format outside a build folder
    marker: str | None = None        # a file whose presence makes a folder this format
    # the default row: a manifest that names no format (written before formats had rows) is this one, and it owns
    # every quant name no other row lists
    default: bool = False
    workers: bool = False            # can spread layers over llama.cpp RPC workers (--workers)
    lean: bool = False               # has a useful load without a second (repacked / prepacked) weight copy
    kv_settings: bool = False        # KV cache types (--kv) and flash attention are settings of its engine
    drafts: bool = False             # speculative decoding: --draft (a smaller build of its format), --lookup
    spin: bool = False               # its threads can sleep instead of spinning while they wait (a busy machine)
    tune: bool = False               # `edgeqwen tune` measures its settings per machine
    group_size: bool = False         # its builds take --group-size
    # several conversations decoded together (serve --parallel): "module:Class(runner, n_seq, n_ctx)" wrapping a
    # loaded runner (None: one request at a time)
    batched: str | None = None
    # structured output: "module:function(kind, schema) -> grammar" for a request's response_format (None: refused)
    constrained: str | None = None
    crash_hint: str | None = None    # "module:function(signal name, model path) -> message" for a crash of its engine
    # its memory model: "module:function(size, quant, config, ctx, prompt_tokens, amx=, release=, resident=, kv=)
    # -> formats.plan.Plan" (`edgeqwen plan`, fit's and table's predictions)
    planner: str | None = None
    # import `needs` here to check it; False where the runner must import it itself (MLX makes its streams on the
    # importing thread, so its runner imports it on the MLX thread and says the same line when it is missing)
    import_check: bool = True

    def load(self, what: str):
        module, attr = getattr(self, what).split(":")
        return getattr(importlib.import_module(module), attr)

    def runner_class(self):
        missing = RunnerError(f"{self.name} builds need {self.needs}, which is not installed: {self.install}")
        try:
            if self.import_check:
                importlib.import_module(self.needs)
            elif importlib.util.find_spec(self.needs) is None:
                raise missing
            return self.load("runner")
        except ImportError:
            raise missing from None


FORMATS: dict[str, Format] = {
    "gguf": Format(
        name="gguf", label="GGUF", quant_word="a GGUF quant", quants=(), reference_quant="f16",
        model_file="model.gguf", hashed_files=("model.gguf",),
        builder="edgeqwen.formats.gguf.build:build_gguf", runner="edgeqwen.formats.gguf.runner:LlamaRunner",
        needs="llama_cpp", engine="llama.cpp",
        install="pip install 'edgeqwen[gguf]' (or make setup)", suffixes=(".gguf",), default=True, workers=True,
        lean=True, kv_settings=True, drafts=True, spin=True, tune=True,
        crash_hint="edgeqwen.formats.gguf.runner:crash_hint", planner="edgeqwen.formats.gguf.plan:plan_gguf",
        constrained="edgeqwen.formats.gguf.grammar:grammar", batched="edgeqwen.formats.gguf.batch:BatchedRunner"),
    "onnx": Format(
        name="onnx", label="ONNX", quant_word="an ONNX precision", quants=("int4", "int4_rtn", "int8", "fp32"),
        reference_quant="fp32", model_file="model.onnx",
        hashed_files=("model.onnx", "model.onnx.data"), builder="edgeqwen.formats.onnx.build:build_onnx",
        runner="edgeqwen.formats.onnx.runner:OnnxRunner", needs="onnxruntime_genai", engine="onnxruntime",
        install="pip install 'edgeqwen[onnx]'",
        suffixes=(".onnx",), marker="genai_config.json", planner="edgeqwen.formats.onnx.plan:plan_onnx",
        constrained="edgeqwen.formats.onnx.guidance:guidance"),
    # Apple Silicon's own runtime (Metal there; mlx[cpu] runs the same folders on Linux, for correctness).
    "mlx": Format(
        name="mlx", label="MLX", quant_word="an MLX quant", quants=("mlx4", "mlx8", "mlx_bf16"),
        reference_quant="mlx_bf16", model_file="model.safetensors",
        hashed_files=("model.safetensors",), builder="edgeqwen.formats.mlx.build:build_mlx",
        runner="edgeqwen.formats.mlx.runner:MlxRunner", needs="mlx_lm", engine="mlx",
        install="pip install 'edgeqwen[mlx]' (mlx and mlx-lm; on Linux mlx[cpu])", suffixes=(".safetensors",),
        group_size=True, planner="edgeqwen.formats.mlx.plan:plan_mlx", import_check=False),
}
DEFAULT = next(f for f in FORMATS.values() if f.default)


def named_quants() -> set[str]:
    """The quant names the rows list (the default row owns every other name)."""
    return {q for f in FORMATS.values() for q in f.quants}


def of_manifest(manifest: dict | None) -> Format | None:
    """The row a manifest names (the default row if it names none); None for a format this version does not know."""
    return FORMATS.get((manifest or {}).get("format") or DEFAULT.name)


def model_path(path: Path, manifest: dict | None) -> Path:
    """The model file of a build: the file its manifest names inside a build folder, else the path itself."""
    return path / manifest["file"] if path.is_dir() else path


def format_of_quant(quant: str) -> str:
    """The format a resolved quant name belongs to: the first row that lists it (the default row owns the rest)."""
    for f in FORMATS.values():
        if quant in f.quants:
            return f.name
    return DEFAULT.name


def detect(path: Path, manifest: dict | None = None) -> Format:
    """The format of a build folder or model file: its manifest says, else its name or a marker file."""
    if manifest and manifest.get("format") in FORMATS:
        return FORMATS[manifest["format"]]
    for f in FORMATS.values():
        if path.suffix in f.suffixes or (f.marker and path.is_dir() and (path / f.marker).exists()):
            return f
    raise RunnerError(f"{path}: not a model file edgeqwen can run (.gguf, .onnx, .safetensors of an MLX folder, "
                      "or a build folder)")


def hashed_paths(folder: Path, manifest: dict) -> list[Path]:
    """The files a build's sha256 covers (its format's set, or just its model file if it names another)."""
    fmt = detect(folder, manifest)
    names = fmt.hashed_files if manifest.get("file") == fmt.model_file else (manifest["file"],)
    return [folder / n for n in names]


def build_hash(folder: Path, manifest: dict, on_bytes: Callable[[int], None] | None = None) -> str:
    """The sha256 a manifest records for its build: the file's for one file, else a hash of the files' hashes."""
    import hashlib

    from ..process import sha256_file
    paths = hashed_paths(folder, manifest)
    if len(paths) == 1:
        return sha256_file(paths[0], on_bytes)
    h = hashlib.sha256()
    for p in paths:
        h.update(sha256_file(p, on_bytes).encode())
    return h.hexdigest()
