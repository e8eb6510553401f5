"""`edgeqwen info | verify | rm | gc`: the builds on disk. Registered on the group in cli/__init__.py."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..formats import DEFAULT


@click.command()
@click.argument("build")
@click.option("--rows", "row_files", multiple=True, type=click.Path(path_type=Path),
              help="Result files (JSONL) to search for this build's bench and eval rows; repeatable.")
@click.option("--json", "as_json", is_flag=True)
def info(build, row_files, as_json):
    """Show a build: manifest, source, files, plan, and its measured rows.

    \b
      edgeqwen info qwen2-0.5b-q4_k_m --rows bench/results/*.jsonl
    """
    from ..measure.info import info as build_info
    from ..process import human_bytes
    d = build_info(build, list(row_files))
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    m = d["manifest"]
    src = m.get("source", {})
    kind = f"{m.get('format') or DEFAULT.name} {m.get('quant')}" + (", synthetic" if m.get("synthetic") else "")
    click.echo(f"{m.get('name')}  ({kind})")
    click.echo(f"  path     {d['path']}")
    click.echo(f"  recipe   {(m.get('recipe') or {}).get('name')}   source {src.get('kind')}: {src.get('id')}")
    click.echo(f"  sha256   {m.get('sha256')}")
    tools = ", ".join(f"{k} {v}" for k, v in (m.get("tools") or {}).items())
    click.echo(f"  created  {m.get('created')}   tools: {tools}")
    for name, size in d["files"].items():
        click.echo(f"  {name:28s} {human_bytes(size):>12s}")
    click.echo(f"  on disk  {human_bytes(d['disk_bytes'])}")
    if "plan" in d:
        click.echo(f"  plan     peak RAM {human_bytes(d['plan']['peak_ram_bytes'])} at ctx {d['plan']['ctx']}")
    for r in d["rows"]:
        if r.get("kind") == "bench" and r.get("status") == "ok":
            click.echo(f"  bench    {r['time']} {r['device'].get('device')}: {r['threads']} threads, "
                       f"tg {r['tg']['mean']:.1f} tok/s, pp {r['pp']['mean']:.0f} tok/s")
        elif r.get("kind") == "eval":
            click.echo(f"  eval     {r['time']} {r['text']}: PPL {r['ppl']:.3f}"
                       + (f", KL {r['kl_mean']:.4f}" if "kl_mean" in r else ""))


@click.command()
@click.argument("builds", nargs=-1, required=True)
def verify(builds):
    """Re-hash BUILDS against their manifests; a mismatch is an error naming the file.

    \b
      edgeqwen verify qwen2-1.5b-q4_k_m
    """
    from ..home import resolve_build
    from ..manage import verify as check
    for b in builds:
        path, manifest = resolve_build(b)
        if manifest is None or not path.is_dir():
            from ..errors import UsageError
            raise UsageError(f"{b}: verify needs a build folder or name (a bare model file has no manifest)")
        click.echo(f"{path.name}: ok ({check(path, manifest)[:16]})")


@click.command("rm")
@click.argument("builds", nargs=-1, required=True)
def rm_cmd(builds):
    """Remove BUILDS from the builds folder.

    \b
      edgeqwen rm qwen2-7b-q8_0 qwen2-7b-f16
    """
    from ..manage import remove
    for p in remove(list(builds)):
        click.echo(f"removed {p}")


@click.command()
@click.option("--dry-run", is_flag=True, help="Show what would go and how much it frees.")
def gc(dry_run):
    """Remove checkpoints and references no build needs, and leftovers of interrupted builds.

    \b
      edgeqwen gc --dry-run
    """
    from ..manage import collect, garbage
    from ..process import human_bytes
    items = garbage()
    for g in items:
        click.echo(f"{'would remove' if dry_run else 'removing'} {g.path} ({human_bytes(g.bytes)}): {g.why}")
    total = sum(g.bytes for g in items)
    if dry_run:
        click.echo(f"{human_bytes(total)} would be freed")
    else:
        click.echo(f"freed {human_bytes(collect(items))}")


COMMANDS = [info, verify, rm_cmd, gc]
