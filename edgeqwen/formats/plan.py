"""What every format's planner shares: the Plan it returns (file size, the RAM it needs, the bytes a decoded token
reads) and the KV cache's bytes per position. Each format's own memory model is its row's `planner`
(formats/<format>/plan.py); `edgeqwen plan` (measure/plan.py) resolves the model, dispatches and judges devices."""
from __future__ import annotations

from dataclasses import dataclass

from ..arch import ARCHS
from ..schemas import ModelConfig

# Every model plan knows is of the Qwen2 family (the MoE shares its attention).
ARCH = ARCHS["qwen2"]


@dataclass
class Plan:
    size: str
    quant: str
    ctx: int
    file_bytes: int
    weights_bytes: int
    repack_bytes: int
    kv_bytes: int
    compute_bytes: int
    runtime_bytes: int
    bytes_per_token: int
    params: int
    gathered_bytes: int = 0   # an untied token_embd: read one row per token, so not resident at full speed
    released: bool = True     # the repacked originals are given back as they are copied (pagecache.py)
    resident: bool = False    # a normal load reads the file into memory (llama_runner, Linux): the table is held
    held_bytes: int | None = None   # ONNX: what onnxruntime holds of the weights (ONNX_HELD); None for GGUF
    extra_bytes: int = 0      # GGUF on AMX: a tied output's second copy and the AMX layout's additions
    backend: str = "llama.cpp"   # or "onnxruntime-genai", "mlx-lm": the engine, as calibrate groups published rows
    parallel: int = 1         # conversations served at once (serve --parallel): kv_bytes holds a context for each

    @property
    def peak_ram(self) -> int:
        if self.held_bytes is not None:
            # ONNX: the need only. Measured peak RSS also counts the mapped file pages read around the table
            # rows (unlimited: 7B int4 7.38 GiB, 0.5B int8 1.19, against fits of 6.70 and 0.86); not modelled.
            return self.min_ram
        copies = 0 if self.released else self.repack_bytes
        return (self.weights_bytes + copies + self.extra_bytes + self.kv_bytes + self.compute_bytes
                + self.runtime_bytes)

    @property
    def min_ram(self) -> int:
        """The least memory it runs in at full speed (what `edgeqwen fit` measures): the weights once. A repacked
        tensor's original pages are read once at load and then are clean page cache the kernel may drop, and a
        lean load has no copy at all, so either way the weights count once, not twice as in peak RSS. An untied
        token_embd is only gathered from, a row per token, so its pages may go too (fit rows of the untied real
        0.5B: q8_0 needed 0.64 GiB where counting the table predicted 0.79). A lean load's need (within 6% of all
        seven lean fit rows here), and a normal load's since it gives back each repacked original as it copies
        it and reads no window around a fault (pagecache.py): before that, normal loads of repacked types needed
        0.03-0.5 GiB more, dead originals and 8 MiB read-ahead windows around faults crowding out live pages.
        A resident load (a normal one on Linux: the file read into memory, for huge pages) holds the table too."""
        if self.held_bytes is not None:
            held = self.held_bytes
        else:
            held = self.weights_bytes - (0 if self.resident else self.gathered_bytes) + self.extra_bytes
        return held + self.kv_bytes + self.compute_bytes + self.runtime_bytes


# Bytes per cached value of each GGUF KV cache type (q8_0: blocks of 32 int8 and one f16 scale).
KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32}


def kv_per_position(cfg: ModelConfig, bytes_per_elem: float) -> int:
    """K and V of every layer for one position."""
    return int(2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_size * bytes_per_elem)
