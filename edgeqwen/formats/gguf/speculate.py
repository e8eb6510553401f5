"""Speculative decoding for GGUF targets: where drafts come from, how a target accepts them, how long the next draft
should be (the arithmetic, backend-free), and the Speculator that drives llama.cpp's verify pass and rollback.

A draft (a small model of the same tokenizer, or n-grams already in the context: prompt lookup) proposes k tokens;
the target scores all of them in one batched pass, which on a CPU costs little more than one token because the
weights stream through once. Greedy: a draft token is kept while it is the target's own argmax, so the output is
the target's, token for token. Sampling: the standard rejection rule (Leviathan et al. 2023, Chen et al. 2023),
so every token is distributed as the target alone would sample it; `warp` applies the same top-k, top-p, min-p
and temperature as llama.cpp's sampler chain, in that order, so both paths sample one distribution.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ...runner import shared_prefix


def lookup_draft(seq: list[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of seq's longest matching suffix
    (max_ngram down to min_ngram tokens), at most k."""
    n = len(seq)
    if k <= 0 or n < 2:
        return []
    arr = np.asarray(seq, dtype=np.int64)
    for g in range(min(max_ngram, n - 1), min_ngram - 1, -1):
        tail = arr[n - g:]
        # every start of an earlier copy of tail, whose continuation lies inside seq
        starts = np.flatnonzero(arr[:n - g] == tail[0])
        for s in starts[::-1]:
            if s + g < n and np.array_equal(arr[s:s + g], tail):
                return arr[s + g:s + g + k].tolist()
    return []


def warp(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Sampling probabilities as llama.cpp's chain top_k -> top_p -> min_p -> temp -> dist gives them."""
    x = np.asarray(logits, dtype=np.float64)
    n = x.shape[0]
    if 0 < top_k < n:   # the k largest, best first (argpartition: the whole vocabulary is never sorted)
        idx = np.argpartition(-x, top_k - 1)[:top_k]
    else:
        idx = np.arange(n)
    idx = idx[np.argsort(-x[idx], kind="stable")]
    v = x[idx]
    if top_p < 1.0:
        p = np.exp(v - v[0])
        cum = np.cumsum(p / p.sum())
        keep = int(np.searchsorted(cum, top_p)) + 1   # through the token that reaches top_p
        idx, v = idx[:keep], v[:keep]
    if min_p > 0.0:
        m = np.exp(v - v[0]) >= min_p   # p_i / p_max >= min_p
        idx, v = idx[m], v[m]
    e = np.exp((v - v[0]) / temperature)
    out = np.zeros(n)
    out[idx] = e / e.sum()
    return out


def accept_sampled(p: np.ndarray, q: np.ndarray | None, tok: int, rng: np.random.Generator) -> int | None:
    """One draft token against the target: None when accepted, else the token to emit instead.

    p: the target's probabilities at this position; q: the draft's (None: a deterministic draft, prompt lookup,
    whose q is all on tok). Accept with probability min(1, p/q); on rejection sample from max(0, p - q), renormed."""
    qt = 1.0 if q is None else float(q[tok])
    if qt > 0 and rng.random() * qt < p[tok]:
        return None
    resid = p.copy()
    if q is None:
        resid[tok] = 0.0
    else:
        resid = np.maximum(resid - q, 0.0)
    s = resid.sum()
    if s <= 0:   # p == q exactly (or p[tok] == 1): nothing to correct, any draw of p is right
        resid, s = p, p.sum()
    return int(rng.choice(resid.shape[0], p=resid / s))


def sample(p: np.ndarray, rng: np.random.Generator) -> int:
    return int(rng.choice(p.shape[0], p=p / p.sum()))


@dataclass
class DraftLength:
    """How many tokens to draft next, from measured speed rather than assumed: a few plain steps first to know what
    plain decoding does here (and again every `refresh` tokens), then drafts that grow while they are accepted and
    shrink after a rejection; when speculative rounds run slower than plain decoding, plain decoding for `backoff`
    tokens (twice as long each time it happens again), then one more try. On a machine where the draft costs
    more than it saves, output tokens are mostly plain steps: the cost of trying stays a few percent.

    One controller lives as long as its runner: a chat's or a server's next answer goes on where the last one
    left off (a draft that did not pay is not tried again at every answer); only the counters are per answer."""
    k_max: int = 8
    k: int = 4
    refresh: int = 96            # tokens between fresh plain measurements while speculating
    backoff: int = 32            # plain tokens before speculation is tried again
    plain_left: int = 3          # plain steps still to take: first, the ones that measure plain decoding
    since_plain: int = 0
    spec_rounds: int = 0         # rounds since speculation was (re)started
    spec_rate: float | None = None    # tokens/s over speculative rounds (moving average)
    plain_rate: float | None = None   # tokens/s of plain decoding (moving average)
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    judge_after: int = 3         # speculative rounds measured before they are compared with plain decoding
    _t: float = field(default=0.0, repr=False)

    def new_answer(self) -> None:
        self.drafted = self.accepted = self.rounds = 0

    def next_k(self) -> int:
        return 0 if self.plain_left > 0 else self.k

    def start(self) -> None:
        self._t = time.perf_counter()

    def done(self, drafted: int, accepted: int, emitted: int) -> None:
        rate = emitted / max(time.perf_counter() - self._t, 1e-9)
        if drafted == 0:   # a plain step: measured, and counted against a pause or a probe
            self.plain_rate = rate if self.plain_rate is None else 0.7 * self.plain_rate + 0.3 * rate
            if self.plain_left > 0:
                self.plain_left -= 1
                if self.plain_left == 0:
                    self.spec_rounds, self.since_plain = 0, 0
            return
        self.rounds += 1
        self.spec_rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.since_plain += emitted
        self.spec_rate = rate if self.spec_rounds == 1 or self.spec_rate is None else \
            0.7 * self.spec_rate + 0.3 * rate
        self.k = min(self.k + 2, self.k_max) if accepted == drafted else max(1, accepted + 1 if accepted else
                                                                               self.k - 1)
        if self.spec_rounds >= self.judge_after and self.plain_rate is not None and self.spec_rate < self.plain_rate:
            self.plain_left = self.backoff          # drafting does not pay here: plain for a while
            self.backoff = min(2 * self.backoff, 512)
            self.k = max(1, self.k // 2)
        elif self.since_plain >= self.refresh:
            self.plain_left = 2                     # keep the plain figure current (context grows, load changes)
            if self.spec_rounds >= self.judge_after:
                self.backoff = 32

    def counters(self) -> dict:
        return {"drafted": self.drafted, "accepted": self.accepted, "rounds": self.rounds,
                "acceptance": self.accepted / self.drafted if self.drafted else 0.0}


class Speculator:
    """Speculative decoding for one GGUF target: a draft model of the same tokenizer, or "lookup" (n-grams already in
    the context), proposes; the target verifies in one batched pass and its KV cache is rolled back past a rejection.
    The output is the target's (greedy: token for token; sampling: its distribution, by the rejection rule).

    The target is the runner's loaded llama.cpp model (duck-typed: llm, _lc, _argmax, n_vocab, n_ctx); the draft is
    "lookup" or another runner, checked by the target's runner before it gets here. One DraftLength controller lives
    as long as the speculator: what drafting is worth here carries over answers."""

    def __init__(self, target, draft, draft_max: int = 8):
        self.target, self.draft, self.draft_max = target, draft, draft_max
        self.length = DraftLength(k_max=draft_max, k=min(4, draft_max))
        self.rng = np.random.default_rng()
        self.draft_lost = False   # the draft cannot follow this answer any more (an id past its vocabulary)

    @property
    def name(self) -> str:
        return "lookup" if self.draft == "lookup" else self.draft.path.name

    def counters(self) -> dict:
        return dict(self.length.counters(), draft=self.name)

    def close(self) -> None:
        if self.draft != "lookup":
            self.draft.close()

    def _verify(self, toks: list[int]) -> np.ndarray:
        """The target evaluates toks after its cached tokens in one batch, with logits at every position; a view
        valid until its next decode."""
        t = self.target
        llm = t.llm
        n_past = llm.n_tokens
        llm._ctx.kv_cache_seq_rm(-1, n_past, -1)
        llm._batch.set_batch(batch=toks, n_past=n_past, logits_all=True)
        llm._ctx.decode(llm._batch)
        llm.input_ids[n_past:n_past + len(toks)] = toks
        llm.n_tokens += len(toks)
        return np.ctypeslib.as_array(t._lc.llama_get_logits(llm.ctx), shape=(len(toks), t.n_vocab))

    def _propose(self, seq: list[int], k: int, warp_args) -> tuple[list[int], list | None]:
        """k draft tokens after seq, and the draft's probabilities for each when sampling (None: greedy or lookup)."""
        if self.draft == "lookup":
            return lookup_draft(seq, k), None
        d = self.draft
        dl = d.llm
        # the draft's cache: keep what still agrees with seq (rolls back a rejected draft), evaluate the rest
        dl.n_tokens = shared_prefix(dl.input_ids[: dl.n_tokens].tolist(), seq)
        todo = seq[dl.n_tokens:]
        if max(todo) >= d.n_vocab:   # an id past the draft's vocabulary (a padded row): it cannot follow any more
            self.draft_lost = True
            return [], None
        dl.eval(todo)
        drafts, qs = [], [] if warp_args else None
        for j in range(k):
            if warp_args is None:
                tok = d._argmax()
            else:
                row = np.ctypeslib.as_array(self.target._lc.llama_get_logits_ith(dl.ctx, -1), shape=(d.n_vocab,))
                q = np.zeros(self.target.n_vocab)
                q[:d.n_vocab] = warp(row, *warp_args)
                tok = sample(q, self.rng)
                qs.append(q)
            drafts.append(tok)
            if j < k - 1:
                dl.eval([tok])
        return drafts, qs

    def tokens(self, tokens: list[int], prefix: int, sampling, smp) -> Iterator[int]:
        """The answer's tokens after the prompt (tokens[:prefix] already in the target's cache); smp is the target's
        llama.cpp sampler for the plain steps of a sampled answer."""
        t = self.target
        llm = t.llm
        greedy = sampling.temperature <= 0
        warp_args = None if greedy else (sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p)
        self.rng = np.random.default_rng(sampling.seed)
        ctl = self.length
        ctl.new_answer()
        self.draft_lost = False

        def pick(row) -> int:
            return int(row.argmax()) if greedy else sample(warp(row, *warp_args), self.rng)

        llm.eval(tokens[prefix:])
        cur = t._argmax() if greedy else smp.sample(llm._ctx, -1)
        seq = list(tokens) + [cur]
        yield cur
        while True:
            room = t.n_ctx - llm.n_tokens - 2   # the verify pass writes cur + k positions
            k = max(0, min(ctl.next_k(), room))
            ctl.start()
            drafts, qs = self._propose(seq, k, warp_args) if k and not self.draft_lost else ([], None)
            if not drafts:   # a plain step
                llm.eval([cur])
                cur = t._argmax() if greedy else smp.sample(llm._ctx, -1)
                ctl.done(0, 0, 1)
                seq.append(cur)
                yield cur
                continue
            rows = self._verify([cur] + drafts)
            base = llm.n_tokens - len(drafts) - 1
            out = []
            for i, d in enumerate(drafts):
                if greedy:
                    tok = int(rows[i].argmax())
                else:
                    r = accept_sampled(warp(rows[i], *warp_args), qs[i] if qs else None, d, self.rng)
                    tok = d if r is None else r
                out.append(tok)
                if tok != d:
                    break
            else:
                out.append(pick(rows[len(drafts)]))
            llm.n_tokens = base + len(out)   # cur and the accepted drafts; the last token out is pending
            ctl.done(len(drafts), len(out) - 1, len(out))
            seq += out
            cur = out[-1]
            yield from out
