"""A build: recipe + source + quant -> one folder with the model and manifest.json.

GGUF builds hold model.gguf; ONNX builds (int4/int8/fp32) hold model.onnx, its external data,
genai_config.json and the tokenizer.

Everything is written under a temporary name next to the final folder and renamed into place
only when complete, so an interrupted build leaves nothing that looks finished.
"""
from __future__ import annotations

import errno
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .checkpoint import Checkpoint, fetch_from_hub, find_tokenizer, open_checkpoint
from .errors import BuildError, SourceError, UsageError
from .home import MANIFEST, TMP_MARK, builds_dir, checkpoints_dir, clean_stale, read_manifest, write_json_atomic
from .process import Timer, human_bytes, max_rss_bytes
from .formats import FORMATS, format_of_quant
from .recipes import Recipe

_logger = logging.getLogger("edgeqwen")

SCHEMA = 1
# Config keys that decide the shape; a --source must agree with the recipe on these.
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads")
# Bits per weight by quant, for the disk preflight (upper bounds; exact size is known only after).
_BPW = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q6_k": 6.6, "q5_k_m": 5.7, "q5_k_s": 5.6, "q5_0": 5.5,
        "q5_1": 6, "q4_k_m": 4.9, "q4_k_s": 4.6, "q4_0": 4.6, "q4_1": 5, "iq4_nl": 4.6, "iq4_xs": 4.3}


@dataclass
class BuildRequest:
    recipe: Recipe
    quant: str
    source: Path | None = None         # a local Hugging Face folder
    synthetic: bool = False
    seed: int = 0
    tokenizer: Path | None = None      # for --synthetic: a folder with tokenizer.json
    out: Path | None = None
    name: str | None = None
    force: bool = False
    threads: int | None = None
    keep_intermediate: bool = False
    smoke: bool = True
    format: str | None = None          # 'gguf' | 'onnx' | 'mlx'; by default the quant name decides
    group_size: int | None = None      # MLX quantization groups (default 64)
    role: str | None = None            # "reference": made by eval, and `gc` may remove it once unused


NAME_RE = r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}"


def build_name(req: BuildRequest, quant: str) -> str:
    import re
    if req.name is not None:
        if not re.fullmatch(NAME_RE, req.name) or TMP_MARK in req.name or req.name.endswith(".gguf"):
            raise UsageError(f"--name {req.name!r}: a build name is one path component of letters, digits and . _ + - "
                             "(starting with a letter or digit)")
        return req.name
    group = f"-g{req.group_size}" if req.group_size and req.group_size != 64 else ""
    return f"{req.recipe.name}-{quant}{group}" + ("-synthetic" if req.synthetic else "")


def say(log, msg):
    if log:
        log(msg)


def build(req: BuildRequest, log: Callable[[str], None] | None = _logger.info) -> Path:
    """Run a build; returns the build folder. Messages go to log (None: silent); bars to a terminal's stderr."""
    quant = req.recipe.resolve_quant(req.quant, req.format)
    fmt = format_of_quant(quant)
    if req.synthetic and req.source:
        raise UsageError("--synthetic and --source exclude each other")
    if req.group_size is not None and not FORMATS[fmt].group_size:
        which = [f for f in FORMATS.values() if f.group_size]
        raise UsageError(f"--group-size is for {' and '.join(f.label for f in which)} builds "
                         f"({', '.join(q for f in which for q in f.quants if q != f.reference_quant)}); "
                         f"{quant} is a {fmt} build")
    name = build_name(req, quant)
    final = Path(req.out) if req.out else builds_dir() / name
    source_desc = _describe_source(req)
    try:
        existing = read_manifest(final) if final.exists() else None
    except UsageError:
        if not req.force:
            raise
        existing = None
    if final.exists() and not req.force:
        if existing is None:
            raise UsageError(f"{final} exists and is not an edgeqwen build; choose another --out")
        if existing.get("quant") != quant or existing.get("source", {}).get("id") != source_desc["id"]:
            raise UsageError(f"{final} holds a different build ({existing.get('name')}, from "
                             f"{existing.get('source', {}).get('id')}); use --force to replace it or --name")
        say(log, f"{name}: already built at {final} (use --force to rebuild)")
        return final

    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final.parent)
    tmp = final.parent / f"{final.name}{TMP_MARK}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    manifest = {"schema": SCHEMA, "name": name, "format": fmt, "quant": quant,
                "recipe": {"name": req.recipe.name, "size": req.recipe.size, "hub_repo": req.recipe.hub_repo},
                "synthetic": req.synthetic, "timings_s": {}, "peak_rss_bytes": {}}
    if req.role:
        manifest["role"] = req.role
    try:
        ckpt, source = _resolve_source(req, log)
        manifest["source"] = {**source_desc, **source}
        _check_against_recipe(ckpt, req.recipe)
        manifest["config"] = {k: getattr(ckpt.config, k) for k in (*SHAPE_KEYS, "vocab_size", "tie_word_embeddings",
                                                             "max_position_embeddings", "rope_theta")}
        model = FORMATS[fmt].load("builder")(req, ckpt, quant, name, tmp, manifest, log)
        manifest["tools"] = tool_versions()
        manifest["host"] = {"machine": platform.machine(), "system": platform.system()}
        manifest["peak_rss_bytes"]["process_max"] = max_rss_bytes()
        if req.smoke:
            from .formats.smoke import smoke_check
            with Timer() as t:
                manifest["smoke"] = smoke_check(model, threads=req.threads)
            manifest["timings_s"]["smoke"] = round(t.seconds, 2)
            say(log, f"smoke check: {manifest['smoke']['tokens']} tokens, {manifest['smoke']['decode_tps']} tok/s")
        manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_json_atomic(tmp / MANIFEST, manifest)
        _install(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    from .manage import remember_verified
    remember_verified(final, manifest)
    say(log, f"built {name}: {final / manifest['file']} ({human_bytes(manifest['file_size'])})")
    return final


def available_ram() -> int:
    """Memory a build may use: EDGEQWEN_RAM_BUDGET (e.g. 8G) if set, else what the OS says is available."""
    import psutil
    budget = os.environ.get("EDGEQWEN_RAM_BUDGET")
    if budget:
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
        b = budget.strip().upper().removesuffix("B")
        try:
            return int(float(b[:-1]) * units[b[-1]]) if b and b[-1] in units else int(b)
        except ValueError:
            raise UsageError(f"EDGEQWEN_RAM_BUDGET={budget!r}: give bytes or a size such as 8G") from None
    return psutil.virtual_memory().available


def check_ram(need: int, what: str) -> None:
    have = available_ram()
    if need > have:
        raise BuildError(f"{what} needs about {human_bytes(need)} of RAM; {human_bytes(have)} is available")


def _install(tmp: Path, final: Path) -> None:
    """Rename the finished folder into place; an old build (--force) goes only after the new one is in."""
    old = None
    if final.exists():
        old = final.parent / f"{final.name}.old{TMP_MARK}{os.getpid()}"
        final.rename(old)
    tmp.rename(final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _describe_source(req: BuildRequest) -> dict:
    if req.synthetic:
        return {"kind": "synthetic", "id": f"synthetic:{req.recipe.name}:seed{req.seed}", "seed": req.seed}
    if req.source:
        return {"kind": "local", "id": str(Path(req.source).resolve())}
    return {"kind": "hub", "id": f"{req.recipe.hub_repo}@{req.recipe.revision}",
            "repo": req.recipe.hub_repo, "revision": req.recipe.revision}


def _resolve_source(req: BuildRequest, log) -> tuple[Checkpoint, dict]:
    if req.synthetic:
        path = synthetic_checkpoint(req.recipe, req.seed, req.tokenizer, log)
        ckpt = open_checkpoint(path)
        return ckpt, {"path": str(path), "tokenizer": (read_manifest(path) or {}).get("tokenizer")}
    if req.source:
        ckpt = open_checkpoint(Path(req.source))
        say(log, f"hashing source files in {ckpt.path}")
        return ckpt, {"path": str(ckpt.path), "files": ckpt.file_hashes()}
    say(log, f"fetching {req.recipe.hub_repo}@{req.recipe.revision} through huggingface_hub")
    path, commit = fetch_from_hub(req.recipe.hub_repo, req.recipe.revision)
    return open_checkpoint(path), {"path": str(path), "commit": commit}


def synthetic_checkpoint(recipe: Recipe, seed: int, tokenizer: Path | None, log) -> Path:
    """The recipe's exact shape with seeded random weights; made once and cached.

    The tokenizer is the given one, else the hub's (cache or a small download), else a generated
    one with Qwen2's size and special tokens; generated-tokenizer checkpoints are cached apart.
    """
    from .synthetic import write_synthetic
    tok_src = "given"
    if tokenizer is None:
        tokenizer = find_tokenizer(recipe.hub_repo, recipe.revision)
        tok_src = "hub" if tokenizer else "generated"
    elif not (Path(tokenizer) / "tokenizer.json").exists():
        raise UsageError(f"--tokenizer {tokenizer}: no tokenizer.json there")
    final = checkpoints_dir() / (f"{recipe.name}-synthetic-seed{seed}" + ("-gentok" if tok_src == "generated" else ""))
    if read_manifest(final) is not None:
        return final
    if tok_src == "generated":
        say(log, "real tokenizer not available: generating one with Qwen2's size and special tokens")
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final.parent)
    tmp = final.parent / f"{final.name}{TMP_MARK}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    config = recipe.hf_config()
    check_disk(tmp.parent, sum(_numel(s) for s in _shapes(config)) * 2)
    say(log, f"writing synthetic {recipe.name} checkpoint (seed {seed}) to {final}")
    try:
        disk_guard(lambda: write_synthetic(tmp, config, seed=seed, tokenizer=Path(tokenizer) if tokenizer else None))
        write_json_atomic(tmp / MANIFEST, {"synthetic": True, "recipe": recipe.name, "seed": seed,
                                           "tokenizer": tok_src})
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _shapes(config):
    from .arch import arch_for_config
    from .checkpoint import expected_tensors
    from .schemas import ModelConfig
    return expected_tensors(ModelConfig.model_validate(config), arch_for_config(config)).values()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _check_against_recipe(ckpt: Checkpoint, recipe: Recipe) -> None:
    diff = [f"{k} {getattr(ckpt.config, k)} (recipe {recipe.config[k]})" for k in SHAPE_KEYS
            if k in recipe.config and getattr(ckpt.config, k) != recipe.config[k]]
    if diff:
        raise SourceError(f"{ckpt.path} is not a {recipe.name} checkpoint: {'; '.join(diff)}")


def estimate_bytes(ckpt: Checkpoint, quant: str) -> int:
    n = sum(t.n_elements for t in ckpt.tensors.values())
    return int(n * _BPW.get(quant, 8.5) / 8) + (16 << 20)


def check_disk(path: Path, need: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.environ.get("EDGEQWEN_SKIP_DISK_CHECK"):  # for filesystems that misreport free space
        return
    free = shutil.disk_usage(path).free
    if free < need * 1.05:
        raise BuildError(f"not enough disk space at {path}: need {human_bytes(need)}, {human_bytes(free)} free")


def disk_guard(fn):
    try:
        return fn()
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise BuildError(f"disk full while writing ({e.strerror}); the partial build was removed") from None
        raise


def tool_versions() -> dict:
    import importlib.metadata as md
    out = {"edgeqwen": __version__, "python": platform.python_version()}
    for pkg in ("gguf", "llama_cpp_python", "numpy", "huggingface_hub", "onnx", "onnxruntime", "onnxruntime-genai",
                "mlx", "mlx-lm"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
