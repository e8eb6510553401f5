"""The `edgeqwen` command. Each command's docstring is its --help; heavy imports stay inside commands."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .. import __version__
from ..errors import EdgeqwenError
from ..params import CTX, MAX_TOKENS, TEMPERATURE, THREADS, TOP_P, Finite


class Group(click.Group):
    """Turns domain errors into one line on stderr and a non-zero exit, in one place."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeqwenError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(e.exit_code)
        except OSError as e:   # a path the user gave that cannot be read or written (a file as a folder, /proc...)
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"Error: {where}{e.strerror or e}", err=True)
            ctx.exit(1)
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
@click.option("--threads", type=THREADS, help="Quantization threads (default: physical cores).")
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
    from ..build import BuildRequest
    from ..build import build as run_build
    from ..recipes import get_recipe
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
    from ..home import builds_dir, list_builds
    from ..process import human_bytes
    from ..recipes import ONNX_QUANTS, buildable_gguf_quants, load_recipes
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


def device_options(f):
    """--lean, --workers and --split, shared by run, chat and serve (bench has its own --lean)."""
    f = click.option("--split", help="Shares of the layers, this machine first, then each worker (e.g. 1,1,1). "
                     "Default: every layer on the workers, by their free memory.")(f)
    f = click.option("--workers", help="llama.cpp RPC workers to spread the model over: HOST:PORT,... "
                     "(see `edgeqwen worker`).")(f)
    f = click.option("--lean", is_flag=True, help="Load without repacked/prepacked weight copies (less RAM, "
                     "maybe slower).")(f)
    return f


def _devices(lean, workers, split) -> dict:
    from ..formats.gguf.rpc import parse_split, parse_workers
    eps = parse_workers(workers)
    return {"lean": lean, "workers": eps or None, "split": parse_split(split, len(eps))}


def _sampling(max_tokens, temperature, top_p, seed):
    from ..runner import Sampling
    return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)


@cli.command()
@click.argument("build")
@click.argument("prompt", required=False)
@click.option("--max-tokens", "-n", default=256, show_default=True, type=MAX_TOKENS)
@click.option("--temperature", "-t", default=0.7, show_default=True, type=TEMPERATURE, help="0 is greedy.")
@click.option("--top-p", default=0.8, show_default=True, type=TOP_P)
@click.option("--seed", type=int, help="Sampling seed (default: random).")
@click.option("--system", help="System prompt.")
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print text, token counts and timings as JSON.")
@click.option("--threads", type=THREADS, help="Default: physical cores.")
@click.option("--ctx", type=CTX, help="Context length (default: 4096, capped by the model).")
@click.option("--verbose", "-v", is_flag=True, help="Timing line on stderr.")
@device_options
def run(build, prompt, max_tokens, temperature, top_p, seed, system, raw, as_json, threads, ctx, verbose, lean,
        workers, split):
    """Generate one answer to PROMPT (or stdin) with BUILD; only the answer goes to stdout.

    BUILD is a build name (see `edgeqwen list`), a build folder or a .gguf file.

    \b
      edgeqwen run qwen2-1.5b-q4_k_m "Why is the sky blue?"
      echo "Translate to French: cheese" | edgeqwen run qwen2-0.5b-q8_0 --temperature 0
      edgeqwen run qwen2-7b-q4_k_m "Hi" --workers 192.168.1.21:50052,192.168.1.22:50052
    """
    from ..errors import UsageError
    from ..formats.load import load_runner
    from ..runner import display_text, generate_text
    from ..text import clean, decode
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError("no prompt: give one as an argument or on stdin")
        prompt = decode(sys.stdin.buffer.read())
    prompt, system = clean(prompt), system and clean(system)
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    runner = load_runner(build, threads=threads, n_ctx=ctx, **_devices(lean, workers, split))
    text, last = [], None
    for last in generate_text(runner, prompt, _sampling(max_tokens, temperature, top_p, seed), raw=raw,
                              system=system):
        text.append(last.text)
        if not as_json:
            sys.stdout.write(display_text(last.text))
            sys.stdout.flush()
    if as_json:   # the same text stdout shows: one rule for what a model's control characters become
        click.echo(json.dumps({"text": display_text("".join(text)), "build": build, "backend": runner.backend,
                               "load_s": round(runner.load_s, 4), **last.stats()}))
    else:
        sys.stdout.write("\n")
    if verbose:
        from ..chat import stats_line
        click.echo(f"{last.generation_tokens} tokens · " + stats_line(last), err=True)
    runner.close()


@cli.command()
@click.argument("build")
@click.option("--system", help="System prompt.")
@click.option("--max-tokens", "-n", default=1024, show_default=True, type=MAX_TOKENS)
@click.option("--temperature", "-t", default=0.7, show_default=True, type=TEMPERATURE)
@click.option("--top-p", default=0.8, show_default=True, type=TOP_P)
@click.option("--seed", type=int)
@click.option("--threads", type=THREADS, help="Default: physical cores.")
@click.option("--ctx", type=CTX, help="Context length (default: 4096, capped by the model).")
@device_options
def chat(build, system, max_tokens, temperature, top_p, seed, threads, ctx, lean, workers, split):
    """Chat with BUILD in the terminal.

    /reset clears the history, /stats shows the last reply's speed, /quit or Ctrl-D leaves;
    Ctrl-C stops a reply.

    \b
      edgeqwen chat qwen2-1.5b-q4_k_m --system "Answer briefly."
    """
    from ..chat import repl
    from ..formats.load import load_runner
    from ..text import clean
    runner = load_runner(build, threads=threads, n_ctx=ctx, **_devices(lean, workers, split))
    repl(runner, _sampling(max_tokens, temperature, top_p, seed), system=system and clean(system))
    runner.close()



@cli.command()
@click.argument("builds", nargs=-1, required=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; any but loopback needs --api-key (or --insecure-no-key).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option("--api-key", envvar="EDGEQWEN_API_KEY", help="Require this bearer key (or $EDGEQWEN_API_KEY).")
@click.option("--insecure-no-key", is_flag=True, help="Serve a non-loopback host without a key (anyone who "
              "reaches the port can use the model).")
@click.option("--max-queue", default=16, show_default=True, type=click.IntRange(0, 4096),
              help="Requests that may wait for the model; more get 503.")
@click.option("--request-timeout", default=600.0, show_default=True, type=Finite(1, 86400),
              help="Seconds one request may generate for; then it ends as if max_tokens were reached.")
@click.option("--ctx", type=CTX, help="Context length (default: 4096, capped by the model).")
@click.option("--threads", type=THREADS, help="Default: physical cores.")
@click.option("--cors", help="Allow this browser origin (CORS is off by default).")
@device_options
def serve(builds, host, port, api_key, insecure_no_key, max_queue, request_timeout, ctx, threads, cors, lean,
          workers, split):
    """Serve BUILDS over an OpenAI-compatible HTTP API, with a chat page at /.

    Every build is loaded once before the server listens; one is resident at a time and
    swapped on demand; requests queue in FIFO order. A request whose client disconnects
    stops generating; max_tokens is capped at what the context leaves after the prompt.
    Endpoints: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics.

    \b
      edgeqwen serve qwen2-1.5b-q4_k_m --port 8080
      # then: OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="none")
    """
    from ..errors import UsageError
    from ..hosts import check_host, listen
    from ..serve.server import ServeConfig
    from ..serve.server import serve as run_server
    where = check_host(host)
    if not where.loopback and not api_key:
        if not insecure_no_key:
            raise UsageError(f"--host {host} is reachable from the network: give --api-key KEY (or "
                             "$EDGEQWEN_API_KEY), or --insecure-no-key to serve it to anyone who can reach it")
        click.echo(f"Warning: serving on {host} without --api-key: anyone who can reach this port can use the "
                   "model", err=True)
    cfg = ServeConfig(builds=list(builds), threads=threads, ctx=ctx, max_queue=max_queue, api_key=api_key, cors=cors,
                      load=_devices(lean, workers, split), request_timeout=request_timeout)
    sock = listen(where, port)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    run_server(cfg, sock, on_ready=lambda: click.echo(f"serving {', '.join(builds)} on {url} (OpenAI API at /v1)",
                                                       err=True))


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on; any other than "
              "loopback needs --allow-remote.")
@click.option("--port", default=50052, show_default=True, type=click.IntRange(1, 65535))
@click.option("--threads", type=THREADS, help="Default: physical cores.")
@click.option("--allow-remote", is_flag=True, help="Listen on a non-loopback address (read the warning it prints).")
@click.option("--cache", "use_cache", is_flag=True, help="Keep received weights in the cache folder, so a model "
              "reloads without sending them again (llama.cpp's rpc-server -c).")
def worker(host, port, threads, allow_remote, use_cache):
    """Serve this machine's CPU to another machine's run, chat, bench or serve (--workers).

    llama.cpp's RPC backend: the client sends this worker its share of the layers and runs
    them here for every token. One client at a time. The protocol is unauthenticated: keep
    workers on 127.0.0.1, a trusted LAN or an SSH tunnel, never an open network.

    \b
      pi-2$ edgeqwen worker --host 0.0.0.0 --allow-remote
      pi-1$ edgeqwen chat qwen2-7b-q4_k_m --workers pi-2.local:50052 --split 1,1
    """
    from ..home import home
    from ..process import physical_cores
    from ..hosts import check_host
    from ..formats.gguf.rpc import UNSAFE_WARNING, serve_worker
    if not check_host(host).loopback and allow_remote:
        click.echo(f"Warning: listening on {host}. {UNSAFE_WARNING}", err=True)
    cache = home() / "rpc-cache" if use_cache else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    n = threads or physical_cores()
    serve_worker(host, port, n, allow_remote, cache_dir=cache,
                 ready=lambda: click.echo(f"worker listening on {host}:{port} with {n} threads (Ctrl-C stops)",
                                          err=True))


def _register() -> None:
    from . import manage as cli_manage, measure as cli_measure
    for c in cli_manage.COMMANDS + cli_measure.COMMANDS:
        cli.add_command(c)


_register()


def main():
    cli(prog_name="edgeqwen")


if __name__ == "__main__":
    main()
