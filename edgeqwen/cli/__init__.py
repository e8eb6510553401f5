"""The `edgeqwen` command: the click group, and one module per command family (build, run, serve, manage,
measure). Each command's docstring is its --help; heavy imports stay inside commands.

May import anything in the package; nothing imports it."""
from __future__ import annotations

import logging
import sys

import click

from .. import __version__
from ..errors import EdgeqwenError


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


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a message comes (click's CliRunner swaps it), not the one at setup."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def _setup_logging(verbose: bool) -> None:
    """Library messages (logger "edgeqwen") go to stderr as plain lines; backend logs only with -v."""
    log = logging.getLogger("edgeqwen")
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        h = _Stderr()
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("edgeqwen.llama").setLevel(logging.DEBUG if verbose else logging.WARNING)


def _register() -> None:
    from . import build, manage, measure, run, serve
    for c in build.COMMANDS + run.COMMANDS + serve.COMMANDS + manage.COMMANDS + measure.COMMANDS:
        cli.add_command(c)


_register()


def main():
    cli(prog_name="edgeqwen")


if __name__ == "__main__":
    main()
