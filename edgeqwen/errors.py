"""One small hierarchy of domain errors; the CLI turns each into a one-line message and exit code."""


class EdgeqwenError(Exception):
    """Base class: the message is meant for the user, one line, no traceback."""

    exit_code = 1


class UsageError(EdgeqwenError):
    """Bad input from the user: unknown size, quant, key, build name..."""

    exit_code = 2


class RecipeError(UsageError):
    pass


class SourceError(EdgeqwenError):
    """The checkpoint cannot be used: missing, truncated, pickle-only, not qwen2, offline..."""


class BuildError(EdgeqwenError):
    """A build step failed (conversion, quantization, disk space, smoke check)."""


class RunnerError(EdgeqwenError):
    """A build cannot be loaded or run (corrupt file, backend not installed)."""
