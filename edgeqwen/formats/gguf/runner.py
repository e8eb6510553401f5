"""llama.cpp through llama-cpp-python, behind the runner protocol (see runner.py).

libllama's own log lines go to the "edgeqwen.llama" logger at DEBUG (shown with `edgeqwen -v`),
not to the terminal: a quantize pass alone prints a line per tensor.
"""
from __future__ import annotations

import codecs
import collections
import contextlib
import ctypes
import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil

from ...errors import RunnerError
from ...process import physical_cores
from ...runner import DEFAULT_CTX, ChatTemplated, Response, Sampling, check_prompt, respond, shared_prefix
from .speculate import Speculator
from ...text import clean

_log = logging.getLogger("edgeqwen.llama")
GGML_LOG_LEVEL_ERROR = 4
_callback = None   # kept alive: libllama holds the pointer
_errors: collections.deque[str] = collections.deque(maxlen=8)
_watchers: list = []   # fed libllama's log lines while a model loads (under _params_lock): pagecache, hugepages


def last_llama_error() -> str | None:
    """The last error line libllama logged (e.g. why a quantize failed), for our one-line messages."""
    return _errors[-1] if _errors else None


def route_llama_logs() -> None:
    """Send libllama's (and ggml's) log lines to logging instead of stderr; idempotent."""
    global _callback
    if _callback is not None:
        return
    import llama_cpp

    @llama_cpp.llama_log_callback
    def cb(level, text, _user):
        msg = text.decode("utf-8", "replace").rstrip("\n")
        if msg and level == GGML_LOG_LEVEL_ERROR:
            _errors.append(msg.split(": ", 1)[-1])
        for w in _watchers:
            w.line(msg)
        if msg:
            _log.log(logging.WARNING if level == GGML_LOG_LEVEL_ERROR else logging.DEBUG, msg)
    _callback = cb
    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))


_params_lock = threading.Lock()


@contextlib.contextmanager
def _model_params(**fields):
    """llama_cpp.Llama fills llama_model_params itself and forwards no use_extra_bufts (the repacked-weights
    buffers, e.g. Q4_0 -> 8x8 interleaved, or the AMX copy); set it on the defaults it starts from."""
    import llama_cpp.llama_cpp as lib
    orig = lib.llama_model_default_params

    def patched():
        p = orig()
        for k, v in fields.items():
            setattr(p, k, v)
        return p
    with _params_lock:
        lib.llama_model_default_params = patched
        try:
            yield
        finally:
            lib.llama_model_default_params = orig


@contextlib.contextmanager
def _watching(path: Path, info, mapped: bool):
    """While libllama loads `path` (inside _model_params' lock): if it maps the file, drop each repacked original
    once copied (pagecache.py); if it reads the file, give the buffers it reads into huge pages (hugepages.py).
    Yields (releaser, hugepager), either None."""
    from ..hugepages import hugepager
    from .pagecache import releaser_for
    watchers = (releaser_for(path, info), None) if mapped else (None, hugepager())
    _watchers[:] = [w for w in watchers if w is not None]
    try:
        yield watchers
    finally:
        _watchers.clear()
        if watchers[0] is not None:
            watchers[0].finish()


# The KV cache types --kv offers, in llama.cpp's names: q8_0 halves the cache for a small quality cost (eval).
KV_TYPES = {"f16": None, "q8_0": "GGML_TYPE_Q8_0"}


def crash_hint(sig: str, model: Path) -> str:
    """What a crash of llama.cpp running model most likely means (the formats table names this)."""
    if sig == "SIGABRT":
        return (f"llama.cpp crashed (SIGABRT) on {model}: an assertion failed on something in the file, "
                "which is malformed")
    return (f"llama.cpp crashed ({sig}) running {model.name}; if this is an AMX CPU with gcc < 13.3, "
            "reinstall llama-cpp-python with 'make setup'")


def wait_policy(spin: bool) -> None:
    """How llama.cpp's CPU threads wait for each other: spinning (libgomp's default, ~300k rounds before sleeping)
    or sleeping at once (OMP_WAIT_POLICY=passive).

    They meet at a barrier after every operation of the graph, hundreds a token. Alone on the machine spinning is
    fastest; beside another busy process a spinning thread holds the core the thread it waits for needs (decode
    fell from 11 to under 2 tok/s here). This llama-cpp-python builds ggml with OpenMP, whose wait policy is read
    once, when libgomp loads: it must be set before llama_cpp is first imported in this process (ggml's own
    `poll` setting only applies to builds without OpenMP).
    """
    if spin or os.environ.get("OMP_WAIT_POLICY", "").lower() == "passive":
        return   # spinning is libgomp's default (a user's own OMP_WAIT_POLICY is left as it is)
    if "llama_cpp" in sys.modules:
        logging.getLogger("edgeqwen").warning("llama.cpp is already loaded in this process: its threads keep "
                                              "spinning while they wait")
        return
    os.environ["OMP_WAIT_POLICY"] = "passive"


def has_openmp() -> bool:
    """Whether this llama.cpp's CPU backend runs its threads with OpenMP (then OMP_WAIT_POLICY applies)."""
    import llama_cpp
    return "OPENMP = 1" in llama_cpp.llama_print_system_info().decode("utf-8", "replace")


class LlamaRunner(ChatTemplated):
    """llama.cpp through llama-cpp-python."""

    backend = "llama.cpp"

    def __init__(self, model: Path, threads: int | None = None, n_ctx: int | None = None,
                 manifest: dict | None = None, logits: bool = False, lean: bool = False, n_batch: int = 512,
                 workers: list | None = None, split: list[float] | None = None, kv: str = "f16",
                 flash_attn: bool = True, spin: bool = True):
        # spin: recorded; how the threads wait is set before llama_cpp loads (load_runner -> wait_policy)
        import llama_cpp
        route_llama_logs()
        self._lc = llama_cpp
        self.path = Path(model)
        if not self.path.exists():
            raise RunnerError(f"{self.path}: no such model file")
        info = _check_gguf(self.path)
        if not (manifest and manifest.get("sha256")):   # not a build whose hash was just checked: untrusted
            _probe(self.path)
        self.threads = threads or physical_cores()
        # Metal on Apple Silicon when this llama-cpp-python has it; CPU everywhere else.
        gpu = -1 if (sys.platform == "darwin" and platform.machine() == "arm64"
                     and llama_cpp.llama_supports_gpu_offload()) else 0
        if workers:   # the workers are llama.cpp "GPU" devices: see rpc.layer_params
            from . import rpc
            rpc.register(workers)
            extra_split = rpc.layer_params(int(info.get("{arch}.block_count")), len(workers), split)
            gpu = extra_split.pop("n_gpu_layers")
        else:
            extra_split = {}
        train_ctx = int(info.get("{arch}.context_length"))
        if n_ctx is None:  # the default, capped by what the model was trained for
            n_ctx = min(DEFAULT_CTX, train_ctx)
        elif n_ctx > train_ctx:
            raise RunnerError(f"--ctx {n_ctx} is more than this model's context length ({train_ctx})")
        extra = dict(extra_split)
        if kv not in KV_TYPES:
            raise RunnerError(f"--kv {kv}: choose {', '.join(KV_TYPES)}")
        if KV_TYPES[kv] is not None:   # K and V quantized alike (a quantized V needs flash attention: on here)
            extra.update(type_k=getattr(llama_cpp, KV_TYPES[kv]), type_v=getattr(llama_cpp, KV_TYPES[kv]))
        if kv != "f16" and not flash_attn:
            raise RunnerError(f"--kv {kv} needs flash attention (llama.cpp quantizes the V cache only with it)")
        self.kv, self.flash_attn, self.spin = kv, flash_attn, spin
        if logits:  # eval: a whole window in one batch, logits at every position
            n_batch = n_ctx
            extra.update(n_ubatch=n_ctx, logits_all=True)
        else:
            # llama.cpp rounds the context up to a multiple of 256, but llama-cpp-python sizes its token
            # buffer by the number asked for: ask for the rounded size so the two agree.
            n_ctx = -(-n_ctx // 256) * 256
        self.lean = lean
        # A normal load reads the weights into memory libllama allocates, which hugepages.py gives 2 MiB pages
        # (tok/s +4-6% on the real 0.5B q8_0 and q4_0, README); a lean load, or one where huge pages cannot be
        # had, maps the file: one copy the kernel may evict (the untied embedding table is read a row a token).
        from ..hugepages import available
        self.mapped = lean or not available()
        t0 = time.perf_counter()
        try:
            # flash_attn: llama.cpp's own tools default to "auto", which is on for the CPU; llama-cpp-python's
            # default (off) made prefill 0.77-0.84x llama-bench (bench/PARITY.md)
            with _model_params(use_extra_bufts=not lean), _watching(self.path, info, self.mapped) as (rel, huge):
                self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, n_batch=n_batch,
                                           n_threads=self.threads, n_threads_batch=self.threads,
                                           use_mmap=self.mapped, n_gpu_layers=gpu, verbose=False,
                                           flash_attn=flash_attn,
                                           **extra)
        except (ValueError, RuntimeError) as e:
            raise RunnerError(f"{self.path}: llama.cpp cannot load this model; the file is corrupt, truncated or of an "
                              f"unsupported architecture ({e})") from None
        except Exception as e:  # noqa: BLE001  e.g. llama-cpp-python compiling a broken chat template (jinja2)
            what = "its chat template is broken" if type(e).__module__.startswith("jinja2") else "it is malformed"
            raise RunnerError(f"{self.path}: cannot load: {what} ({type(e).__name__}: {e})") from None
        self.load_s = time.perf_counter() - t0
        self.released = rel.released if rel else 0   # bytes of repacked originals given back (pagecache.py)
        self.hugepages = huge.advised if huge else 0   # bytes of loaded weights asked to be in huge pages
        self.n_ctx = min(self.llm.n_ctx(), len(self.llm.input_ids))
        self.n_vocab = self.llm.n_vocab()
        self.gpu_layers = gpu
        self.workers = [str(w) for w in workers or []]
        self._pieces: dict[tuple[int, bool], bytes] = {}
        self.regular_vocab = self._regular_vocab()
        meta = self.llm.metadata
        self.chat_template = meta.get("tokenizer.chat_template")
        self.eos_token = self._piece(self.llm.token_eos())
        self.proc = psutil.Process(os.getpid())

    def _regular_vocab(self) -> int:
        """Ids below this are ordinary text tokens: control, user-defined and padding ids sit at the top."""
        lc, vocab = self._lc, self.llm._model.vocab
        n = self.n_vocab
        special = lc.LLAMA_TOKEN_ATTR_CONTROL | lc.LLAMA_TOKEN_ATTR_USER_DEFINED | lc.LLAMA_TOKEN_ATTR_UNUSED
        while n > 1 and (lc.llama_vocab_get_attr(vocab, n - 1) & special or not self._piece_bytes(n - 1)):
            n -= 1
        return n

    def token_bytes(self, tok: int) -> bytes:
        return self._piece_bytes(tok, special=True)

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

    @property
    def where(self) -> Path:
        return self.path

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return self.llm.tokenize(clean(text).encode("utf-8"), add_bos=False, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", "replace")

    def _last_logits(self) -> np.ndarray:
        """The logits of the last evaluated position (a view: valid until the next eval)."""
        return np.ctypeslib.as_array(self._lc.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))

    def _argmax(self) -> int:
        # Greedy straight off the logits: libllama's sampler copies all ~152k candidates per token,
        # which costs several percent of decode speed on small models.
        return int(self._last_logits().argmax())

    def _unsafe_for_grammar(self) -> list[int]:
        """Tokens whose text is not whole UTF-8 or holds a NUL byte (found once per runner; special tokens, whose
        text is empty here, stay: the grammar ends an answer with one)."""
        if self._unsafe is None:
            def bad(piece: bytes) -> bool:
                try:
                    piece.decode("utf-8")
                except UnicodeDecodeError:
                    return True
                return b"\x00" in piece
            self._unsafe = [i for i in range(self.n_vocab) if bad(self._piece_bytes(i, False))]
        return self._unsafe

    _unsafe: list[int] | None = None

    def _sampler(self, s: Sampling):
        from llama_cpp import _internals as internals
        smp = internals.LlamaSampler()
        if s.grammar:   # first in the chain: the other samplers see only what the grammar allows
            from llama_cpp.llama_grammar import LlamaGrammar
            # llama.cpp's grammar can pass a token whose bytes are not whole UTF-8 (a NUL inside, continuation
            # bytes without a lead: merged byte-level tokens) and then throw when it accepts it, which ends the
            # process. Such tokens are never candidates of a constrained answer: it is spelled in whole characters.
            smp.add_logit_bias(self.n_vocab, {t: float("-inf") for t in self._unsafe_for_grammar()})
            smp.add_grammar(self.llm._model, LlamaGrammar.from_string(s.grammar, verbose=False))
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
        greedy = sampling.temperature <= 0 and not sampling.grammar   # a grammar needs the sampler chain
        smp = self._sampler(sampling)
        vocab = llm._model.vocab
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        lc.llama_perf_context_reset(llm.ctx)
        # a draft's tokens are verified in batches: the logits of each are not where a plain step leaves them
        self._drafting = self.speculator is not None and not sampling.grammar and sampling.logprobs is None

        def tokens_out():
            llm.eval(tokens[prefix:])
            while True:
                tok = self._argmax() if greedy else smp.sample(llm._ctx, -1)
                yield tok
                llm.eval([tok])

        out = tokens_out() if not self._drafting else _decode_errors(self.speculator.tokens(tokens, prefix, sampling,
                                                                                            smp))
        try:
            yield from respond(
                out, t0=time.perf_counter(), n_prompt=len(tokens), cached=prefix, max_new=max_new,
                is_eog=lambda t: not sampling.ignore_eos and lc.llama_vocab_is_eog(vocab, t),
                decode=lambda t: decoder.decode(b"", final=True) if t is None else decoder.decode(self._piece_bytes(t)),
                proc=self.proc, counters=self._counters, top=sampling.logprobs or 0,
                row=None if sampling.logprobs is None else self._last_logits)
        finally:
            smp.close()

    # --- speculative decoding (speculate.py) ---------------------------------------------------------------

    speculator: Speculator | None = None   # attach_draft
    _drafting = False                      # the answer being made is speculative (its counters are in the answer)

    def attach_draft(self, draft: LlamaRunner | str, draft_max: int = 8) -> None:
        """Draft with a smaller model of the same tokenizer, or "lookup" (n-grams already in the context)."""
        if isinstance(draft, LlamaRunner):
            try:
                check_draft(self, draft)
            except BaseException:
                draft.close()
                raise
        self.speculator = Speculator(self, draft, draft_max)

    def _counters(self) -> dict:
        p = self._lc.llama_perf_context(self.llm.ctx)
        out = {"t_prompt_ms": p.t_p_eval_ms, "n_prompt": p.n_p_eval, "t_eval_ms": p.t_eval_ms, "n_eval": p.n_eval,
               "load_ms": p.t_load_ms}
        if self._drafting:
            out["speculative"] = self.speculator.counters()
        return out

    def draft_name(self) -> str | None:
        return self.speculator.name if self.speculator else None

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Next-token logits at every position of tokens, from an empty context (needs logits=True)."""
        self.llm.reset()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)

    def close(self) -> None:
        if self.speculator:
            self.speculator.close()
        self.llm.close()


def _decode_errors(tokens: Iterator[int]) -> Iterator[int]:
    """llama-cpp-python raises RuntimeError("llama_decode returned N") on a failed batch: one RunnerError."""
    try:
        yield from tokens
    except RuntimeError as e:
        raise RunnerError(f"llama.cpp failed while decoding a speculative batch ({e})") from None


def check_draft(target: LlamaRunner, draft: LlamaRunner) -> None:
    """A draft must speak the target's tokenizer, token for token, and be the smaller model."""
    if draft.path.stat().st_size >= target.path.stat().st_size:
        raise RunnerError(f"the draft {draft.path.name} is not smaller than the target {target.path.name}: "
                          "drafting with it cannot be faster")
    lc = target._lc
    n = draft.n_vocab
    if n > target.n_vocab:
        raise RunnerError(f"the draft's vocabulary ({n} tokens) is larger than the target's ({target.n_vocab})")
    if draft.llm.token_eos() != target.llm.token_eos():
        raise RunnerError("the draft's end-of-text token differs from the target's: not the same tokenizer")
    tv, dv = target.llm._model.vocab, draft.llm._model.vocab
    for i in range(n):
        if (draft._piece_bytes(i, True) != target._piece_bytes(i, True)
                or lc.llama_vocab_get_attr(dv, i) != lc.llama_vocab_get_attr(tv, i)):
            raise RunnerError(f"the draft's tokenizer differs from the target's at token {i} "
                              f"({draft._piece(i)!r} vs {target._piece(i)!r}): a draft must share it")


def _check_gguf(path: Path):
    """Refuse files llama.cpp would choke on, with a clear line instead of a C error."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise RunnerError(f"{path}: cannot read ({e.strerror})") from None
    if magic != b"GGUF":
        raise RunnerError(f"{path}: not a GGUF file")
    from .info import read_gguf_info
    try:
        info = read_gguf_info(path)
    except (ValueError, OSError) as e:
        raise RunnerError(f"{path}: corrupt GGUF header ({e})") from None
    if not info.complete:
        raise RunnerError(f"{path}: truncated GGUF ({info.file_size} bytes; its tensors need more)")
    problem = _preflight(info)
    if problem:
        raise RunnerError(f"{path}: {problem}; llama.cpp would abort on it")
    return info


def _probe(path: Path) -> None:
    """Load an untrusted file in a child process first: what llama.cpp still aborts on (a GGML_ASSERT on some
    metadata, duplicate token strings) then kills the child, not us, and becomes one line. Passing files are
    remembered by path, size and mtime."""
    from ..smoke import IN_CHILD, smoke_check
    if os.environ.get(IN_CHILD):
        return
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if key in _probed:
        return
    from ...errors import BuildError
    try:
        smoke_check(path, threads=1, tokens=1, timeout=600)
    except BuildError as e:
        raise RunnerError(str(e).replace("smoke check failed for", "cannot load")) from None
    _probed.add(key)


_probed: set[str] = set()


def _preflight(info) -> str | None:
    """The metadata llama.cpp asserts on (a GGML_ASSERT kills the process with no message), checked first."""
    import math

    def num(key):
        v = info.get(key)
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    layers, heads, kv = num("{arch}.block_count"), num("{arch}.attention.head_count"), \
        num("{arch}.attention.head_count_kv")
    ctx, eps = num("{arch}.context_length"), num("{arch}.attention.layer_norm_rms_epsilon")
    if layers is None or not 1 <= layers <= 1024:
        return f"block_count {info.get('{arch}.block_count')!r} is not a layer count"
    if layers != 1 + max((int(t.name.split(".")[1]) for t in info.tensors if t.name.startswith("blk.")
                          and t.name.split(".")[1].isdigit()), default=-1):
        return f"block_count {layers} does not match the layers its tensors hold"
    if heads is None or not 1 <= heads <= 4096 or kv is None or not 1 <= kv <= heads or heads % kv:
        return f"attention head counts {heads!r}/{kv!r} are inconsistent"
    if ctx is None or not 1 <= ctx <= 1 << 24:
        return f"context_length {info.get('{arch}.context_length')!r} is out of range"
    if eps is not None and not (math.isfinite(eps) and 0 < eps < 1):
        return f"layer-norm epsilon {eps!r} is not a small positive number"
    return None
