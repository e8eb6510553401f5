"""The chat REPL: streams replies, keeps history, drops the oldest turns when the context is full."""
from __future__ import annotations

import sys

import click

from ..errors import RunnerError
from ..runner import Response, Runner, Sampling, display_text
from ..text import clean

HELP = "/reset clears history · /stats last reply · /quit or Ctrl-D exits · Ctrl-C stops a reply"


def fit_history(runner: Runner, system: str | None, history: list[dict], reserve: int) -> tuple[list[int], int]:
    """Tokens of the templated conversation, dropping the oldest turns until it fits; returns (tokens, dropped)."""
    dropped = 0
    while True:
        msgs = ([{"role": "system", "content": system}] if system else []) + history
        tokens = runner.tokenize(runner.apply_chat_template(msgs), special=True)
        if len(tokens) + reserve <= runner.n_ctx or len(history) <= 1:
            return tokens, dropped
        # drop the oldest user turn and the reply that followed it
        del history[: 2 if len(history) > 2 and history[1]["role"] == "assistant" else 1]
        dropped += 1


def repl(runner: Runner, sampling: Sampling, system: str | None = None, out=None) -> None:
    out = out or sys.stdout
    try:
        import readline  # noqa: F401  line editing and up-arrow history for input()
    except ImportError:  # Windows
        pass
    if hasattr(sys.stdin, "reconfigure"):   # undecodable input reaches clean() instead of raising in input()
        sys.stdin.reconfigure(errors="surrogateescape")
    history: list[dict] = []
    last: Response | None = None
    reserve = min(sampling.max_tokens, runner.n_ctx // 4)
    click.echo(click.style(HELP, dim=True), file=out)
    while True:
        try:
            line = clean(input(">>> "))
        except EOFError:
            click.echo("", file=out)
            return
        except KeyboardInterrupt:
            click.echo("\n" + click.style("(Ctrl-D or /quit to exit)", dim=True), file=out)
            continue
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/quit", "/exit", "/bye"):
            return
        if cmd == "/reset":
            history.clear()
            click.echo(click.style("(history cleared)", dim=True), file=out)
            continue
        if cmd == "/stats":
            click.echo(stats_text(last) if last else "no reply yet", file=out)
            continue
        if cmd.startswith("/"):
            click.echo(f"unknown command {cmd}; {HELP}", file=out)
            continue
        history.append({"role": "user", "content": line})
        reply, interrupted, got = [], False, None
        try:
            tokens, dropped = fit_history(runner, system, history, reserve)
            if dropped:
                click.echo(click.style(f"(context full: dropped the {dropped} oldest turn(s))", dim=True), file=out)
            if len(tokens) >= runner.n_ctx:
                history.pop()
                click.echo(f"that message is {len(tokens)} tokens; the context holds {runner.n_ctx}", file=out)
                continue
            stream = runner.stream(tokens, sampling)
            try:
                for r in stream:
                    got = r  # first: a Ctrl-C while writing must still find the reply's figures
                    reply.append(r.text)
                    out.write(display_text(r.text))
                    out.flush()
            finally:
                stream.close()
        except KeyboardInterrupt:
            interrupted = True
        except RunnerError as e:
            history.pop()
            click.echo(f"\nError: {e}", file=out)
            continue
        click.echo("", file=out)
        if interrupted and got is None:
            history.pop()  # stopped before the model said anything: forget the question
            click.echo(click.style("(interrupted)", dim=True), file=out)
            continue
        history.append({"role": "assistant", "content": "".join(reply)})
        last = got
        if interrupted:
            last.finish_reason = "interrupted"
        note = " · interrupted" if last.finish_reason == "interrupted" else ""
        click.echo(click.style(stats_line(last) + note, dim=True), file=out)


def stats_line(r: Response) -> str:
    return (f"{r.generation_tps:.1f} tok/s · TTFT {r.ttft_s * 1000:.0f} ms · "
            f"RSS {r.peak_rss / 2**20:.0f} MiB")


def stats_text(r: Response) -> str:
    cached = f" ({r.cached_tokens} reused from the last turn)" if r.cached_tokens else ""
    return (f"prompt: {r.prompt_tokens} tokens{cached}, prefill {r.prompt_tps:.1f} tok/s · "
            f"TTFT {r.ttft_s * 1000:.0f} ms\n"
            f"reply:  {r.generation_tokens} tokens at {r.generation_tps:.1f} tok/s ({r.finish_reason})\n"
            f"peak RSS {r.peak_rss / 2**20:.0f} MiB")
