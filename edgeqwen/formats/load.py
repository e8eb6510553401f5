"""Open any build with its format's runner: the one place that decides between the runner in this process and,
for a model spread over llama.cpp RPC workers, the one in a child process (gguf/isolated.py)."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import RunnerError
from ..home import resolve_build
from ..manage import check_build
from ..runner import Runner, Sampling, generate_text
from . import FORMATS, detect, model_path


def _which(capability: str, article: bool = True) -> str:
    """The formats whose rows have a capability, as a message names them ("a GGUF")."""
    names = " or ".join(f.label for f in FORMATS.values() if getattr(f, capability))
    return f"a {names}" if article else names


@dataclass(frozen=True)
class LoadOptions:
    """How to load a build: made once, from the CLI's flags, a bench config or the server's config, and carried as is
    to load_runner (tune's stored settings fill what is unset: measure/tuned.py's with_tuned).

    lean: trades speed for memory: no repacked/prepacked second copy of the weights.
    logits: loads it for `logits()` over whole windows (eval) rather than for streaming.
    workers: llama.cpp RPC workers (rpc.Endpoint) to spread the layers over, in split proportions (this machine
    first); the model then runs in a child process unless isolate is False (see gguf/isolated.py).
    draft: a smaller GGUF build of the same tokenizer to draft tokens with, or "lookup" (n-grams of the context);
    the output is the target's either way (gguf/speculate.py).
    kv, flash_attn: the engine's KV cache type and flash attention (None: its default, or tune's).
    spin: False: llama.cpp's threads sleep while they wait for each other instead of spinning (a busy machine).
    parallel: conversations decoded together in one context, each with n_ctx (serve --parallel; formats whose row
    has `batched`)."""
    threads: int | None = None
    n_ctx: int | None = None
    logits: bool = False
    lean: bool = False
    workers: tuple | None = None
    split: tuple[float, ...] | None = None
    isolate: bool = True
    draft: str | None = None
    draft_max: int = 8
    kv: str | None = None
    flash_attn: bool | None = None
    spin: bool = True
    parallel: int = 1


def load_runner(build: str | Path, options: LoadOptions | None = None, **fields) -> Runner:
    """BUILD (folder, model file or build name) -> a loaded runner of its format's backend, as options say (fields
    given here replace the options' own: load_runner(b, n_ctx=512))."""
    o = replace(options or LoadOptions(), **fields)
    path, manifest = resolve_build(str(build))
    fmt = detect(path, manifest)
    kv = o.kv or "f16"
    if (kv != "f16" or o.flash_attn is not None) and not fmt.kv_settings:
        raise RunnerError(f"--kv and flash attention settings are llama.cpp's: they need {_which('kv_settings')} "
                          f"build; {path.name} is {fmt.name}")
    if o.draft is not None:
        if not fmt.drafts:
            raise RunnerError(f"--draft and --lookup need {_which('drafts')} target; {path.name} is {fmt.name}")
        if o.workers:
            raise RunnerError("--draft and --lookup do not combine with --workers (the verify pass would cross the "
                              "network for every draft)")
    if o.parallel > 1 and (not fmt.batched or o.draft is not None or o.workers or o.logits):
        raise RunnerError(f"--parallel needs {_which('batched')} build without --draft, --lookup or --workers; "
                          f"{path.name} is {fmt.name}" + (" with them" if fmt.batched else ""))
    if o.lean and not fmt.lean:
        # onnxruntime can skip prepacking (session.disable_prepacking, a flat string key of genai's
        # session_options), but MatMulNBits then dequantizes its weights on every call: the real 0.5B int4
        # decoded at 0.54 tok/s instead of 25.8, at 1.28 GiB peak RSS instead of 0.78 (README)
        raise RunnerError(f"--lean needs {_which('lean')} build: an ONNX build without prepacked weights is ~50x "
                          f"slower and larger ({path.name} is {fmt.name})")
    if o.workers:
        if not fmt.workers:
            raise RunnerError(f"--workers needs a build whose backend can use them ({_which('workers', False)}); "
                              f"{path.name} is {fmt.name}")
        if o.isolate:   # the handshake once, here; the child (and bench's, checked by its parent) does not repeat it
            from .gguf.isolated import IsolatedRunner
            from .gguf.rpc import check_workers
            check_workers(list(o.workers))
            return IsolatedRunner(str(build), replace(o, isolate=False), load_runner)
    extra = {}
    if not o.spin and fmt.spin:   # before runner_class() imports llama_cpp: libgomp reads it as it loads
        from .gguf.runner import wait_policy
        wait_policy(False)
        extra["spin"] = False
    cls = fmt.runner_class()
    check_build(path, manifest)
    model = model_path(path, manifest)
    if o.lean:
        extra["lean"] = True
    if o.workers:
        extra.update(workers=list(o.workers), split=list(o.split) if o.split else None)
    if kv != "f16":
        extra["kv"] = kv
    if o.flash_attn is not None:
        extra["flash_attn"] = o.flash_attn
    if o.parallel > 1:   # loaded on the batched runner's own thread; its own context stays small
        return fmt.load("batched")(lambda: cls(model, threads=o.threads, n_ctx=256, manifest=manifest, **extra),
                                   o.parallel, o.n_ctx)
    runner = cls(model, threads=o.threads, n_ctx=o.n_ctx, manifest=manifest, logits=o.logits, **extra)
    if o.draft is not None:
        try:
            runner.attach_draft(o.draft if o.draft == "lookup" else _load_draft(o.draft, cls, o.threads, runner.n_ctx),
                                o.draft_max)
        except BaseException:
            runner.close()
            raise
    return runner


def _load_draft(draft: str, target_cls, threads, n_ctx):
    path, manifest = resolve_build(str(draft))
    fmt = detect(path, manifest)
    if fmt.runner_class() is not target_cls:
        raise RunnerError(f"the draft must be {_which('drafts')} build like its target; {path.name} is {fmt.name}")
    check_build(path, manifest)
    return target_cls(model_path(path, manifest), threads=threads, n_ctx=n_ctx, manifest=manifest)


def _smoke_main(model: str, threads: str, n: str) -> None:
    from ..errors import EdgeqwenError
    try:
        r = load_runner(model, threads=int(threads) or None, n_ctx=512)
    except EdgeqwenError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)
    last = None
    text = ""
    for last in generate_text(r, "Say hello.", Sampling(max_tokens=int(n), temperature=0, ignore_eos=True)):
        text += last.text
    print(json.dumps({"tokens": last.generation_tokens, "text": text, "decode_tps": round(last.generation_tps, 2)}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["smoke"]:
        _smoke_main(*sys.argv[2:5])
