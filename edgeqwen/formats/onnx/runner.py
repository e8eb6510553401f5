"""onnxruntime-genai behind the runner protocol: the same stream of Responses as the llama.cpp runner."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ...errors import RunnerError
from ...process import physical_cores
from ...runner import DEFAULT_CTX, FolderRunner, Response, Sampling, check_prompt, respond, shared_prefix, side_json
from ...text import clean


class OnnxRunner(FolderRunner):
    """An ONNX build folder (model.onnx + genai_config.json + tokenizer) through onnxruntime-genai."""

    backend = "onnxruntime-genai"

    def __init__(self, model: Path, threads: int | None = None, n_ctx: int | None = None,
                 manifest: dict | None = None, logits: bool = False):
        import onnxruntime_genai as og
        self._og = og
        model = Path(model)
        self.folder = model if model.is_dir() else model.parent
        if not (self.folder / "genai_config.json").exists():
            raise RunnerError(f"{self.folder}: no genai_config.json; not an ONNX build folder")
        self.threads = threads or physical_cores()
        genai_model = side_json(self.folder / "genai_config.json").get("model", {})
        train_ctx = genai_model.get("context_length")
        if not train_ctx:
            raise RunnerError(f"{self.folder}/genai_config.json is unreadable or has no context_length")
        # logits(): a window of n_ctx tokens plus the one genai reserves to generate
        self.n_ctx = min((n_ctx or DEFAULT_CTX) + (1 if logits else 0), int(train_ctx))
        t0 = time.perf_counter()
        try:
            cfg = og.Config(str(self.folder))
            cfg.clear_providers()  # CPU, whatever the folder's config asks for
            opts = {"intra_op_num_threads": self.threads, "inter_op_num_threads": 1}
            cfg.overlay(json.dumps({"model": {"decoder": {"session_options": opts}}}))
            from ..hugepages import anonymous_mappings, available, collapse_new
            before = anonymous_mappings() if available() else set()
            self.model = og.Model(cfg)
            # decode reads every prepacked weight per token: in huge pages, tg128 1.062x on the real 0.5B int4
            self.hugepages = collapse_new(before) if before else 0
            self.tokenizer = og.Tokenizer(self.model)
        except Exception as e:  # genai raises plain RuntimeError/OSError for every load failure
            raise RunnerError(f"{self.folder}: onnxruntime-genai cannot load this build ({e})") from None
        self.load_s = time.perf_counter() - t0
        self._read_folder(genai_model.get("vocab_size") or 0)
        self._gen = None
        self._key = None
        self._tokens: list[int] = []  # what the live generator holds (its last token has no KV yet)

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        # genai's tokenizer always parses special tokens; the bundled eval texts contain none
        return [int(t) for t in self.tokenizer.encode(clean(text))]

    def detokenize(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(np.array(tokens, dtype=np.int32))

    def _generator(self, tokens: list[int], sampling: Sampling, max_new: int):
        """A generator positioned after the longest prefix it shares with the last call (chat turns reuse KV).

        Search options live in the generator, so KV is reused only when they are the same and
        a seeded sampler would not be replayed from the middle.
        """
        og = self._og
        greedy = sampling.temperature <= 0
        key = None
        # min_length depends on the prompt; a guided generator's grammar state is its answer's alone
        if not sampling.ignore_eos and (greedy or sampling.seed is None) and not sampling.grammar:
            key = (greedy, sampling.temperature, sampling.top_p, sampling.top_k)
        prefix = 0
        if self._gen is not None and key is not None and key == self._key:
            prefix = shared_prefix(self._tokens[:-1], tokens)  # the last token has no KV yet
        if prefix > 0:
            self._gen.rewind_to(prefix)
            return self._gen, prefix
        params = og.GeneratorParams(self.model)
        opts = {"max_length": self.n_ctx, "do_sample": not greedy, "batch_size": 1}
        if not greedy:
            opts.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
            if sampling.seed is not None:
                opts["random_seed"] = sampling.seed
        if sampling.ignore_eos:  # genai ends the sequence at EOS by itself; forbid it instead
            opts["min_length"] = len(tokens) + max_new
        params.set_search_options(**opts)
        if sampling.grammar:   # onnx/guidance.py's (type, data)
            import json
            g = json.loads(sampling.grammar)
            try:
                params.set_guidance(g["type"], g["data"])
            except Exception as e:   # noqa: BLE001  llguidance's refusal of a schema is the request's
                raise RunnerError(f"onnxruntime-genai cannot constrain an answer to this schema ({e})") from None
        self._gen = None  # free the old KV buffer before the new one is allocated
        self._gen = og.Generator(self.model, params)
        self._key = key
        return self._gen, 0

    def stream(self, tokens: list[int], sampling: Sampling) -> Iterator[Response]:
        max_new = check_prompt(tokens, self.n_ctx, sampling)
        t0 = time.perf_counter()
        gen, prefix = self._generator(tokens, sampling, max_new)
        decoder = self.tokenizer.create_stream()

        scored = {}

        def tokens_out():
            gen.append_tokens(np.array(tokens[prefix:], dtype=np.int32))
            self._tokens = list(tokens)
            while True:
                if sampling.logprobs is not None:   # the logits the next token is chosen from (genai then runs
                    row = np.asarray(gen.get_logits(), dtype=np.float32)   # the model on that token at once)
                    scored["row"] = row.reshape(-1, row.shape[-1])[-1]
                try:
                    gen.generate_next_token()
                except RuntimeError as e:   # genai's own failure mid-answer (its guidance refusing a token it sampled)
                    why = str(e).splitlines()[0][:300]
                    raise RunnerError(f"onnxruntime-genai stopped this answer: {why}") from None
                tok = int(gen.get_next_tokens()[0])
                self._tokens.append(tok)
                yield tok

        def forget():
            self._gen = None
        yield from respond(self.forget_on_error(tokens_out(), forget), t0=t0, n_prompt=len(tokens), cached=prefix,
                           max_new=max_new, is_eog=lambda t: not sampling.ignore_eos and t in self.eos_ids,
                           decode=lambda t: "" if t is None else decoder.decode(t), proc=self.proc,
                           top=sampling.logprobs or 0,
                           row=None if sampling.logprobs is None else lambda: scored["row"])

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Next-token logits at every position of tokens, from scratch (for eval)."""
        og = self._og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(tokens) + 1, batch_size=1)
        gen = og.Generator(self.model, params)
        gen.append_tokens(np.array(tokens, dtype=np.int32))
        out = np.array(gen.get_output("logits"), dtype=np.float32)[0]
        del gen
        return out

    def close(self) -> None:
        self._gen = None
        self.tokenizer = None
        self.model = None
