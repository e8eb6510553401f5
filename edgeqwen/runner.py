"""One runner protocol for every backend: load a build, stream tokens with measurements.

chat, run and bench all consume `Runner.stream(...)`; none of them times anything itself.
Each yielded Response carries the new text plus the measurements so far (TTFT, prefill and
decode tok/s, peak RSS); the last one has finish_reason set and the backend's own counters.
"""
from __future__ import annotations

import codecs
import ctypes
import importlib
import json
import os
import platform
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
from .measure import physical_cores

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

    def tokenize(self, text: str, special: bool = True) -> list[int]: ...
    def apply_chat_template(self, messages: list[dict]) -> str: ...
    def stream(self, tokens: list[int], sampling: Sampling) -> Iterator[Response]: ...
    def close(self) -> None: ...


# Backends by build format: (module, class, the package it needs, how to install it).
BACKENDS = {
    "gguf": ("edgeqwen.runner", "LlamaRunner", "llama_cpp", "pip install -e '.[gguf]' (or make setup)"),
    "onnx": ("edgeqwen.onnx_runner", "OnnxRunner", "onnxruntime_genai", "pip install -e '.[onnx]'"),
}


def build_format(path: Path, manifest: dict | None) -> str:
    if manifest and manifest.get("format"):
        return manifest["format"]
    if path.suffix == ".gguf":
        return "gguf"
    if path.suffix == ".onnx" or (path.is_dir() and (path / "genai_config.json").exists()):
        return "onnx"
    raise RunnerError(f"{path}: not a model file edgeqwen can run (.gguf, or a build folder)")


def load_runner(build: str | Path, threads: int | None = None, n_ctx: int | None = None) -> Runner:
    """BUILD (folder, model file or build name) -> a loaded runner of the right backend."""
    path, manifest = resolve_build(str(build))
    fmt = build_format(path, manifest)
    if fmt not in BACKENDS:
        raise RunnerError(f"{path}: unknown build format {fmt!r}")
    module, cls, needs, how = BACKENDS[fmt]
    try:
        importlib.import_module(needs)
    except ImportError:
        raise RunnerError(f"{path} is a {fmt} build and needs {needs}, which is not installed: {how}") from None
    try:
        backend = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        raise RunnerError(f"{fmt} builds cannot be run by this version of edgeqwen") from None
    model = path / manifest["file"] if path.is_dir() else path
    return backend(model, threads=threads, n_ctx=n_ctx, manifest=manifest)


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, **special) -> str:
    """Render a model's chat template the way transformers does, in a sandbox."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise RunnerError(f"chat template: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **special)


class LlamaRunner:
    """llama.cpp through llama-cpp-python."""

    backend = "llama.cpp"

    def __init__(self, model: Path, threads: int | None = None, n_ctx: int | None = None,
                 manifest: dict | None = None, n_batch: int = 512):
        import llama_cpp
        self._lc = llama_cpp
        self.path = Path(model)
        if not self.path.exists():
            raise RunnerError(f"{self.path}: no such model file")
        _check_gguf(self.path)
        self.threads = threads or physical_cores()
        # Metal on Apple Silicon when this llama-cpp-python has it; CPU everywhere else.
        gpu = -1 if (sys.platform == "darwin" and platform.machine() == "arm64"
                     and llama_cpp.llama_supports_gpu_offload()) else 0
        # llama.cpp rounds the context up to a multiple of 256, but llama-cpp-python sizes its token
        # buffer by the number asked for: ask for the rounded size so the two agree.
        n_ctx = -(-n_ctx // 256) * 256 if n_ctx else None
        t0 = time.perf_counter()
        try:
            self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx or DEFAULT_CTX, n_batch=n_batch,
                                       n_threads=self.threads, n_threads_batch=self.threads, use_mmap=True,
                                       n_gpu_layers=gpu, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise RunnerError(f"{self.path}: llama.cpp cannot load this model; the file is corrupt, truncated or of an "
                              f"unsupported architecture ({e})") from None
        self.load_s = time.perf_counter() - t0
        train_ctx = self.llm._model.n_ctx_train()
        if n_ctx is None and train_ctx < DEFAULT_CTX:  # context from the build, capped by the model
            self.llm.close()
            self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=train_ctx, n_batch=n_batch,
                                       n_threads=self.threads, n_threads_batch=self.threads,
                                       n_gpu_layers=gpu, verbose=False)
        self.n_ctx = min(self.llm.n_ctx(), len(self.llm.input_ids))
        self.n_vocab = self.llm.n_vocab()
        self.gpu_layers = gpu
        self._pieces: dict[tuple[int, bool], bytes] = {}
        meta = self.llm.metadata
        self.chat_template = meta.get("tokenizer.chat_template")
        self.eos_token = self._piece(self.llm.token_eos())
        self.proc = psutil.Process(os.getpid())

    def _piece(self, tok: int) -> str:
        return self._piece_bytes(tok, special=True).decode("utf-8", "replace")

    def _piece_bytes(self, tok: int, special: bool = False) -> bytes:
        # llama-cpp-python's own token_to_piece returns its whole 32-byte buffer, NULs included.
        key = (tok, special)
        if key not in self._pieces:
            buf = ctypes.create_string_buffer(256)
            n = self._lc.llama_token_to_piece(self.llm._model.vocab, tok, buf, len(buf), 0, special)
            self._pieces[key] = buf.raw[:max(n, 0)]
        return self._pieces[key]

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", "replace")

    def apply_chat_template(self, messages: list[dict]) -> str:
        if not self.chat_template:
            raise RunnerError(f"{self.path} has no chat template; use --raw")
        return render_chat(self.chat_template, messages, eos_token=self.eos_token, bos_token="")

    def _argmax(self) -> int:
        # Greedy straight off the logits: libllama's sampler copies all ~152k candidates per token,
        # which costs several percent of decode speed on small models.
        ptr = self._lc.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def _sampler(self, s: Sampling):
        from llama_cpp import _internals as internals
        smp = internals.LlamaSampler()
        if s.temperature <= 0:
            smp.add_greedy()
        else:
            smp.add_top_k(s.top_k)
            smp.add_top_p(s.top_p, 1)
            if s.min_p > 0:
                smp.add_min_p(s.min_p, 1)
            smp.add_temp(s.temperature)
            smp.add_dist(s.seed if s.seed is not None else int.from_bytes(os.urandom(4), "little"))
        return smp

    def stream(self, tokens: list[int], sampling: Sampling) -> Iterator[Response]:
        lc, llm = self._lc, self.llm
        max_new = check_prompt(tokens, self.n_ctx, sampling)
        # Reuse the KV cache for the prefix this prompt shares with the last one (chat turns).
        prefix = shared_prefix(llm.input_ids[: llm.n_tokens], tokens)
        llm.n_tokens = prefix
        greedy = sampling.temperature <= 0
        smp = self._sampler(sampling)
        vocab = llm._model.vocab
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        lc.llama_perf_context_reset(llm.ctx)

        def tokens_out():
            llm.eval(tokens[prefix:])
            while True:
                tok = self._argmax() if greedy else smp.sample(llm._ctx, -1)
                yield tok
                llm.eval([tok])

        try:
            yield from respond(
                tokens_out(), t0=time.perf_counter(), n_prompt=len(tokens), cached=prefix, max_new=max_new,
                is_eog=lambda t: not sampling.ignore_eos and lc.llama_vocab_is_eog(vocab, t),
                decode=lambda t: decoder.decode(b"", final=True) if t is None else decoder.decode(self._piece_bytes(t)),
                proc=self.proc, counters=self._counters)
        finally:
            smp.close()

    def _counters(self) -> dict:
        p = self._lc.llama_perf_context(self.llm.ctx)
        return {"t_prompt_ms": p.t_p_eval_ms, "n_prompt": p.n_p_eval, "t_eval_ms": p.t_eval_ms, "n_eval": p.n_eval,
                "load_ms": p.t_load_ms}

    def close(self) -> None:
        self.llm.close()


def _check_gguf(path: Path) -> None:
    """Refuse files llama.cpp would choke on, with a clear line instead of a C error."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise RunnerError(f"{path}: cannot read ({e.strerror})") from None
    if magic != b"GGUF":
        raise RunnerError(f"{path}: not a GGUF file")
    from .gguf_info import read_gguf_info
    try:
        info = read_gguf_info(path)
    except (ValueError, OSError) as e:
        raise RunnerError(f"{path}: corrupt GGUF header ({e})") from None
    if not info.complete:
        raise RunnerError(f"{path}: truncated GGUF ({info.file_size} bytes; its tensors need more)")


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

def smoke_check(model: Path, threads: int | None = None, tokens: int = 8) -> dict:
    cmd = [sys.executable, "-m", "edgeqwen.runner", "smoke", str(model), str(threads or 0), str(tokens)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode < 0:
        sig = signal.Signals(-p.returncode).name
        if build_format(model, None) == "onnx":
            raise BuildError(f"onnxruntime crashed ({sig}) running {model}")
        raise BuildError(f"llama.cpp crashed ({sig}) running {model.name}; if this is an AMX CPU with gcc < 13.3, "
                         "reinstall llama-cpp-python with 'make setup'")
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise BuildError(f"smoke check failed for {model}: {last}")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    if result["tokens"] < 1:
        raise BuildError(f"smoke check: {model} generated no tokens")
    return result


def _smoke_main(model: str, threads: str, n: str) -> None:
    r = load_runner(model, threads=int(threads) or None, n_ctx=512)
    last = None
    text = ""
    for last in generate_text(r, "Say hello.", Sampling(max_tokens=int(n), temperature=0, ignore_eos=True)):
        text += last.text
    print(json.dumps({"tokens": last.generation_tokens, "text": text, "decode_tps": round(last.generation_tps, 2)}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["smoke"]:
        _smoke_main(*sys.argv[2:5])
