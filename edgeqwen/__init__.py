"""edgeqwen: build, run and measure Qwen2-family models on the CPU you have.

The library API beside the CLI (each name imports its stage only when used):

    import edgeqwen
    folder = edgeqwen.build("0.5b", "q4", synthetic=True)
    for r in edgeqwen.load(folder).stream("Why is the sky blue?"):
        print(r.text, end="")
"""

__version__ = "0.1.0"

__all__ = ["build", "load", "bench", "evaluate", "__version__"]


def build(model: str, quant: str = "q4", **options):
    """Build MODEL (a size or recipe name) as QUANT; options are BuildRequest's fields. Returns the folder."""
    from .formats.build import BuildRequest
    from .formats.build import build as run
    from .recipes import get_recipe
    return run(BuildRequest(recipe=get_recipe(model), quant=quant, **options))


class Model:
    """A loaded build: stream(prompt) yields Responses (text plus the measurements so far)."""

    def __init__(self, runner):
        self.runner = runner

    def stream(self, prompt: str, max_tokens: int = 256, temperature: float = 0.7, raw: bool = False,
               system: str | None = None, **sampling):
        from .runner import Sampling, generate_text
        s = Sampling(max_tokens=max_tokens, temperature=temperature, **sampling)
        return generate_text(self.runner, prompt, s, raw=raw, system=system)

    def close(self) -> None:
        self.runner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load(build, threads: int | None = None, ctx: int | None = None) -> Model:
    """Load a build (name, folder or model file) with its format's backend."""
    from .formats.load import load_runner
    return Model(load_runner(build, threads=threads, n_ctx=ctx))


def bench(builds, threads=None, out=None, **config) -> list[dict]:
    """Benchmark rows (as `edgeqwen bench` writes them) for builds at the given thread counts."""
    from .measure.bench import BenchConfig, parse_threads
    from .measure.bench import bench as run
    from .measure.hw import fingerprint
    ts = threads if isinstance(threads, list) else parse_threads(threads)
    return run([str(b) for b in ([builds] if isinstance(builds, str) else builds)], ts, BenchConfig(**config),
               fingerprint(), out=out)


def evaluate(build, texts=("en", "zh"), ctx: int = 512, reference=None, threads: int | None = None) -> dict:
    """{text label: PPL, KL and top-1 against the reference} for a build, as `edgeqwen eval` computes them."""
    from .measure.evalrows import resolve_reference
    from .measure.evaluate import evaluate_files, load_text
    from .home import resolve_build
    path, manifest = resolve_build(str(build))
    from .formats import model_path
    model = model_path(path, manifest)
    ref = resolve_reference(path, manifest, reference)
    return dict(evaluate_files(model, ref, [load_text(t) for t in texts], ctx, threads))
