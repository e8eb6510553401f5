"""The `edgeqwen` command. Each command's docstring is its --help; heavy imports stay inside commands."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__
from .errors import EdgeqwenError


class Group(click.Group):
    """Turns domain errors into one line on stderr and a non-zero exit, in one place."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeqwenError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            ctx.exit(130)


@click.group(cls=Group)
@click.version_option(__version__, prog_name="edgeqwen")
@click.option("--verbose", "-v", "verbose", is_flag=True, help="Also show llama.cpp's and onnxruntime's own logs.")
def cli(verbose):
    """Build, run and measure Qwen2 models on the CPU you have.

    \b
      edgeqwen build 0.5b q4 --synthetic     # random weights, real shape
      edgeqwen run qwen2-0.5b-q4_k_m-synthetic "Hello"
      edgeqwen list
    """
    _setup_logging(verbose)


def _setup_logging(verbose: bool) -> None:
    """Library messages (logger "edgeqwen") go to stderr as plain lines; backend logs only with -v."""
    import logging
    log = logging.getLogger("edgeqwen")
    if not any(getattr(h, "_edgeqwen", False) for h in log.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        h._edgeqwen = True
        log.addHandler(h)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("edgeqwen.llama").setLevel(logging.DEBUG if verbose else logging.WARNING)


@cli.command()
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
@click.option("--threads", type=int, help="Quantization threads (default: physical cores).")
@click.option("--keep-intermediate", is_flag=True, help="Keep the f16 GGUF next to the quantized one.")
@click.option("--no-smoke", is_flag=True, help="Skip the load-and-generate check after building.")
@click.option("--format", "fmt", type=click.Choice(["gguf", "onnx"]),
              help="Insist on a format (default: the QUANT name decides).")
def build(model, quant, source, synthetic, seed, tokenizer, out, name, force, threads, keep_intermediate, no_smoke,
          fmt):
    """Build MODEL (a size such as 1.5b, or a recipe name) as QUANT.

    QUANT is any llama.cpp file type by its lower-case name (q4_k_m, q8_0, q6_k, q2_k,
    iq4_nl, f16, bf16, ...; q4 means q4_k_m and q8 means q8_0) for a GGUF build, or
    int4, int4_rtn, int8 or fp32 for an ONNX build run by onnxruntime-genai (block-32
    weights; int4 mixes like q4_k_m: k-quant scales, lm_head and the sensitive layers at
    int8; int4_rtn is plain round-to-nearest everywhere, smaller and less accurate; fp32 is
    the reference). ONNX builds are written weight by weight, so even 7B needs well under
    1 GB of RAM to build; set EDGEQWEN_RAM_BUDGET (e.g. 4G) to cap it.

    \b
      edgeqwen build 1.5b q4                       # Qwen/Qwen2-1.5B-Instruct from the hub
      edgeqwen build 0.5b q8 --source ./my-qwen2   # a local checkpoint
      edgeqwen build 7b q4 --synthetic             # the 7B shape, random weights
      edgeqwen build 1.5b int4                     # ONNX int4 for onnxruntime-genai
    """
    from .build import BuildRequest
    from .build import build as run_build
    from .recipes import get_recipe
    req = BuildRequest(recipe=get_recipe(model), quant=quant, source=source, synthetic=synthetic, seed=seed,
                       tokenizer=tokenizer, out=out, name=name, force=force, threads=threads,
                       keep_intermediate=keep_intermediate, smoke=not no_smoke, format=fmt)
    folder = run_build(req)
    click.echo(str(folder))


@cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_cmd(as_json):
    """List builds on disk, the recipes, and the quant names.

    \b
      edgeqwen list
    """
    from .home import builds_dir, list_builds
    from .measure import human_bytes
    from .recipes import ONNX_QUANTS, buildable_gguf_quants, load_recipes
    builds = list_builds()
    recipes = load_recipes()
    if as_json:
        click.echo(json.dumps({"builds": [{"path": str(p), **m} for p, m in builds],
                               "recipes": {n: {"size": r.size, "hub_repo": r.hub_repo} for n, r in recipes.items()},
                               "quants": buildable_gguf_quants(), "onnx_quants": list(ONNX_QUANTS)}, indent=2))
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
    click.echo("GGUF quants: " + ", ".join(buildable_gguf_quants()))
    click.echo("ONNX quants: " + ", ".join(ONNX_QUANTS))


@cli.command()
@click.argument("build")
@click.option("--rows", "row_files", multiple=True, type=click.Path(path_type=Path),
              help="Result files (JSONL) to search for this build's bench and eval rows; repeatable.")
@click.option("--json", "as_json", is_flag=True)
def info(build, row_files, as_json):
    """Show a build: manifest, source, files, plan, and its measured rows.

    \b
      edgeqwen info qwen2-0.5b-q4_k_m --rows bench/results/*.jsonl
    """
    from .manage import info as build_info
    from .measure import human_bytes
    d = build_info(build, list(row_files))
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    m = d["manifest"]
    src = m.get("source", {})
    kind = f"{m.get('format', 'gguf')} {m.get('quant')}" + (", synthetic" if m.get("synthetic") else "")
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


@cli.command()
@click.argument("builds", nargs=-1, required=True)
def verify(builds):
    """Re-hash BUILDS against their manifests; a mismatch is an error naming the file.

    \b
      edgeqwen verify qwen2-1.5b-q4_k_m
    """
    from .home import resolve_build
    from .manage import verify as check
    for b in builds:
        path, manifest = resolve_build(b)
        if manifest is None or not path.is_dir():
            from .errors import UsageError
            raise UsageError(f"{b}: verify needs a build folder or name (a bare model file has no manifest)")
        click.echo(f"{path.name}: ok ({check(path, manifest)[:16]})")


@cli.command("rm")
@click.argument("builds", nargs=-1, required=True)
def rm_cmd(builds):
    """Remove BUILDS from the builds folder.

    \b
      edgeqwen rm qwen2-7b-q8_0 qwen2-7b-f16
    """
    from .manage import remove
    for p in remove(list(builds)):
        click.echo(f"removed {p}")


@cli.command()
@click.option("--dry-run", is_flag=True, help="Show what would go and how much it frees.")
def gc(dry_run):
    """Remove checkpoints and references no build needs, and leftovers of interrupted builds.

    \b
      edgeqwen gc --dry-run
    """
    from .manage import collect, garbage
    from .measure import human_bytes
    items = garbage()
    for g in items:
        click.echo(f"{'would remove' if dry_run else 'removing'} {g.path} ({human_bytes(g.bytes)}): {g.why}")
    total = sum(g.bytes for g in items)
    if dry_run:
        click.echo(f"{human_bytes(total)} would be freed")
    else:
        click.echo(f"freed {human_bytes(collect(items))}")


def _sampling(max_tokens, temperature, top_p, seed):
    from .runner import Sampling
    return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)


@cli.command()
@click.argument("build")
@click.argument("prompt", required=False)
@click.option("--max-tokens", "-n", default=256, show_default=True)
@click.option("--temperature", "-t", default=0.7, show_default=True, help="0 is greedy and reproducible.")
@click.option("--top-p", default=0.8, show_default=True)
@click.option("--seed", type=int, help="Sampling seed (default: random).")
@click.option("--system", help="System prompt.")
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print text, token counts and timings as JSON.")
@click.option("--threads", type=int, help="Default: physical cores.")
@click.option("--ctx", type=int, help="Context length (default: 4096, capped by the model).")
@click.option("--verbose", "-v", is_flag=True, help="Timing line on stderr.")
def run(build, prompt, max_tokens, temperature, top_p, seed, system, raw, as_json, threads, ctx, verbose):
    """Generate one answer to PROMPT (or stdin) with BUILD; only the answer goes to stdout.

    BUILD is a build name (see `edgeqwen list`), a build folder or a .gguf file.

    \b
      edgeqwen run qwen2-1.5b-q4_k_m "Why is the sky blue?"
      echo "Translate to French: cheese" | edgeqwen run qwen2-0.5b-q8_0 --temperature 0
    """
    from .errors import UsageError
    from .runner import generate_text, load_runner
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError("no prompt: give one as an argument or on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    runner = load_runner(build, threads=threads, n_ctx=ctx)
    text, last = [], None
    for last in generate_text(runner, prompt, _sampling(max_tokens, temperature, top_p, seed), raw=raw,
                              system=system):
        text.append(last.text)
        if not as_json:
            sys.stdout.write(last.text)
            sys.stdout.flush()
    if as_json:
        click.echo(json.dumps({"text": "".join(text), "build": build, "backend": runner.backend,
                               "load_s": round(runner.load_s, 4), **last.stats()}))
    else:
        sys.stdout.write("\n")
    if verbose:
        from .chat import stats_line
        click.echo(f"{last.generation_tokens} tokens · " + stats_line(last), err=True)
    runner.close()


@cli.command()
@click.argument("build")
@click.option("--system", help="System prompt.")
@click.option("--max-tokens", "-n", default=1024, show_default=True)
@click.option("--temperature", "-t", default=0.7, show_default=True)
@click.option("--top-p", default=0.8, show_default=True)
@click.option("--seed", type=int)
@click.option("--threads", type=int, help="Default: physical cores.")
@click.option("--ctx", type=int, help="Context length (default: 4096, capped by the model).")
def chat(build, system, max_tokens, temperature, top_p, seed, threads, ctx):
    """Chat with BUILD in the terminal.

    /reset clears the history, /stats shows the last reply's speed, /quit or Ctrl-D leaves;
    Ctrl-C stops a reply.

    \b
      edgeqwen chat qwen2-1.5b-q4_k_m --system "Answer briefly."
    """
    from .chat import repl
    from .runner import load_runner
    runner = load_runner(build, threads=threads, n_ctx=ctx)
    repl(runner, _sampling(max_tokens, temperature, top_p, seed), system=system)
    runner.close()


@cli.command("bench")
@click.argument("builds", nargs=-1, required=True)
@click.option("--threads", help="Thread counts, comma-separated (default: physical cores).")
@click.option("--prompt-tokens", default=512, show_default=True, help="Prefill length (random tokens).")
@click.option("--gen-tokens", default=128, show_default=True, help="Decode length (EOS disabled).")
@click.option("--repeats", default=3, show_default=True)
@click.option("--ctx", default=4096, show_default=True, help="Context the build is loaded with.")
@click.option("--out", type=click.Path(path_type=Path), help="Append one JSON row per measurement to FILE.jsonl.")
def bench_cmd(builds, threads, prompt_tokens, gen_tokens, repeats, ctx, out):
    """Measure BUILDS on this machine: load time, prefill and decode tok/s, TTFT, peak RSS.

    Each build and thread count runs in a fresh process, after one warm-up. A build that
    fails to load or runs out of memory becomes a failure row and the run goes on.

    \b
      edgeqwen bench qwen2-0.5b-q4_k_m qwen2-0.5b-q8_0 --threads 1,2 --out results.jsonl
    """
    from .benchmark import BenchConfig, bench, parse_threads
    from .hw import device_label, fingerprint
    from .table import render_rows
    ts = parse_threads(threads)
    if prompt_tokens < 1 or gen_tokens < 2 or repeats < 1:
        from .errors import UsageError
        raise UsageError("--prompt-tokens >= 1, --gen-tokens >= 2 and --repeats >= 1")
    cfg = BenchConfig(prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, repeats=repeats,
                      n_ctx=max(ctx, prompt_tokens + gen_tokens + 16))
    click.echo("measuring this machine's memory bandwidth...", err=True)

    fp = fingerprint()
    click.echo(device_label(fp), err=True)

    def progress(row):
        if row["status"] != "ok":
            click.echo(f"{row['build']['name']} ({row['threads']} threads): {row['status']}: {row['error']}", err=True)
    rows = bench(list(builds), ts, cfg, fp, out=out, progress=progress)
    from .plan import predicted_rss_for_row
    click.echo(render_rows(rows, "md", plan_fn=predicted_rss_for_row))


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--no-bandwidth", is_flag=True, help="Skip the memory bandwidth test.")
def hw(as_json, no_bandwidth):
    """Print this machine's hardware fingerprint (CPU, ISA, cores, RAM, bandwidth, versions).

    \b
      edgeqwen hw --json
    """
    from .hw import fingerprint
    fp = fingerprint(bandwidth=not no_bandwidth)
    if as_json:
        click.echo(json.dumps(fp, indent=2))
        return
    for k, v in fp.items():
        if k in ("ram_total", "ram_available"):
            v = f"{v / 2**30:.1f} GiB"
        elif isinstance(v, (list, tuple)):
            v = " ".join(v) or "-"
        elif isinstance(v, dict):
            v = ", ".join(f"{a} {b}" for a, b in v.items())
        click.echo(f"{k:15s} {v}")


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "html"]), default="md", show_default=True)
@click.option("--plot", type=click.Path(path_type=Path), help="Decode tok/s against peak RSS, as a PNG.")
@click.option("--claims", is_flag=False, flag_value="-", type=click.Path(path_type=Path),
              help="Judge claims: the bundled ones (--claims alone) or those in a TOML file.")
@click.option("--devices", type=click.Path(path_type=Path), help="Device profiles file (default: the bundled ones).")
def table(files, fmt, plot, claims, devices):
    """Merge result rows (JSONL) from any number of machines into one table, grouped by device.

    \b
      edgeqwen table bench/results/*.jsonl --claims --plot results.png
    """
    from .plan import predicted_rss_for_row
    from .table import load_rows, render_rows
    from .table import plot as draw
    rows = load_rows(list(files))
    if not rows:
        from .errors import UsageError
        raise UsageError("no rows in " + ", ".join(map(str, files)))
    click.echo(render_rows(rows, fmt, plan_fn=predicted_rss_for_row))
    if claims:
        from .claims import judge, load_claims, render_claims
        from .plan import load_devices
        devs = load_devices(devices)
        cs = load_claims(None if str(claims) == "-" else claims)
        click.echo("\n" + render_claims([judge(c, rows, devs) for c in cs]))
    if plot:
        draw(rows, plot)
        click.echo(f"plot written to {plot}", err=True)


@cli.command("plan")
@click.argument("size")
@click.argument("quant", default="q4")
@click.option("--ctx", default=4096, show_default=True, help="Context length to hold in the KV cache.")
@click.option("--device", help="A device profile (list them with --device list).")
@click.option("--devices", type=click.Path(path_type=Path), help="Device profiles file.")
def plan_cmd(size, quant, ctx, device, devices):
    """Predict file size, peak RAM and decode speed of SIZE as QUANT, and whether it fits a device.

    SIZE is a recipe size (0.5b, 1.5b, 7b) or 72b / 57b-a14b, by arithmetic. Without --device
    it plans for this machine's CPU (on AMX CPUs llama.cpp keeps more repacked weights).

    \b
      edgeqwen plan 7b q4 --ctx 32768 --device x86-laptop-ddr5-16gb
    """
    from .errors import UsageError
    from .hw import fingerprint
    from .plan import describe, load_devices, plan
    devs = load_devices(devices) if device else {}
    if device == "list":
        for name, d in load_devices(devices).items():
            click.echo(f"{name:24s} {d['ram_gib']:>4} GiB {d['bandwidth_gbs']:>7} GB/s  {d['source']}")
        return
    if device and device not in devs:
        raise UsageError(f"unknown device {device!r}; choose one of: {', '.join(devs)}")
    amx = bool(devs.get(device, {}).get("amx")) if device else "amx_int8" in fingerprint(bandwidth=False)["isa"]
    p = plan(size, quant, ctx=ctx, amx=amx)
    click.echo(describe(p, device, devs.get(device)))


@cli.command("eval")
@click.argument("build")
@click.option("--reference", help="Reference build or Hugging Face folder (default: the f16 GGUF, or for ONNX "
              "builds the fp32 ONNX, of the same source, built if missing).")
@click.option("--text", "texts", multiple=True, default=["en", "zh"], show_default=True,
              help="en, zh (bundled texts) or a file; repeat for several.")
@click.option("--ctx", default=512, show_default=True, help="Window length; the second half of each is scored.")
@click.option("--threads", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the result rows as JSON lines.")
@click.option("--out", type=click.Path(path_type=Path), help="Append the rows to FILE.jsonl (for `edgeqwen table`).")
def eval_cmd(build, reference, texts, ctx, threads, as_json, out):
    """Measure what quantization costs: perplexity, KL and top-1 agreement against a reference.

    \b
      edgeqwen eval qwen2-0.5b-q4_k_m --text en --text zh --out results.jsonl
    """
    from .evaluate import evaluate_files, load_text
    from .evalrows import eval_row, resolve_reference
    from .home import resolve_build
    path, manifest = resolve_build(build)
    model_file = path / manifest["file"] if path.is_dir() else path
    ref_file = resolve_reference(path, manifest, reference, log=lambda m: click.echo(m, err=True))
    loaded = [load_text(spec) for spec in texts]
    for label, res in evaluate_files(model_file, ref_file, loaded, ctx, threads):
        row = eval_row(build, manifest, model_file, ref_file, label, res)
        if out:
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
        if as_json:
            click.echo(json.dumps(row))
        else:
            kl = f" · KL {res['kl_mean']:.5f} · top-1 {100 * res['top1']:.1f}% · ref PPL {res['ref_ppl']:.3f}" \
                if "kl_mean" in res else ""
            click.echo(f"{label}: PPL {res['ppl']:.3f}{kl} ({res['tokens_scored']} tokens, {res['seconds']:.1f} s)")


def main():
    cli(prog_name="edgeqwen")


if __name__ == "__main__":
    main()
