"""`edgeqwen run | chat`: one answer, or a conversation in the terminal."""
from __future__ import annotations

import json
import sys

import click

from .params import CTX, MAX_TOKENS, TEMPERATURE, THREADS, TOP_P, device_options, load_options, tuned


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
    runner = load_runner(build, tuned(build, load_options(threads, ctx, lean, workers, split, draft, lookup, draft_max,
                                                          kv, flash_attn), no_tune))
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
    runner = load_runner(build, tuned(build, load_options(threads, ctx, lean, workers, split, draft, lookup, draft_max,
                                                          kv, flash_attn), no_tune))
    repl(runner, _sampling(max_tokens, temperature, top_p, seed), system=system and clean(system))
    runner.close()


COMMANDS = [run, chat]
