"""`edgeqwen build | list`: making builds and listing them."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..formats import FORMATS
from .params import THREADS


@click.command()
@click.argument("model")
@click.argument("quant", default="q4")
@click.option("--source", type=click.Path(path_type=Path), help="A local Hugging Face folder instead of the hub.")
@click.option("--synthetic", is_flag=True, help="Random weights of the recipe's exact shape (for speed and RAM).")
@click.option("--seed", default=0, show_default=True, help="Seed for --synthetic weights.")
@click.option("--tokenizer", type=click.Path(path_type=Path, file_okay=False),
              help="Folder with tokenizer.json for --synthetic (default: the hub's, else a generated one).")
@click.option("--out", type=click.Path(path_type=Path), help="Put this build in DIR instead of the cache.")
@click.option("--name", help="Build name (default: RECIPE-QUANT[-synthetic]).")
@click.option("--force", is_flag=True, help="Rebuild even if the build exists.")
@click.option("--threads", type=THREADS, help="Quantization threads (default: physical cores).")
@click.option("--keep-intermediate", is_flag=True, help="Keep the f16 GGUF next to the quantized one.")
@click.option("--no-smoke", is_flag=True, help="Skip the load-and-generate check after building.")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)),
              help="Insist on a format (default: the QUANT name decides).")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default=None,
              help="MLX builds: weights per quantization group (default 64, as mlx-lm).")
def build(model, quant, source, synthetic, seed, tokenizer, out, name, force, threads, keep_intermediate, no_smoke,
          fmt, group_size):
    """Build MODEL (a size such as 1.5b, or a recipe name) as QUANT.

    QUANT is any llama.cpp file type by its lower-case name (q4_k_m, q8_0, q6_k, q2_k,
    iq4_nl, f16, bf16, ...; q4 means q4_k_m and q8 means q8_0) for a GGUF build, or
    int4, int4_rtn, int8 or fp32 for an ONNX build run by onnxruntime-genai (block-32
    weights; int4 mixes like q4_k_m: k-quant scales, lm_head and the sensitive layers at
    int8; int4_rtn is plain round-to-nearest everywhere, smaller and less accurate; fp32 is
    the reference). ONNX builds are written weight by weight, so even 7B needs well under
    1 GB of RAM to build; set EDGEQWEN_RAM_BUDGET (e.g. 4G) to cap it. mlx4, mlx8 or
    mlx_bf16 make an MLX folder that mlx-lm opens (Apple Silicon; mlx[cpu] on Linux),
    streamed the same way.

    \b
      edgeqwen build 1.5b q4                       # Qwen/Qwen2-1.5B-Instruct from the hub
      edgeqwen build 0.5b q8 --source ./my-qwen2   # a local checkpoint
      edgeqwen build 7b q4 --synthetic             # the 7B shape, random weights
      edgeqwen build 1.5b int4                     # ONNX int4 for onnxruntime-genai
      edgeqwen build 1.5b mlx4                     # MLX 4-bit for mlx-lm on a Mac
    """
    from ..formats.build import BuildRequest
    from ..formats.build import build as run_build
    from ..recipes import get_recipe
    req = BuildRequest(recipe=get_recipe(model), quant=quant, source=source, synthetic=synthetic, seed=seed,
                       tokenizer=tokenizer, out=out, name=name, force=force, threads=threads,
                       keep_intermediate=keep_intermediate, smoke=not no_smoke, format=fmt,
                       group_size=int(group_size) if group_size else None)
    folder = run_build(req)
    click.echo(str(folder))


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_cmd(as_json):
    """List builds on disk, the recipes, and the quant names.

    \b
      edgeqwen list
    """
    from ..home import builds_dir, list_builds
    from ..process import human_bytes
    from ..recipes import load_recipes, quants_of
    builds = list_builds()
    recipes = load_recipes()
    if as_json:
        click.echo(json.dumps({"builds": [{"path": str(p), **m} for p, m in builds],
                               "recipes": {n: {"size": r.size, "hub_repo": r.hub_repo} for n, r in recipes.items()},
                               **{"quants" if f.default else f"{f.name}_quants": quants_of(f.name)
                                  for f in FORMATS.values()}}, indent=2))
        return
    click.echo(f"Builds in {builds_dir()}:")
    if not builds:
        click.echo("  (none yet: edgeqwen build 0.5b q4 --synthetic)")
    for p, m in builds:
        flag = " [synthetic]" if m.get("synthetic") else ""
        click.echo(f"  {p.name:40s} {m.get('format', '?'):5s} {m.get('quant', '?'):8s} "
                   f"{human_bytes(m.get('file_size', 0)):>10s}{flag}")
    click.echo("Recipes:")
    for n, r in sorted(recipes.items()):
        aliases = ", ".join(f"{a}={t}" for a, t in sorted(r.aliases.items()))
        click.echo(f"  {r.size:6s} {n:14s} {r.hub_repo:28s} tied={str(r.tied_embeddings).lower():5s} {aliases}")
    for f in FORMATS.values():
        click.echo(f"{f.label} quants: " + ", ".join(quants_of(f.name)))


COMMANDS = [build, list_cmd]
