"""`edgeqwen serve | worker`: the HTTP server, and this machine's CPU for another machine's model."""
from __future__ import annotations


import click

from .params import CTX, THREADS, Finite, device_options, load_options, tuned


def _with_slots(build: str, options, parallel: int | None):
    """The build's load options with its --parallel: asked of formats that batch (and loads that can), checked
    against available memory by plan, or chosen by it."""
    from dataclasses import replace

    from ..errors import UsageError
    from ..formats import detect
    from ..home import resolve_build
    from ..measure.plan import parallel_slots
    path, manifest = resolve_build(build)
    if not detect(path, manifest).batched:
        if parallel and parallel > 1:
            click.echo(f"Note: {path.name} answers one request at a time (--parallel is for GGUF builds)", err=True)
        return options
    if options.draft is not None or options.workers:
        if parallel and parallel > 1:
            raise UsageError("--parallel does not combine with --draft, --lookup or --workers")
        return options
    return replace(options, parallel=parallel_slots(build, options.n_ctx, parallel, options.kv or "f16"))


@click.command()
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
@click.option("--read-timeout", default=30.0, show_default=True, type=Finite(0.1, 3600),
              help="Seconds a client has to send its whole request body; a slower one gets 408 and is closed.")
@click.option("--ctx", type=CTX, help="Context length (default: 4096, capped by the model).")
@click.option("--threads", type=THREADS, help="Default: physical cores.")
@click.option("--cors", help="Allow this browser origin (CORS is off by default).")
@click.option("--parallel", type=click.IntRange(1, 64), help="Conversations of a GGUF build decoded at once, each "
              "with --ctx (continuous batching) [default: up to 4, as many as plan says fit in available memory]. "
              "ONNX and MLX builds, and GGUF ones with --draft, --lookup or --workers, answer one at a time.")
@device_options
def serve(builds, host, port, api_key, insecure_no_key, max_queue, request_timeout, read_timeout, ctx, threads, cors,
          parallel, lean, workers, split, draft, lookup, draft_max, kv, flash_attn, no_tune):
    """Serve BUILDS over an OpenAI-compatible HTTP API, with a chat page at /.

    Every build is loaded once before the server listens; one is resident at a time and
    swapped on demand; requests queue in FIFO order, and up to --parallel of them run at once
    on a GGUF build (one batched llama.cpp pass per token). A request whose client disconnects
    stops generating; max_tokens is capped at what the context leaves after the prompt.
    Endpoints: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics.

    \b
      edgeqwen serve qwen2-1.5b-q4_k_m --port 8080
      # then: OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="none")
      edgeqwen serve qwen2-1.5b-q8_0 --draft qwen2-0.5b-q4_0    # every build served drafts with it
      edgeqwen serve qwen2-0.5b-q4_k_m --parallel 8 --ctx 2048     # eight users at once
    """
    from ..errors import UsageError
    from ..hosts import check_host, listen
    from ..serve import ServeConfig
    from ..serve import serve as run_server
    where = check_host(host)
    if not where.loopback and not api_key:
        if not insecure_no_key:
            raise UsageError(f"--host {host} is reachable from the network: give --api-key KEY (or "
                             "$EDGEQWEN_API_KEY), or --insecure-no-key to serve it to anyone who can reach it")
        click.echo(f"Warning: serving on {host} without --api-key: anyone who can reach this port can use the "
                   "model", err=True)
    load = load_options(threads, ctx, lean, workers, split, draft, lookup, draft_max, kv, flash_attn)
    # each build with its own tuned settings (what is given explicitly applies to all)
    per_build = {b: tuned(b, load, no_tune) for b in builds}
    per_build = {b: _with_slots(b, o, parallel) for b, o in per_build.items()}
    cfg = ServeConfig(builds=list(builds), max_queue=max_queue, api_key=api_key, cors=cors, load=load,
                      per_build=per_build, request_timeout=request_timeout, read_timeout=read_timeout)
    sock = listen(where, port)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    run_server(cfg, sock, on_ready=lambda: click.echo(f"serving {', '.join(builds)} on {url} (OpenAI API at /v1)",
                                                       err=True))


@click.command()
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


COMMANDS = [serve, worker]
