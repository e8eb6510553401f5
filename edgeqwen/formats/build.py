"""A build: recipe + source + quant -> one folder with the model and manifest.json.

GGUF builds hold model.gguf; ONNX builds (int4/int8/fp32) hold model.onnx, its external data,
genai_config.json and the tokenizer.

Everything is written under a temporary name next to the final folder and renamed into place
only when complete, so an interrupted build leaves nothing that looks finished.
"""
from __future__ import annotations

import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from .. import __version__
from ..checkpoints import Checkpoint, fetch_from_hub, find_tokenizer, open_checkpoint
from ..errors import SourceError, UsageError
from ..home import MANIFEST, TMP_MARK, builds_dir, checkpoints_dir, clean_stale, read_manifest, write_json_atomic
from ..process import Timer, human_bytes, max_rss_bytes
from ..recipes import Recipe
from . import FORMATS, format_of_quant
from .steps import BuildRequest, check_disk, disk_guard, note

_logger = logging.getLogger("edgeqwen")
NAME_RE = r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}"   # a build's --name: one path component

SCHEMA = 1
# Config keys that decide the shape; a --source must agree with the recipe on these.
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads")


def build_name(req: BuildRequest, quant: str) -> str:
    import re
    if req.name is not None:
        if not re.fullmatch(NAME_RE, req.name) or TMP_MARK in req.name or req.name.endswith(".gguf"):
            raise UsageError(f"--name {req.name!r}: a build name is one path component of letters, digits and . _ + - "
                             "(starting with a letter or digit)")
        return req.name
    group = f"-g{req.group_size}" if req.group_size and req.group_size != 64 else ""
    return f"{req.recipe.name}-{quant}{group}" + ("-synthetic" if req.synthetic else "")


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
        note(log, f"{name}: already built at {final} (use --force to rebuild)")
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
            from .smoke import smoke_check
            with Timer() as t:
                manifest["smoke"] = smoke_check(model, threads=req.threads)
            manifest["timings_s"]["smoke"] = round(t.seconds, 2)
            note(log, f"smoke check: {manifest['smoke']['tokens']} tokens, {manifest['smoke']['decode_tps']} tok/s")
        manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_json_atomic(tmp / MANIFEST, manifest)
        _install(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    from ..manage import remember_verified
    remember_verified(final, manifest)
    note(log, f"built {name}: {final / manifest['file']} ({human_bytes(manifest['file_size'])})")
    return final


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
        note(log, f"hashing source files in {ckpt.path}")
        return ckpt, {"path": str(ckpt.path), "files": ckpt.file_hashes()}
    note(log, f"fetching {req.recipe.hub_repo}@{req.recipe.revision} through huggingface_hub")
    path, commit = fetch_from_hub(req.recipe.hub_repo, req.recipe.revision)
    return open_checkpoint(path), {"path": str(path), "commit": commit}


def synthetic_checkpoint(recipe: Recipe, seed: int, tokenizer: Path | None, log) -> Path:
    """The recipe's exact shape with seeded random weights; made once and cached.

    The tokenizer is the given one, else the hub's (cache or a small download), else a generated
    one with Qwen2's size and special tokens; generated-tokenizer checkpoints are cached apart.
    """
    from ..checkpoints.synthetic import write_synthetic
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
        note(log, "real tokenizer not available: generating one with Qwen2's size and special tokens")
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final.parent)
    tmp = final.parent / f"{final.name}{TMP_MARK}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    config = recipe.hf_config()
    check_disk(tmp.parent, sum(_numel(s) for s in _shapes(config)) * 2)
    note(log, f"writing synthetic {recipe.name} checkpoint (seed {seed}) to {final}")
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
    from ..arch import arch_for_config
    from ..checkpoints import expected_tensors
    from ..schemas import ModelConfig
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
