"""One runner protocol for every backend: load a build, stream tokens with measurements.

chat, run and bench all consume `Runner.stream(...)`; none of them times anything itself.
Each yielded Response carries the new text plus the measurements so far (TTFT, prefill and
decode tok/s, peak RSS); the last one has finish_reason set and the backend's own counters.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import psutil

from .errors import RunnerError

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
    logprob: float | None = None       # the token's log-probability, when Sampling.logprobs asks for it
    top_logprobs: list[tuple[int, float]] | None = None   # the most likely tokens at this step, most likely first

    def stats(self) -> dict:
        d = asdict(self)
        for k in ("text", "token", "logprob", "top_logprobs"):
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
    grammar: str | None = None   # GBNF the answer must follow (structured output; formats whose row says so)
    logprobs: int | None = None  # each token's log-probability and this many alternatives (None: neither)


def logprobs_of(row: np.ndarray, tok: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """tok's log-probability under the model's own distribution at this step (the log-softmax of its logits,
    before temperature, top-p or a grammar: what eval scores), and the top most likely tokens, most likely first."""
    x = np.asarray(row, dtype=np.float64)
    m = x.max()
    lse = m + np.log(np.exp(x - m).sum())
    best = []
    if top > 0:
        idx = np.argpartition(-x, min(top, x.size - 1))[:top]
        best = [(int(i), float(x[i] - lse)) for i in idx[np.argsort(-x[idx], kind="stable")]]
    return float(x[tok] - lse), best


class Runner(Protocol):
    backend: str
    n_ctx: int
    load_s: float
    chat_template: str | None
    regular_vocab: int   # ids below it are ordinary text tokens (bench draws random prompts from them)

    def tokenize(self, text: str, special: bool = True) -> list[int]: ...
    def token_bytes(self, tok: int) -> bytes: ...   # the token's exact bytes (a piece of a character, maybe)
    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> str: ...
    def stream(self, tokens: list[int], sampling: Sampling) -> Iterator[Response]: ...
    def logits(self, tokens: list[int]) -> np.ndarray: ...   # [len(tokens), vocab], from an empty context
    def close(self) -> None: ...


def side_json(path) -> dict:
    """An optional side file of a build folder: unreadable or not an object counts as absent."""
    from .errors import SourceError
    from .schemas import read_json
    try:
        data = read_json(path, path.name)
    except SourceError:
        return {}
    return data if isinstance(data, dict) else {}


def folder_chat_template(folder, tok_cfg: dict) -> str | None:
    """chat_template.jinja (newer checkpoints) or tokenizer_config.json's chat_template."""
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    tpl = tok_cfg.get("chat_template")
    return tpl if isinstance(tpl, str) else None


def regular_vocab_of(folder, n_model: int) -> int:
    """Ordinary text tokens of a folder with tokenizer.json: the BPE vocabulary's ids (added and special tokens
    come after them), at most the model's vocabulary."""
    n_bpe = len(side_json(folder / "tokenizer.json").get("model", {}).get("vocab") or {})
    return min(x for x in (n_model, n_bpe) if x) if (n_model or n_bpe) else 1


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


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: character -> the byte it spells (printable bytes stand for
    themselves, the others are shifted to 256 and up in order)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


class ChatTemplated:
    """apply_chat_template for every runner: its chat_template rendered with its eos_token; `where` (the build's
    file or folder) names it when it has none."""
    chat_template: str | None = None
    eos_token: str = ""
    where: object = "this build"

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """tools (OpenAI function definitions) go to a template that has a tools section (serve/tools.py decides)."""
        if not self.chat_template:
            raise RunnerError(f"{self.where} has no chat template; use --raw")
        extra = {"tools": tools} if tools else {}
        return render_chat(self.chat_template, messages, eos_token=self.eos_token, bos_token="", **extra)


class FolderRunner(ChatTemplated):
    """What the runners of folder formats (ONNX, MLX) share: the tokenizer files beside the model, read once the
    backend's tokenizer is loaded, and a cache that an interrupted step leaves in an unknown state."""
    folder = None

    @property
    def where(self):
        return self.folder

    def _read_folder(self, vocab_size: int) -> None:
        """The end of every folder runner's __init__, after self.folder and self.tokenizer are set."""
        import os
        self.eos_ids = {int(t) for t in self.tokenizer.eos_token_ids}
        # ordinary text tokens: the BPE vocabulary's ids (added and special tokens come after them)
        self.regular_vocab = regular_vocab_of(self.folder, vocab_size)
        tok_cfg = side_json(self.folder / "tokenizer_config.json")
        self.chat_template = folder_chat_template(self.folder, tok_cfg)
        eos = tok_cfg.get("eos_token")
        self.eos_token = eos.get("content") if isinstance(eos, dict) else (eos or "")
        self.proc = psutil.Process(os.getpid())

    _bytes: dict[int, bytes] | None = None

    def token_bytes(self, tok: int) -> bytes:
        """The token's exact bytes, from tokenizer.json (read on first use): a byte-level BPE vocabulary spells each
        byte with one printable character (GPT-2's alphabet), which neither backend's tokenizer gives back for a
        token that is part of a character; added tokens are their text."""
        if self._bytes is None:
            tok_json = side_json(self.folder / "tokenizer.json")
            vocab = tok_json.get("model", {}).get("vocab") or {}
            alphabet = _byte_alphabet()
            out = {}
            for piece, i in vocab.items() if isinstance(vocab, dict) else ():
                if isinstance(piece, str) and isinstance(i, int):
                    out[i] = bytes(alphabet[c] for c in piece) if all(c in alphabet for c in piece) else piece.encode()
            for a in tok_json.get("added_tokens") or []:
                if isinstance(a, dict) and isinstance(a.get("id"), int) and isinstance(a.get("content"), str):
                    out[a["id"]] = a["content"].encode()
            self._bytes = out
        return self._bytes.get(tok, b"")

    def refuse_grammar(self, sampling: Sampling) -> None:
        """Structured output is llama.cpp's grammar sampler: never silently generate free text instead."""
        if sampling.grammar:
            raise RunnerError(f"{self.backend} cannot constrain an answer to a grammar (structured output needs a "
                              "build whose format can)")

    @staticmethod
    def forget_on_error(tokens: Iterator[int], forget: Callable[[], None]) -> Iterator[int]:
        """tokens, calling forget() if a step fails or is interrupted: its cache must never be reused."""
        try:
            yield from tokens
        except (KeyboardInterrupt, Exception):
            forget()
            raise


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
            counters: Callable[[], dict] = dict, row: Callable[[], np.ndarray] | None = None,
            top: int = 0) -> Iterator[Response]:
    """Time the tokens a backend produces, stop at EOS or max_new, and yield Responses with the measurements.

    tokens_out evaluates the prompt before its first token; decode(None) flushes held-back bytes;
    counters() gives the backend's own figures once the stream finishes. row(), when given, is the logits the
    token just produced was chosen from (read before tokens_out resumes): each Response then carries its
    log-probability and the top alternatives.
    """
    peak = proc.memory_info().rss
    n_gen, ttft, t_first, now = 0, 0.0, 0.0, t0

    def response(text, tok, finish, scored=(None, None)):
        dec = (n_gen - 1) / (now - t_first) if n_gen > 1 and now > t_first else 0.0
        return Response(text, tok, n_prompt, (n_prompt - cached) / ttft if ttft else 0.0, n_gen, dec, ttft, peak,
                        finish, counters() if finish else {}, cached, *scored)

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
            scored = logprobs_of(row(), tok, top) if row is not None else (None, None)
            text = ("" if eog else decode(tok)) + (decode(None) if finish else "")
            yield response(text, tok, finish, scored)
            if finish:
                return
    except KeyboardInterrupt:
        now = time.perf_counter()
        yield response(decode(None), None, "interrupted")


_CONTROL = {c: "\ufffd" for c in range(32) if chr(c) not in "\n\t"} | {127: "\ufffd"}


def display_text(text: str) -> str:
    """Text safe for a terminal: control characters (NUL, ESC sequences from a model) become U+FFFD, as
    invalid UTF-8 already does in the backends' decoders.

    The one rule for a model's text: only what is written for a terminal (`run`'s plain stdout, `chat`) goes
    through here. Machine outputs (`run --json`, the HTTP API, bench and eval rows) carry the exact text,
    control characters included, and JSON escapes them.
    """
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
