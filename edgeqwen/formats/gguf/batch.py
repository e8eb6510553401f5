"""Several conversations of one GGUF model at once (serve --parallel): continuous batching in one llama.cpp context.

llama-cpp-python's Llama object holds one sequence, so this is a second decode path beside the runner's own,
through llama.cpp's batch API. The context holds n_seq sequences of n_ctx cells each (llama.cpp splits a
non-unified KV cache evenly), so every conversation has the whole --ctx. A request takes a free sequence, the one
whose cached tokens share the longest prefix with its prompt (each sequence is a prompt cache, as a single
runner's context is). One thread owns the context: each step it puts the last sampled token of every decoding
sequence, then as much of waiting prompts as the batch holds, into one llama_batch, decodes it once, and samples
each sequence's next token from its own row of logits with its own sampler chain (a grammar included). Requests
join and leave between steps; each one's Responses come from runner.respond like every other backend's.
"""
from __future__ import annotations

import codecs
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ...errors import RunnerError
from ...runner import DEFAULT_CTX, ChatTemplated, Response, Sampling, check_prompt, respond, shared_prefix

_END = object()


@dataclass(eq=False)
class _Request:
    seq: int
    todo: list[int]                  # prompt tokens not yet evaluated
    evaluated: list[int]             # tokens whose KV this sequence holds
    sampling: Sampling
    max_new: int
    smp: object = None               # a sampler chain (None: greedy, straight off the logits)
    last: int | None = None          # sampled, not yet evaluated
    produced: int = 0
    trimmed: bool = False            # its sequence was cut back to the reused prefix (first step)
    out: queue.Queue = field(default_factory=queue.Queue)
    gone: threading.Event = field(default_factory=threading.Event)   # its consumer stopped reading
    ready: threading.Event = field(default_factory=threading.Event)  # its consumer waits for the next token


class BatchedRunner(ChatTemplated):
    """The runner protocol over n_seq sequences of one model; its base (a LlamaRunner, from open_base()) tokenizes
    and names pieces, its own small context unused. stream() may be called from n_seq threads at once.

    The model is loaded, and every step decoded, on this runner's own thread, and nothing else in the process
    should run llama.cpp: once a second thread has run its OpenMP work, libgomp counts more threads than cores and
    throttles their spinning, and a single conversation decoded at 0.67x (real 0.5B q4_k_m, 2-vCPU Xeon with AMX:
    22 against 33 tok/s) until the load moved here (serve's queue keeps its one-at-a-time models on one thread
    for the same reason)."""

    def __init__(self, open_base: Callable[[], object], n_seq: int, n_ctx: int | None):
        self.n_seq = n_seq
        self.cached: list[list[int]] = [[] for _ in range(n_seq)]
        self.active: list[_Request | None] = [None] * n_seq
        self.cv = threading.Condition()
        self.closing = False
        made: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._own, args=(open_base, n_ctx, made), name="edgeqwen-batch",
                                       daemon=True)
        self.thread.start()
        error = made.get()
        if error is not None:
            self.thread.join()
            raise error

    def _own(self, open_base, n_ctx, made: queue.Queue) -> None:
        """The runner's thread: load, make the context, then decode until closed."""
        from llama_cpp import _internals as internals
        try:
            base = self.base = open_base()
        except BaseException as e:   # noqa: B036  handed to the constructor's caller
            made.put(e)
            return
        try:
            train = base.llm._model.n_ctx_train()
            if n_ctx and n_ctx > train:
                raise RunnerError(f"--ctx {n_ctx} is more than this model's context length ({train})")
            self.n_ctx = n_ctx = n_ctx or min(DEFAULT_CTX, train)
            self._lc = base._lc
            for a in ("backend", "n_vocab", "regular_vocab", "chat_template", "eos_token", "load_s", "threads",
                      "lean", "path", "kv", "flash_attn", "spin", "mapped", "released", "hugepages", "gpu_layers",
                      "workers", "proc"):
                setattr(self, a, getattr(base, a))
            params = type(base.llm.context_params).from_buffer_copy(base.llm.context_params)
            params.n_ctx = self.n_seq * n_ctx
            params.n_seq_max = self.n_seq
            params.kv_unified = False     # one stream per sequence: n_ctx cells each, attention over its own
            params.n_batch = params.n_ubatch = max(512, self.n_seq)
            self.n_batch = params.n_batch
            try:
                self.ctx = internals.LlamaContext(model=base.llm._model, params=params, verbose=False)
            except ValueError:
                raise RunnerError(f"llama.cpp could not make a context of {self.n_seq} x {n_ctx} tokens "
                                  f"(--parallel {self.n_seq}, --ctx {n_ctx}): not enough memory") from None
            self.batch = internals.LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1, verbose=False)
        except BaseException as e:   # noqa: B036
            base.close()
            made.put(e)
            return
        made.put(None)
        try:
            self._loop()
        finally:
            self.batch.close()
            self.ctx.close()
            base.close()

    # --- the protocol, for the threads that serve requests ---------------------------------------------------

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return self.base.tokenize(text, special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.base.detokenize(tokens)

    def token_bytes(self, tok: int) -> bytes:
        return self.base.token_bytes(tok)

    def logits(self, tokens: list[int]) -> np.ndarray:
        raise RunnerError("a --parallel model does not score windows (eval loads a build of its own)")

    def draft_name(self) -> None:
        return None

    def stream(self, tokens: list[int], sampling: Sampling) -> Iterator[Response]:
        lc, vocab = self._lc, self.base.llm._model.vocab
        max_new = check_prompt(tokens, self.n_ctx, sampling)
        greedy = sampling.temperature <= 0 and not sampling.grammar
        t0 = time.perf_counter()
        with self.cv:
            free = [i for i, r in enumerate(self.active) if r is None]
            if not free:
                raise RunnerError(f"all {self.n_seq} sequences are busy")
            seq = max(free, key=lambda i: shared_prefix(self.cached[i], tokens) if self.cached[i] else -1)
            keep = shared_prefix(self.cached[seq], tokens) if self.cached[seq] else 0
            req = _Request(seq, list(tokens[keep:]), list(tokens[:keep]), sampling, max_new,
                           None if greedy else self.base._sampler(sampling))
            self.active[seq] = req
            self.cv.notify_all()
        row = {}

        def tokens_out():
            while True:
                req.ready.set()
                item = req.out.get()
                req.ready.clear()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                tok, row["row"] = item
                yield tok

        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            yield from respond(
                tokens_out(), t0=t0, n_prompt=len(tokens), cached=keep, max_new=max_new,
                is_eog=lambda t: not sampling.ignore_eos and lc.llama_vocab_is_eog(vocab, t),
                decode=lambda t: decoder.decode(b"", final=True) if t is None
                else decoder.decode(self.base._piece_bytes(t)),
                proc=self.proc, counters=lambda: {"parallel": self.n_seq}, top=sampling.logprobs or 0,
                row=None if sampling.logprobs is None else lambda: row["row"])
        finally:
            req.gone.set()
            with self.cv:
                self.cv.notify_all()

    def close(self) -> None:
        with self.cv:
            self.closing = True
            self.cv.notify_all()
        self.thread.join()   # the context and the model are freed on their own thread, as it ends

    # --- the thread that owns the context ---------------------------------------------------------------------

    def _release(self, r: _Request, item=_END) -> None:
        """r leaves: its sequence keeps its KV (and says which tokens it holds) for the next prompt to reuse."""
        self.active[r.seq] = None
        self.cached[r.seq] = r.evaluated
        if r.smp is not None:
            r.smp.close()
        r.out.put(item)

    def _fill(self, reqs: list[_Request]) -> tuple[int, list[tuple[_Request, int]]]:
        """The next batch: the last sampled token of every decoding sequence (one each), then waiting prompts in the
        room left, so a long prompt never stalls the answers already streaming. Returns its size and, for each
        request with logits in it, their index."""
        b = self.batch.batch
        n, outputs = 0, []
        work = []
        for r in reqs:
            if not r.todo and r.last is not None:
                work.append((r, [r.last]))
                r.last = None
                n += 1
        for r in reqs:
            if r.todo and n < self.n_batch:
                work.append((r, r.todo[:self.n_batch - n]))
                n, r.todo = n + len(work[-1][1]), r.todo[self.n_batch - n:]
        n = 0
        for r, toks in work:
            for k, t in enumerate(toks):
                b.token[n], b.pos[n], b.n_seq_id[n] = t, len(r.evaluated) + k, 1
                b.seq_id[n][0] = r.seq
                b.logits[n] = not r.todo and k == len(toks) - 1
                n += 1
            if not r.todo:
                outputs.append((r, n - 1))
            r.evaluated.extend(toks)
        return n, outputs

    CONSUMER_WAIT_S = 0.25

    def _await_consumers(self, reqs: list[_Request]) -> None:
        """Before the next step, let each decoding request's consumer take its last token (detokenize it, hand it
        to the server), as the one-at-a-time path does between steps, so that Python work does not take a core
        from llama.cpp's threads mid-step. A consumer slower than CONSUMER_WAIT_S does not hold the others back
        longer."""
        deadline = time.monotonic() + self.CONSUMER_WAIT_S
        for r in reqs:
            if r.last is None:
                continue
            while not (r.ready.is_set() and r.out.empty()) and not r.gone.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                if r.ready.is_set():   # waiting for the token just put: it wakes at once
                    time.sleep(0.0002)
                else:
                    r.ready.wait(min(left, 0.01))

    def _loop(self) -> None:
        lc, b = self._lc, self.batch.batch
        mem = lc.llama_get_memory(self.ctx.ctx)
        while True:
            with self.cv:
                while not self.closing and not any(self.active):
                    self.cv.wait()
                if self.closing:
                    for r in self.active:
                        if r is not None:
                            self._release(r, RunnerError("the server is stopping"))
                    return
                for r in self.active:
                    if r is not None and r.gone.is_set():
                        self._release(r)
                reqs = [r for r in self.active if r is not None]
            if not reqs:
                continue
            for r in reqs:
                if not r.trimmed:
                    lc.llama_memory_seq_rm(mem, r.seq, len(r.evaluated), -1)
                    r.trimmed = True
            self._await_consumers(reqs)
            n, outputs = self._fill(reqs)
            b.n_tokens = n
            rc = lc.llama_decode(self.ctx.ctx, b)
            if rc != 0:
                with self.cv:
                    for r in reqs:
                        lc.llama_memory_seq_rm(mem, r.seq, -1, -1)
                        r.evaluated = []
                        self._release(r, RunnerError(f"llama.cpp could not decode the batch (llama_decode {rc})"))
                continue
            with self.cv:
                for r, i in outputs:
                    if r.gone.is_set():
                        continue
                    logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(self.ctx.ctx, i), shape=(self.n_vocab,))
                    tok = int(logits.argmax()) if r.smp is None else r.smp.sample(self.ctx, i)
                    r.produced += 1
                    r.out.put((tok, logits.copy() if r.sampling.logprobs is not None else None))
                    eog = not r.sampling.ignore_eos and lc.llama_vocab_is_eog(self.base.llm._model.vocab, tok)
                    if eog or r.produced >= r.max_new:
                        self._release(r)
                    else:
                        r.last = tok

