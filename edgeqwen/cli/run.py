"""`edgeqwen run | chat`: one answer, or a conversation in the terminal; the device options run, chat and serve
share."""
from __future__ import annotations

import json
import sys

import click

from ..formats import DEFAULT, of_manifest
from .params import CTX, MAX_TOKENS, TEMPERATURE, THREADS, TOP_P


def device_options(f):
    """--lean, --workers, --split and speculative decoding, shared by run, chat and serve (bench has its own)."""
    f = speculative_options(f)
    f = KV_OPTION(f)
    f = tune_options(f)
    f = click.option("--split", help="Shares of the layers, this machine first, then each worker (e.g. 1,1,1). "
                     "Default: every layer on the workers, by their free memory.")(f)
    f = click.option("--workers", help="llama.cpp RPC workers to spread the model over: HOST:PORT,... "
                     "(see `edgeqwen worker`).")(f)
    f = click.option("--lean", is_flag=True, help="Load without repacked/prepacked weight copies (less RAM, "
                     "maybe slower).")(f)
    return f


KV_OPTION = click.option("--kv", type=click.Choice(["f16", "q8_0"]),
                         help="KV cache type (GGUF): q8_0 halves its memory at a small quality cost (README). "
                         "Default: f16, or what `edgeqwen tune` chose.")


def tune_options(f):
    """--flash-attn and --no-tune: run, chat, serve and bench (a setting given explicitly always wins)."""
    f = click.option("--no-tune", is_flag=True, help="Ignore `edgeqwen tune`'s stored settings for this "
                     "machine and build: llama.cpp's defaults.")(f)
    f = click.option("--flash-attn", type=click.Choice(["on", "off"]),
                     help="Flash attention (GGUF). Default: on, or what `edgeqwen tune` chose.")(f)
    return f


def tuned(build: str, threads: int | None, load: dict, no_tune: bool) -> tuple[int | None, dict]:
    """Fill the settings not given with `edgeqwen tune`'s winner for this machine and build file, if stored."""
    from ..errors import EdgeqwenError
    from ..home import resolve_build
    if no_tune or load.get("workers"):
        return threads, load
    try:
        _, manifest = resolve_build(str(build))
    except EdgeqwenError:   # the load says what is wrong with it
        return threads, load
    if not manifest or not (of_manifest(manifest) or DEFAULT).tune:
        return threads, load
    from ..measure.tuned import for_now, lookup
    s = lookup(manifest.get("sha256"))
    if not s:
        return threads, load
    import logging
    logging.getLogger("edgeqwen").info(f"tuned settings for {manifest.get('name')}: {s}")
    if not threads:   # the thread count given is the user's; how many, and how they wait, follow the load now
        s = for_now(s)
        load = dict(load, spin=s.get("spin", True))
    load = dict(load, kv=load.get("kv") or s["kv"],
                flash_attn=s["flash_attn"] if load.get("flash_attn") is None else load["flash_attn"])
    return threads or s["threads"], load


def speculative_options(f):
    """--draft, --lookup and --draft-max: run, chat, serve and bench."""
    f = click.option("--draft-max", type=click.IntRange(1, 32), default=8, show_default=True,
                     help="Most tokens drafted at once (the length adapts to how many are accepted).")(f)
    f = click.option("--lookup", is_flag=True, help="Draft from n-grams already in the prompt and answer (no "
                     "second model): faster on code edits, summaries and quoting answers; same output.")(f)
    f = click.option("--draft", metavar="BUILD", help="Speculative decoding: a smaller GGUF build with the same "
                     "tokenizer drafts, BUILD verifies several tokens per pass; the output is BUILD's own.")(f)
    return f


def draft_of(draft, lookup) -> str | None:
    from ..errors import UsageError
    if draft and lookup:
        raise UsageError("--draft and --lookup exclude each other: choose one way to draft")
    if draft is not None and draft.strip().lower() == "lookup":
        raise UsageError("--draft lookup: use --lookup")
    return "lookup" if lookup else draft


def _devices(lean, workers, split, draft=None, lookup=False, draft_max=8, kv=None, flash_attn=None) -> dict:
    from ..formats.gguf.rpc import parse_split, parse_workers
    eps = parse_workers(workers)
    return {"lean": lean, "workers": eps or None, "split": parse_split(split, len(eps)),
            "draft": draft_of(draft, lookup), "draft_max": draft_max, "kv": kv,
            "flash_attn": None if flash_attn is None else flash_attn == "on"}


def _sampling(max_tokens, temperature, top_p, seed):
    from ..runner import Sampling
    return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)


@click.command()
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
        workers, split, draft, lookup, draft_max, kv, flash_attn, no_tune):
    """Generate one answer to PROMPT (or stdin) with BUILD; only the answer goes to stdout.

    BUILD is a build name (see `edgeqwen list`), a build folder or a .gguf file.

    \b
      edgeqwen run qwen2-1.5b-q4_k_m "Why is the sky blue?"
      echo "Translate to French: cheese" | edgeqwen run qwen2-0.5b-q8_0 --temperature 0
      edgeqwen run qwen2-7b-q4_k_m "Hi" --workers 192.168.1.21:50052,192.168.1.22:50052
      edgeqwen run qwen2-1.5b-q8_0 "Write quicksort in C" --draft qwen2-0.5b-q4_0 -t 0
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
    threads, load = tuned(build, threads, _devices(lean, workers, split, draft, lookup, draft_max, kv, flash_attn),
                          no_tune)
    runner = load_runner(build, threads=threads, n_ctx=ctx, **load)
    text, last = [], None
    for last in generate_text(runner, prompt, _sampling(max_tokens, temperature, top_p, seed), raw=raw,
                              system=system):
        text.append(last.text)
        if not as_json:
            sys.stdout.write(display_text(last.text))
            sys.stdout.flush()
    if as_json:   # a machine's output: the model's exact text, JSON-escaped (runner.display_text's rule)
        click.echo(json.dumps({"text": "".join(text), "build": build, "backend": runner.backend,
                               "load_s": round(runner.load_s, 4), **last.stats()}))
    else:
        sys.stdout.write("\n")
    if verbose:
        from .chat import stats_line
        click.echo(f"{last.generation_tokens} tokens · " + stats_line(last), err=True)
    runner.close()


@click.command()
@click.argument("build")
@click.option("--system", help="System prompt.")
@click.option("--max-tokens", "-n", default=1024, show_default=True, type=MAX_TOKENS)
@click.option("--temperature", "-t", default=0.7, show_default=True, type=TEMPERATURE)
@click.option("--top-p", default=0.8, show_default=True, type=TOP_P)
@click.option("--seed", type=int)
@click.option("--threads", type=THREADS, help="Default: physical cores.")
@click.option("--ctx", type=CTX, help="Context length (default: 4096, capped by the model).")
@device_options
def chat(build, system, max_tokens, temperature, top_p, seed, threads, ctx, lean, workers, split, draft, lookup,
         draft_max, kv, flash_attn, no_tune):
    """Chat with BUILD in the terminal.

    /reset clears the history, /stats shows the last reply's speed, /quit or Ctrl-D leaves;
    Ctrl-C stops a reply.

    \b
      edgeqwen chat qwen2-1.5b-q4_k_m --system "Answer briefly."
    """
    from .chat import repl
    from ..formats.load import load_runner
    from ..text import clean
    threads, load = tuned(build, threads, _devices(lean, workers, split, draft, lookup, draft_max, kv, flash_attn),
                          no_tune)
    runner = load_runner(build, threads=threads, n_ctx=ctx, **load)
    repl(runner, _sampling(max_tokens, temperature, top_p, seed), system=system and clean(system))
    runner.close()


COMMANDS = [run, chat]
