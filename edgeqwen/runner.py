"""One runner protocol for every backend: load a build, stream tokens with measurements.

chat, run and bench all consume `Runner.stream(...)`; none of them times anything itself.
Each yielded Response carries the new text plus the measurements so far (TTFT, prefill and
decode tok/s, peak RSS); the last one has finish_reason set and the backend's own counters.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import psutil

from .errors import BuildError, RunnerError
from .home import resolve_build

DEFAULT_CTX = 4096


@dataclass
class Response:
    text: str
    token: int | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    ttft_s: float
    peak_rss: int
    finish_reason: str | None = None   # "stop" | "length" | "interrupted"
    counters: dict = field(default_factory=dict)
    cached_tokens: int = 0             # prompt tokens whose KV was reused from the last call

    def stats(self) -> dict:
        d = asdict(self)
        for k in ("text", "token"):
            d.pop(k)
        return d


@dataclass
class Sampling:
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    min_p: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False


class Runner(Protocol):
    backend: str
    n_ctx: int
    load_s: float
    chat_template: str | None
    regular_vocab: int   # ids below it are ordinary text tokens (bench draws random prompts from them)

    def tokenize(self, text: str, special: bool = True) -> list[int]: ...
    def apply_chat_template(self, messages: list[dict]) -> str: ...
    def stream(self, tokens: list[int], sampling: Sampling) -> Iterator[Response]: ...
    def logits(self, tokens: list[int]) -> np.ndarray: ...   # [len(tokens), vocab], from an empty context
    def close(self) -> None: ...


def load_runner(build: str | Path, threads: int | None = None, n_ctx: int | None = None,
                logits: bool = False, lean: bool = False, workers: list | None = None,
                split: list[float] | None = None, isolate: bool = True) -> Runner:
    """BUILD (folder, model file or build name) -> a loaded runner of its format's backend.

    lean=True trades speed for memory: no repacked/prepacked second copy of the weights.
    logits=True loads it for `logits()` over whole windows (eval) rather than for streaming.
    workers: llama.cpp RPC workers (rpc.Endpoint) to spread the layers over, in split proportions
    (this machine first); the model then runs in a child process unless isolate=False (see rpc.py).
    """
    from .formats import detect
    from .manage import check_build
    path, manifest = resolve_build(str(build))
    fmt = detect(path, manifest)
    if lean and not fmt.lean:
        # onnxruntime can skip prepacking (session.disable_prepacking, a flat string key of genai's
        # session_options), but MatMulNBits then dequantizes its weights on every call: the real 0.5B int4
        # decoded at 0.54 tok/s instead of 25.8, at 1.28 GiB peak RSS instead of 0.78 (README)
        raise RunnerError(f"--lean needs a GGUF build: an ONNX build without prepacked weights is ~50x slower "
                          f"and larger ({path.name} is {fmt.name})")
    if workers:
        if not fmt.workers:
            raise RunnerError(f"--workers needs a build whose backend can use them (GGUF); {path.name} is {fmt.name}")
        if isolate:   # the handshake once, here; the child (and bench's, checked by its parent) does not repeat it
            from .formats.gguf.rpc import IsolatedRunner, check_workers
            check_workers(workers)
            return IsolatedRunner(str(build), threads=threads, n_ctx=n_ctx, logits=logits, lean=lean,
                                  workers=workers, split=split)
    cls = fmt.runner_class()
    check_build(path, manifest)
    model = path / manifest["file"] if path.is_dir() else path
    extra = {"lean": True} if lean else {}
    if workers:
        extra.update(workers=workers, split=split)
    return cls(model, threads=threads, n_ctx=n_ctx, manifest=manifest, logits=logits, **extra)


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, **special) -> str:
    """Render a model's chat template the way transformers does, in a sandbox."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise RunnerError(f"chat template: {msg}")

    from jinja2 import TemplateError
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **special)
    except RunnerError:
        raise
    except (TemplateError, ArithmeticError, TypeError, ValueError, LookupError, AttributeError, RecursionError,
            OverflowError, MemoryError) as e:   # a broken template in a file's metadata is the file's fault
        raise RunnerError(f"the build's chat template fails ({type(e).__name__}: {e}); use --raw") from None


# --- what every backend's stream shares -------------------------------------------------------------

def check_prompt(tokens: list[int], n_ctx: int, sampling: Sampling) -> int:
    """Refuse an empty or too long prompt; returns how many tokens may be generated."""
    if not tokens:
        raise RunnerError("empty prompt")
    if len(tokens) >= n_ctx:
        raise RunnerError(f"prompt is {len(tokens)} tokens; the context holds {n_ctx}")
    return min(sampling.max_tokens, n_ctx - len(tokens))


def shared_prefix(old: list[int], new: list[int]) -> int:
    """Leading tokens of new whose KV a backend can keep from old; at least one new token is always evaluated."""
    n = 0
    for a, b in zip(old, new):
        if a != b:
            break
        n += 1
    return min(n, len(new) - 1)


def respond(tokens_out: Iterator[int], *, t0: float, n_prompt: int, cached: int, max_new: int,
            is_eog: Callable[[int], bool], decode: Callable[[int | None], str], proc: psutil.Process,
            counters: Callable[[], dict] = dict) -> Iterator[Response]:
    """Time the tokens a backend produces, stop at EOS or max_new, and yield Responses with the measurements.

    tokens_out evaluates the prompt before its first token; decode(None) flushes held-back bytes;
    counters() gives the backend's own figures once the stream finishes.
    """
    peak = proc.memory_info().rss
    n_gen, ttft, t_first, now = 0, 0.0, 0.0, t0

    def response(text, tok, finish):
        dec = (n_gen - 1) / (now - t_first) if n_gen > 1 and now > t_first else 0.0
        return Response(text, tok, n_prompt, (n_prompt - cached) / ttft if ttft else 0.0, n_gen, dec, ttft, peak,
                        finish, counters() if finish else {}, cached)

    try:
        for tok in tokens_out:
            now = time.perf_counter()
            if n_gen == 0:
                ttft, t_first = now - t0, now
            n_gen += 1
            if n_gen % 16 == 1:  # RSS moves slowly; reading it every token costs decode speed
                peak = max(peak, proc.memory_info().rss)
            eog = is_eog(tok)
            finish = "stop" if eog else "length" if n_gen >= max_new else None
            if finish:
                peak = max(peak, proc.memory_info().rss)
            text = ("" if eog else decode(tok)) + (decode(None) if finish else "")
            yield response(text, tok, finish)
            if finish:
                return
    except KeyboardInterrupt:
        now = time.perf_counter()
        yield response(decode(None), None, "interrupted")


_CONTROL = {c: "\ufffd" for c in range(32) if chr(c) not in "\n\t"} | {127: "\ufffd"}


def display_text(text: str) -> str:
    """Text safe for a terminal: control characters (NUL, ESC sequences from a model) become U+FFFD, as
    invalid UTF-8 already does in the backends' decoders."""
    return text.translate(_CONTROL)


def generate_text(runner: Runner, prompt: str, sampling: Sampling, raw: bool = False,
                  system: str | None = None) -> Iterator[Response]:
    """Prompt text -> response stream, with the model's chat template unless raw."""
    if raw:
        tokens = runner.tokenize(prompt, special=True)
    else:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        tokens = runner.tokenize(runner.apply_chat_template(msgs), special=True)
    return runner.stream(tokens, sampling)


# --- the build's smoke check, in a child process so a crash in ggml becomes a clear error -------

IN_CHILD = "EDGEQWEN_IN_CHILD_CHECK"   # set in the smoke/probe child: it must not probe again


def smoke_check(model: Path, threads: int | None = None, tokens: int = 8, timeout: float = 1800) -> dict:
    import os
    cmd = [sys.executable, "-m", "edgeqwen.runner", "smoke", str(model), str(threads or 0), str(tokens)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, IN_CHILD: "1"}, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BuildError(f"{model}: the check did not finish in {timeout:.0f} s") from None
    if p.returncode < 0:
        sig = signal.Signals(-p.returncode).name
        from .formats import detect
        if detect(model).name == "onnx":
            raise BuildError(f"onnxruntime crashed ({sig}) running {model}")
        if sig == "SIGABRT":
            raise BuildError(f"llama.cpp crashed (SIGABRT) on {model}: an assertion failed on something in the file, "
                             "which is malformed")
        raise BuildError(f"llama.cpp crashed ({sig}) running {model.name}; if this is an AMX CPU with gcc < 13.3, "
                         "reinstall llama-cpp-python with 'make setup'")
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("Error: ")
        raise BuildError(f"smoke check failed for {model}: {last}")
    try:
        result = json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise BuildError(f"smoke check of {model} printed no result") from None
    if result["tokens"] < 1:
        raise BuildError(f"smoke check: {model} generated no tokens")
    return result


def _smoke_main(model: str, threads: str, n: str) -> None:
    from .errors import EdgeqwenError
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
