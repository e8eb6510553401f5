"""MLX builds behind the runner protocol, through mlx-lm's public API.

mlx-lm's: loading the folder (`mlx_lm.load`: the model, its quantized layers, the tokenizer), the step loop
(`generate_step`), the samplers (`make_sampler`), the KV cache (`make_prompt_cache`, `trim_prompt_cache`) and
the streaming detokenizer. Ours: the protocol's timing, EOS and length rules (`runner.respond`, shared with
every backend so that their rows compare), the chat template rendered in our sandbox, the context bound, and
the KV reuse between chat turns (the longest shared prefix, trimmed in mlx-lm's cache). We call
`generate_step` rather than `stream_generate` because the latter always stops at EOS (bench needs
ignore_eos) and times itself.

Every MLX call runs on the process's MLX thread (thread.py).

On a Mac MLX runs on the GPU (Metal); mlx[cpu] on Linux runs the same folder on the CPU, correct but slow:
rows then say `mlx (cpu)`, and speed on a Mac is never claimed from them. MLX picks its own CPU threads;
`threads` is recorded but not applied.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ...errors import RunnerError
from ...runner import DEFAULT_CTX, FolderRunner, Response, Sampling, check_prompt, respond, shared_prefix, side_json
from ...schemas import ModelConfig, check_typed
from ...text import clean
from .layout import check_folder
from .thread import END as _END
from .thread import on_mlx_thread


def device_name() -> str:   # on the MLX thread
    import mlx.core as mx
    return "gpu" if mx.default_device() == mx.gpu else "cpu"


class MlxRunner(FolderRunner):
    """An MLX build folder (config.json + model.safetensors + tokenizer) through mlx-lm."""

    def __init__(self, model: Path, threads: int | None = None, n_ctx: int | None = None,
                 manifest: dict | None = None, logits: bool = False):
        try:
            self._mx = on_mlx_thread(_import_mlx)
        except ImportError:
            raise RunnerError("MLX builds need mlx and mlx-lm, which are not installed: pip install 'edgeqwen[mlx]' "
                              "(on Linux this is mlx[cpu])") from None
        model = Path(model)
        self.folder = model if model.is_dir() else model.parent
        config = side_json(self.folder / "config.json")
        if not config:
            raise RunnerError(f"{self.folder}: no readable config.json; not an MLX build folder")
        # typed and bounded before mlx-lm builds a model from it (a layer count of 10**9 would never come back)
        check_typed(ModelConfig, config, f"{self.folder}/config.json", "a model config")
        self.backend = f"mlx ({on_mlx_thread(device_name)})"
        self.threads = threads
        train_ctx = config.get("max_position_embeddings")
        self.n_ctx = min(n_ctx or DEFAULT_CTX, train_ctx if isinstance(train_ctx, int) and train_ctx > 0 else 1 << 30)
        check_folder(self.folder, config)
        t0 = time.perf_counter()
        try:
            self.model, self.tokenizer = on_mlx_thread(_load, self.folder, logits)
        except Exception as e:   # mlx-lm raises ValueError, KeyError, FileNotFoundError... for a bad folder
            raise RunnerError(f"{self.folder}: mlx-lm cannot load this build ({type(e).__name__}: {e})") from None
        self.load_s = time.perf_counter() - t0
        self._read_folder(int(config.get("vocab_size") or 0))
        self._cache = None
        self._seq: list[int] = []   # tokens fed or generated since the cache was made

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        tok = self.tokenizer._tokenizer   # the Hugging Face tokenizer mlx-lm wraps
        return list(tok.encode(clean(text), add_special_tokens=False, split_special_tokens=not special))

    def detokenize(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def _reuse(self, tokens: list[int]) -> int:
        """Keep the cache's longest prefix shared with tokens (chat turns); returns its length."""
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
        if self._cache is not None and can_trim_prompt_cache(self._cache):
            held = self._cache[0].offset
            if held <= len(self._seq):
                prefix = shared_prefix(self._seq[:held], tokens)
                if prefix > 0:
                    trim_prompt_cache(self._cache, held - prefix)
                    self._seq = list(tokens[:prefix])
                    return prefix
        self._cache = None   # the old one's memory goes before the new one's
        self._cache = make_prompt_cache(self.model)
        self._seq = []
        return 0

    def stream(self, tokens: list[int], sampling: Sampling) -> Iterator[Response]:
        from mlx_lm.generate import generate_step
        from mlx_lm.sample_utils import make_sampler
        mx = self._mx
        self.refuse_grammar(sampling)
        max_new = check_prompt(tokens, self.n_ctx, sampling)
        t0 = time.perf_counter()
        if sampling.seed is not None:
            on_mlx_thread(mx.random.seed, sampling.seed)
        greedy = sampling.temperature <= 0
        sampler = make_sampler(temp=0.0 if greedy else sampling.temperature,
                               top_p=sampling.top_p if 0 < sampling.top_p < 1 else 0.0,
                               min_p=sampling.min_p, top_k=max(0, sampling.top_k))
        prefix = on_mlx_thread(self._reuse, tokens)
        detok = self.tokenizer.detokenizer

        scored = {}

        def step(steps):
            out = next(steps, _END)
            if out is not _END and sampling.logprobs is not None:   # mlx-lm's log-softmax of this step's logits
                scored["row"] = np.array(out[1].astype(mx.float32)).reshape(-1)
            return out

        def tokens_out():
            self._seq.extend(tokens[prefix:])
            steps = on_mlx_thread(lambda: generate_step(mx.array(tokens[prefix:]), self.model, max_tokens=max_new,
                                                        sampler=sampler, prompt_cache=self._cache))
            try:
                while (tok := on_mlx_thread(step, steps)) is not _END:
                    self._seq.append(int(tok[0]))
                    yield int(tok[0])
            finally:   # its stream context must end on the thread that entered it, not in the collector
                on_mlx_thread(steps.close)

        def forget():
            self._cache = None

        def decode(t):
            if t is None:
                detok.finalize()
            else:
                detok.add_token(t)
            return detok.last_segment

        yield from respond(self.forget_on_error(tokens_out(), forget), t0=t0, n_prompt=len(tokens), cached=prefix,
                           max_new=max_new, is_eog=lambda t: not sampling.ignore_eos and t in self.eos_ids,
                           decode=decode, proc=self.proc, top=sampling.logprobs or 0,
                           row=None if sampling.logprobs is None else lambda: scored["row"],
                           counters=lambda: {"mlx_peak_memory": int(on_mlx_thread(mx.get_peak_memory))})

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Next-token logits at every position of tokens, from an empty context (for eval)."""
        mx = self._mx
        return on_mlx_thread(lambda: np.array(self.model(mx.array(tokens)[None])[0].astype(mx.float32)))

    def close(self) -> None:
        def free():   # the arrays go on the thread that made them
            self._cache = None
            self.model = None
        if self.model is not None:
            on_mlx_thread(free)
        self.tokenizer = None


def _load(folder: Path, logits: bool):
    """mlx-lm's load; for eval (logits) the quantized layers dequantized once: the weights' values are the same,
    and mlx's CPU quantized matmul is ~20x slower than its dense one (64 x 896 x 4864: 1954 ms vs 107 ms here,
    mlx[cpu] 0.32.4), which made a window of eval take minutes."""
    from mlx_lm import load
    model, tokenizer = load(str(folder))
    if logits and device_name() == "cpu":
        from mlx_lm.utils import dequantize_model
        model = dequantize_model(model)
    return model, tokenizer


def _import_mlx():
    import mlx.core as mx
    import mlx_lm  # noqa: F401  (its module-level stream belongs to this thread)
    return mx


