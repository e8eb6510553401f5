"""`edgeqwen eval`: what quantization costs, per language.

Perplexity of a build on a text, and against a reference build (by default the f16 GGUF of the
same source, or its fp32 ONNX for ONNX builds) the mean KL divergence KL(ref || build) of the
next-token distributions and how often their top-1 tokens agree, on the same tokens. Like
llama.cpp's perplexity tool, the text is cut into windows of --ctx tokens evaluated from
scratch, and only the second half of each window is scored, so every scored token has at least
ctx/2 tokens of context. The reference's logits go to temporary files first and the reference is
closed, so the build and its reference are never in memory together.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import UsageError

TEXTS = {"en": "eval-en.txt", "zh": "eval-zh.txt"}   # bundled in edgeqwen/data


def load_text(spec: str) -> tuple[str, str]:
    """'en', 'zh' or a file path -> (label, text)."""
    if spec in TEXTS:
        from ..resources import data
        return spec, data(TEXTS[spec]).read_text(encoding="utf-8")
    p = Path(spec)
    try:
        return p.name, p.read_text(encoding="utf-8", errors="replace")
    except OSError:
        raise UsageError(f"--text {spec!r}: not 'en', 'zh' or a readable file") from None


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64, copy=False)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


ROWS = 32


@dataclass
class ChunkStats:
    """Sums over scored positions, so chunks add up."""
    n: int = 0
    nll: float = 0.0
    ref_nll: float = 0.0
    kl: float = 0.0
    top1: int = 0
    kl_values: list | None = None

    def add(self, logits: np.ndarray, ref_logits: np.ndarray | None, targets: np.ndarray) -> None:
        # 32 rows at a time: a whole window's float64 [rows, 150k] temporaries are 0.3 GB each; slices stay
        # in cache (measured 1.6x faster for a 255-row window)
        for i in range(0, len(targets), ROWS):
            self._add(logits[i:i + ROWS], None if ref_logits is None else ref_logits[i:i + ROWS], targets[i:i + ROWS])

    def _add(self, logits: np.ndarray, ref_logits: np.ndarray | None, targets: np.ndarray) -> None:
        lp = log_softmax(logits)
        idx = np.arange(len(targets))
        self.n += len(targets)
        self.nll -= float(lp[idx, targets].sum())
        if ref_logits is not None:
            rlp = log_softmax(ref_logits)
            self.ref_nll -= float(rlp[idx, targets].sum())
            kl = (np.exp(rlp) * (rlp - lp)).sum(axis=-1)
            self.kl += float(kl.sum())
            self.kl_values = (self.kl_values or [])
            self.kl_values.extend(kl.tolist())
            self.top1 += int((rlp.argmax(-1) == lp.argmax(-1)).sum())

    def result(self) -> dict:
        out = {"tokens_scored": self.n, "ppl": float(np.exp(self.nll / self.n))}
        if self.kl_values is not None:
            out.update(ref_ppl=float(np.exp(self.ref_nll / self.n)), kl_mean=self.kl / self.n,
                       kl_p99=float(np.percentile(self.kl_values, 99)), top1=self.top1 / self.n)
        return out


def open_logit_model(model: Path, ctx: int, threads: int | None = None, kv: str = "f16"):
    """The build's own runner (its format's row), loaded for whole-window logits."""
    from ..errors import RunnerError
    from ..formats import detect
    fmt = detect(Path(model))
    if kv != "f16" and not fmt.kv_settings:
        raise RunnerError(f"--kv {kv} needs a build whose engine has KV cache types (llama.cpp's: GGUF); "
                          f"{Path(model).name} is {fmt.name}")
    extra = {"kv": kv} if kv != "f16" else {}
    return fmt.runner_class()(Path(model), threads=threads, n_ctx=ctx, logits=True, **extra)


def windows(tokens: list[int], ctx: int) -> Iterator[list[int]]:
    for i in range(0, len(tokens) - ctx + 1, ctx):
        yield tokens[i:i + ctx]


@dataclass
class Scored:
    """One model's pass over a text: its tokens and the logits at every scored position of every window,
    one .npy file a window, so the model can be closed before the next is loaded and only one window is
    ever in memory."""
    tokens: list[int]
    files: list[Path]
    seconds: float

    def window(self, i: int) -> np.ndarray:
        return np.load(self.files[i])


def score_pass(model, text: str, ctx: int, workdir: Path, name: str, label: str = "",
               max_windows: int | None = None) -> Scored:
    tokens = model.tokenize(text, special=False)
    chunks = list(windows(tokens, ctx))[:max_windows]
    if not chunks:
        raise UsageError(f"the text is {len(tokens)} tokens; --ctx {ctx} needs at least that many")
    first = ctx // 2
    files = []
    t0 = time.perf_counter()
    from ..progress import bar
    with bar(label or name, len(chunks), unit="window") as upd:
        for i, chunk in enumerate(chunks):
            files.append(workdir / f"{name}-{i}.npy")
            np.save(files[-1], model.logits(chunk)[first:-1])
            upd(1)
    return Scored(tokens, files, time.perf_counter() - t0)


def compare(build: Scored, ref: Scored | None, ctx: int) -> dict:
    """PPL of the build and, against the reference's pass over the same tokens, KL and top-1."""
    if ref is not None and ref.tokens != build.tokens:
        raise UsageError("the build and its reference tokenize the text differently; not comparable")
    stats = ChunkStats()
    first = ctx // 2
    for i, chunk in zip(range(len(build.files)), windows(build.tokens, ctx)):
        stats.add(build.window(i), None if ref is None else ref.window(i), np.array(chunk[first + 1:]))
    return {**stats.result(), "ctx": ctx, "text_tokens": len(build.tokens), "chunks": len(build.files),
            "seconds": build.seconds + (ref.seconds if ref is not None else 0.0)}


def evaluate_files(model_file: Path, ref_file: Path | None, texts: list[tuple[str, str]], ctx: int = 512,
                   threads: int | None = None, max_windows: int | None = None,
                   kv: str = "f16") -> Iterator[tuple[str, dict]]:
    """(label, result) per text. The reference runs over every text first and is closed before the build is
    loaded, so only one model is in memory at a time (a 7B f16 reference beside its q4_k_m build would need
    some 26 GB on an AMX CPU, by arithmetic). A build against itself is run twice on purpose: KL 0 then
    shows that a pass leaves nothing behind (KV cache, batch state) that changes the next. kv: the build's KV cache
    type (the reference always runs f16), so a q8_0 cache's cost is measured against the same file's f16 logits."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="edgeqwen-eval-") as tmp:
        refs: dict[str, Scored] = {}
        if ref_file is not None:
            m = open_logit_model(ref_file, ctx, threads)
            try:
                for j, (label, text) in enumerate(texts):
                    refs[label] = score_pass(m, text, ctx, Path(tmp), f"ref{j}", f"eval {label} (reference)",
                                             max_windows)
            finally:
                m.close()
        m = open_logit_model(model_file, ctx, threads, kv)
        try:
            for j, (label, text) in enumerate(texts):
                got = score_pass(m, text, ctx, Path(tmp), f"build{j}", f"eval {label}", max_windows)
                yield label, compare(got, refs.get(label), ctx)
        finally:
            m.close()
