"""`edgeqwen plan`: predict file size, peak RAM and the decode ceiling of a build before making it.

File size follows llama.cpp's per-tensor type choices (llama-quant.cpp) for the common file
types; RAM = mmapped weights + CPU repack copies + KV cache at the context + the part of the
compute buffer a prompt touches + the runtime. Decode ceiling = bandwidth / bytes read per token.
ONNX precisions (int4, int8, ...) are planned from the exporter's initializer list instead (plan_onnx).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import gguf

from ..arch import ARCHS
from ..errors import UsageError
from ..schemas import ModelConfig, check_typed

# Every model plan knows is of the Qwen2 family (the MoE shares its attention).
ARCH = ARCHS["qwen2"]

T = gguf.GGMLQuantizationType
# Models beyond the recipes, by arithmetic (their published config.json shapes). The typed config also needs
# rope_theta, rms_norm_eps and a context length; plan reads none of them for these.
_TYPED = dict(rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768)
EXTRA_MODELS = {
    "72b": dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False, **_TYPED),
    "57b-a14b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=151936, tie_word_embeddings=False, **_TYPED,
                     num_experts=64, num_experts_per_tok=8, moe_intermediate_size=2560,
                     shared_expert_intermediate_size=20480),
}
BASE_TYPE = {
    "f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1, "q5_0": T.Q5_0,
    "q5_1": T.Q5_1, "q2_k": T.Q2_K, "q3_k_s": T.Q3_K, "q3_k_m": T.Q3_K, "q3_k_l": T.Q3_K, "q4_k_s": T.Q4_K,
    "q4_k_m": T.Q4_K, "q5_k_s": T.Q5_K, "q5_k_m": T.Q5_K, "q6_k": T.Q6_K, "iq4_nl": T.IQ4_NL, "iq4_xs": T.IQ4_XS,
    "iq3_xxs": T.IQ3_XXS, "iq3_s": T.IQ3_S, "iq3_m": T.IQ3_S, "iq3_xs": T.IQ3_S,
}
# K-quants need rows that are a multiple of 256; llama.cpp falls back to these otherwise.
FALLBACK = {T.Q2_K: T.IQ4_NL, T.Q3_K: T.IQ4_NL, T.IQ4_XS: T.IQ4_NL, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1,
            T.Q6_K: T.Q8_0, T.IQ3_XXS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL}
# Types llama.cpp's CPU backend copies into an interleaved layout at load time. The mmapped original stays
# resident too, so these weights counted twice in peak RSS (bench rows: q4_0 vs q8_0) until the runner gave
# each original back as soon as it was copied (pagecache.py, Linux); `release` says which case to predict.
# token_embd is only gathered from, never repacked.
REPACKED = {T.Q4_0, T.Q4_K, T.IQ4_NL}
# On CPUs with AMX-INT8 (Sapphire Rapids and newer) the AMX buffer type repacks these as well, every
# matrix but token_embd, output included (its load log: "amx repack tensor output.weight of type q8_0").
# A tied model's output is token_embd loaded a second time, into the AMX buffer, while the lookup reads the
# original: a copy held twice whichever way the file is loaded (plan said 0.53 GiB for make demo's 0.5B q4_k_m
# on a Sapphire Rapids VM that measured 0.69 before it was counted).
REPACKED_AMX = {T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS}
# The AMX layout's bytes beyond the source, per block (ggml-cpu/amx/mmq.cpp get_row_size: Q8_0 keeps an int32
# compensation per block, Q4_K and Q5_K 4 bytes of unpacked scales, IQ4_XS 2).
AMX_EXTRA_PER_BLOCK = {T.Q8_0: 4, T.Q4_K: 4, T.Q5_K: 4, T.IQ4_XS: 2}
# Python, the llama.cpp libraries and their vocabulary tables; with COMPUTE_TOUCHED, fitted to
# bench rows of 0.5B, 1.5B and 7B on x86 (residual RSS after weights and KV: 144, 167, 207 MiB).
RUNTIME_BYTES = 118 << 20
COMPUTE_TOUCHED = 0.5  # share of the modelled activation bytes a 512-token prefill actually touches
N_BATCH = 512


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_types(cfg: ModelConfig, quant: str) -> list[tuple[str, int, int, T]]:
    """(name, ne0, n_elements, type) for every tensor llama.cpp would write for this config and quant."""
    if quant not in BASE_TYPE:
        raise UsageError(f"plan knows {', '.join(sorted(BASE_TYPE))}; not {quant}")
    base = BASE_TYPE[quant]
    h, ff, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = cfg.head_size
    kv = cfg.num_key_value_heads * hd
    q = cfg.num_attention_heads * hd
    v = cfg.vocab_size
    tied = cfg.tie_word_embeddings
    quantized = base not in (T.F32, T.F16, T.BF16)

    def pick(name, ne0, i=None):
        t = base
        if not quantized:
            return t
        if name == "output" or (tied and name == "token_embd"):
            t = T.Q6_K if base != T.Q8_0 else T.Q8_0
        elif name == "attn_v" and quant in ("q4_k_m", "q5_k_m") and _more_bits(i, n):
            t = T.Q6_K
        elif name == "attn_v" and quant == "q3_k_m":
            t = T.Q5_K if i < 2 else T.Q4_K
        elif name == "attn_v" and quant in ("q2_k", "q3_k_l"):
            t = T.Q4_K if quant == "q2_k" else T.Q5_K
        elif name == "ffn_down" and quant in ("q4_k_m", "q5_k_m") and _more_bits(i, n):
            t = T.Q6_K
        elif name == "ffn_down" and quant in ("q2_k", "q3_k_m"):
            t = T.Q4_K if quant == "q3_k_m" and i < n // 16 else T.Q3_K
        block = gguf.GGML_QUANT_SIZES[t][0]
        if ne0 % block:
            t = FALLBACK.get(t, T.F16)
        return t

    out = [("token_embd", h, v * h, pick("token_embd", h)), ("output_norm", h, h, T.F32)]
    if not tied:
        out.append(("output", h, v * h, pick("output", h)))
    experts = cfg.extra("num_experts", 0)
    for i in range(n):
        out += [("attn_norm", h, h, T.F32), ("ffn_norm", h, h, T.F32),
                ("attn_q", h, h * q, pick("attn_q", h, i)), ("attn_k", h, h * kv, pick("attn_k", h, i)),
                ("attn_v", h, h * kv, pick("attn_v", h, i)), ("attn_output", q, q * h, pick("attn_output", q, i))]
        if ARCH.attention_bias:
            out += [("attn_q_bias", q, q, T.F32), ("attn_k_bias", kv, kv, T.F32), ("attn_v_bias", kv, kv, T.F32)]
        if experts:
            mff, sff = cfg.extra("moe_intermediate_size"), cfg.extra("shared_expert_intermediate_size")
            out += [("ffn_gate_exps", h, experts * h * mff, pick("ffn_gate", h, i)),
                    ("ffn_up_exps", h, experts * h * mff, pick("ffn_up", h, i)),
                    ("ffn_down_exps", mff, experts * h * mff, pick("ffn_down", mff, i)),
                    ("ffn_gate_shexp", h, h * sff, pick("ffn_gate", h, i)),
                    ("ffn_up_shexp", h, h * sff, pick("ffn_up", h, i)),
                    ("ffn_down_shexp", sff, h * sff, pick("ffn_down", sff, i)),
                    ("ffn_gate_inp", h, h * experts, T.F32)]
        else:
            out += [("ffn_gate", h, h * ff, pick("ffn_gate", h, i)), ("ffn_up", h, h * ff, pick("ffn_up", h, i)),
                    ("ffn_down", ff, h * ff, pick("ffn_down", ff, i))]
    return out


def nbytes(n_elements: int, t: T) -> int:
    block, size = gguf.GGML_QUANT_SIZES[t]
    return n_elements // block * size


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


METADATA_BYTES = 6 << 20  # vocabulary, merges and chat template in the GGUF header


def model_config(size: str, override: dict | None = None) -> ModelConfig:
    """The typed config of a recipe size or one of EXTRA_MODELS; override: a build manifest's own shape."""
    from ..recipes import get_recipe
    key = size.lower()
    data = dict(EXTRA_MODELS[key]) if key in EXTRA_MODELS else get_recipe(key).hf_config()
    data.update({k: v for k, v in (override or {}).items() if v is not None})
    return check_typed(ModelConfig, data, f"the config of {size}", "a model config")


def plan(size: str, quant: str, ctx: int = 4096, prompt_tokens: int = 512, config: dict | None = None,
         amx: bool = False, release: bool = True, resident: bool = False, kv: str = "f16") -> Plan:
    """Predict a build of `size` (a recipe size or one of EXTRA_MODELS) as `quant`.

    config overrides the recipe's shape (a build's manifest records its checkpoint's own); amx: the CPU
    has AMX-INT8, so llama.cpp keeps a repacked copy of more weight types; release=False: the runner keeps
    the repacked originals resident (before pagecache.py, or where it cannot release them); resident: a
    normal load that reads the file into memory (the runner on Linux) rather than mapping it, as a lean one does.
    kv: the GGUF KV cache type (f16, or q8_0: 34 bytes per 32 values).
    """
    if kv not in KV_BYTES:
        raise UsageError(f"--kv {kv}: choose {', '.join(KV_BYTES)}")
    from ..formats import FORMATS, format_of_quant
    from ..recipes import get_recipe
    cfg = model_config(size, config)
    if size.lower() not in EXTRA_MODELS:
        quant = get_recipe(size).resolve_quant(quant)
    else:
        from ..recipes import DEFAULT_ALIASES
        quant = DEFAULT_ALIASES.get(quant.lower(), quant.lower())
    fmt = FORMATS[format_of_quant(quant)]
    if kv != "f16" and not fmt.kv_settings:
        raise UsageError(f"--kv {kv} is a llama.cpp KV cache type; {quant} is not a GGUF build")
    if fmt.planner:   # a format with its own memory model; the default row's is the one below
        return fmt.load("planner")(size, quant, cfg, ctx, prompt_tokens)
    tensors = tensor_types(cfg, quant)
    weights = sum(nbytes(ne, t) for _, _, ne, t in tensors)
    tied = cfg.tie_word_embeddings

    def repacked(name: str, t: T) -> bool:
        return t in (REPACKED_AMX if amx else REPACKED) and name != "token_embd"
    repack = sum(nbytes(ne, t) for name, _, ne, t in tensors if repacked(name, t))
    extra = 0
    if amx:   # held beyond the file's bytes: the AMX layout's additions, and a tied output's own copy
        in_amx = [(ne, t) for name, _, ne, t in tensors
                  if t in REPACKED_AMX and (name != "token_embd" or tied)]
        extra = sum(ne // gguf.GGML_QUANT_SIZES[t][0] * AMX_EXTRA_PER_BLOCK.get(t, 0) for ne, t in in_amx)
        if tied and tensors[0][3] in REPACKED_AMX:
            extra += nbytes(tensors[0][2], tensors[0][3])
    h = cfg.hidden_size
    kv_pos = _kv_per_position(cfg, KV_BYTES[kv])
    ctx = min(ctx, 32768)
    # Touched compute buffer for a prompt batch: activations of one layer, attention scores over
    # the used context, and the logits row. (Calibrated against bench rows; see bench/RESULTS.md.)
    ff = cfg.extra("shared_expert_intermediate_size") or cfg.intermediate_size
    batch = min(N_BATCH, prompt_tokens)
    heads = cfg.num_attention_heads
    compute = int(COMPUTE_TOUCHED * (4 * batch * (3 * ff + 6 * h + heads * min(ctx, prompt_tokens))
                                     + 4 * cfg.vocab_size))
    embd = nbytes(cfg.vocab_size * h, tensors[0][3])
    per_token = weights - (0 if tied else embd)  # one row of an untied embd
    if cfg.extra("num_experts"):  # only the active experts are read per token
        exp = sum(nbytes(ne, t) for name, _, ne, t in tensors if name.endswith("_exps"))
        per_token -= exp - exp * cfg.extra("num_experts_per_tok") // cfg.extra("num_experts")
    params = sum(ne for _, _, ne, _ in tensors)
    return Plan(size, quant, ctx, weights + METADATA_BYTES, weights, repack, ctx * kv_pos, compute, RUNTIME_BYTES,
                per_token + kv_pos * prompt_tokens, params, 0 if tied else embd, released=release, resident=resident,
                extra_bytes=extra)


# Bytes per cached value of each GGUF KV cache type (q8_0: blocks of 32 int8 and one f16 scale).
KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32}


def _kv_per_position(cfg: ModelConfig, bytes_per_elem: float) -> int:
    """K and V of every layer for one position."""
    return int(2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_size * bytes_per_elem)


# --- ONNX builds (onnxruntime-genai on the CPU) --------------------------------------------------------

# What onnxruntime holds of each initializer role (onnx_layout.ROLES) while it decodes, per byte of the file.
# MatMulNBits weights are prepacked into anonymous memory as the blobs plus two float arrays per block (the
# scales and the block sums that fold the zero points in) and the mapped originals are let go: loaded 0.5B,
# 1.5B and 7B int4 builds held 451, 1410 and 5896 MiB of anonymous memory against blobs + 2 x scales of 449,
# 1328 and 5880 (the 1.5B's other 82 MiB: its GatherBlockQuantized table, then passed through a Reshape that
# onnxruntime folds into a copy; the exporter now writes that table as rows, so only int4_rtn's table shared
# with lm_head is "folded"). An embedding table stays mapped, a row read per token; the whole process beyond
# the weights held was 89-100 MiB of anonymous memory at load (heap and anonymous maps, /proc/self/smaps).
ONNX_HELD = {"blobs": 1, "scales": 2, "zp": 0, "table": 0, "dense": 1, "small": 1, "folded": 1}
# Python, onnxruntime and genai: the tiny int4 build (2 layers, hidden 256) needed 224 MiB under `fit` (the
# least of five fits at 16 MiB resolution; its 500 tok/s make the speed bar noisy), of which plan's weights,
# KV cache and prompt logits account for 100.
ONNX_RUNTIME_BYTES = 124 << 20


def plan_onnx(size: str, quant: str, cfg: ModelConfig, ctx: int, prompt_tokens: int) -> Plan:
    """An ONNX build: the exporter's own initializer list (onnx_layout), what onnxruntime holds of each role,
    an fp32 KV cache genai allocates for the whole context, and the prompt's logits (the graph returns a row
    per prompt token)."""
    from ..checkpoints import expected_tensors
    from ..formats.onnx.layout import file_bytes, initializers
    if cfg.extra("num_experts"):
        raise UsageError(f"{size} is a mixture of experts; ONNX builds are of dense models only")
    shapes = expected_tensors(cfg, ARCH)
    parts = list(initializers(shapes, cfg, quant))
    total = file_bytes(parts)
    held = sum(b * ONNX_HELD[role] for _, role, b in parts)
    gathered = sum(b for _, role, b in parts if role == "table")
    kv_pos = _kv_per_position(cfg, 4)  # genai's cache is fp32 here
    ctx = min(ctx, 32768)
    params = sum(math.prod(shape) for shape in shapes.values())
    return Plan(size, quant, ctx, total, total, 0, ctx * kv_pos, prompt_tokens * cfg.vocab_size * 4,
                ONNX_RUNTIME_BYTES, total - gathered + kv_pos * prompt_tokens, params, gathered, held_bytes=held,
                backend="onnxruntime-genai")


# --- MLX builds (mlx-lm) ---------------------------------------------------------------------------------

# mlx-lm loads every weight into (unified) memory; its KV cache is the model's dtype (bf16) and grows with use.
# Only the last position's logits are computed (the prefill's are never evaluated: MLX is lazy).
# Python, mlx and mlx-lm's tokenizer (transformers): the real 0.5B mlx4 read 764 MiB RSS loaded against 338 MiB
# of weights (Linux, mlx[cpu] 0.32.4; transformers imported torch there, which a make setup install lacks).
MLX_RUNTIME_BYTES = 426 << 20
# Metal lets the GPU wire about this share of a Mac's RAM (recommendedMaxWorkingSetSize; mlx-lm warns past it).
MLX_WORKING_SET = 0.75


def plan_mlx(size: str, quant: str, cfg: ModelConfig, ctx: int, prompt_tokens: int) -> Plan:
    """An MLX build: the folder's own tensor list (formats/mlx/layout.py), all of it held."""
    from ..checkpoints import expected_tensors
    from ..formats.mlx.layout import DEFAULT_GROUP, QUANTS, file_bytes, tensor_specs
    if cfg.extra("num_experts"):
        raise UsageError(f"{size} is a mixture of experts; plan knows dense MLX builds only")
    shapes = expected_tensors(cfg, ARCH)
    specs = tensor_specs({n: (s, "BF16") for n, s in shapes.items()}, cfg, QUANTS[quant].bits, DEFAULT_GROUP)
    total = file_bytes(specs)
    embed = file_bytes([s for s in specs if s[3] == "model.embed_tokens.weight"])
    gathered = 0 if cfg.tie_word_embeddings else embed   # a row per token unless it is also the output layer
    kv_pos = _kv_per_position(cfg, 2)
    ctx = min(ctx, 32768)
    params = sum(math.prod(shape) for shape in shapes.values())
    return Plan(size, quant, ctx, total, total, 0, ctx * kv_pos, cfg.vocab_size * 4, MLX_RUNTIME_BYTES,
                total - gathered + kv_pos * prompt_tokens, params, gathered, held_bytes=total, backend="mlx-lm")


# --- device profiles ---------------------------------------------------------------------------

def devices_file():
    from ..resources import data
    return data("devices.toml")


def load_devices(path: Path | None = None) -> dict[str, dict]:
    from ..recipes import load_toml
    path = path or devices_file()
    data = load_toml(path, "device profiles")
    from ..schemas import DeviceProfile, check
    for name, d in data.items():
        check(DeviceProfile, d, f"{path}: device {name}", "the profile", "a table")
    return data


def verdict(p: Plan, device: dict, name: str | None = None) -> dict:
    """Does it fit, and how fast can it decode at best, on this device profile. With the profile's name, the
    expected decode uses the efficiency fitted on published measurements of such devices (calibrate.py) and
    carries that fit's leave-one-out error; otherwise the profile's own efficiency, with no known error."""
    share = device.get("usable_fraction", 0.8)
    if p.backend == "mlx-lm" and device.get("unified_memory"):
        share = min(share, MLX_WORKING_SET)   # Metal's working-set limit binds first
    budget = device["ram_gib"] * 2**30 * share
    ceiling = device["bandwidth_gbs"] * 1e9 / p.bytes_per_token
    out = {"fits": p.min_ram <= budget, "budget": budget, "ceiling_tps": ceiling,
           "expected_tps": ceiling * device.get("efficiency", 0.6), "error": None}
    from .calibrate import calibrated
    cal = calibrated(name, p.backend, plan) if name else None
    if cal:   # fitted as measured / (bandwidth / file size): predicted the same way
        out.update(expected_tps=cal["efficiency"] * device["bandwidth_gbs"] * 1e9 / p.file_bytes,
                   error=cal["median_abs"], worst_error=cal["worst_abs"], calibration=f"{cal['group']}/{cal['class']}"
                   f" on {cal['n']} published rows")
    return out


def fmt_gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def describe(p: Plan, device_name: str | None, device: dict | None) -> str:
    if p.backend == "mlx-lm":
        lines = [f"{p.size} {p.quant} (MLX, mlx-lm) at context {p.ctx}: ~{p.params / 1e9:.2f}B parameters",
                 f"  file size        {fmt_gib(p.file_bytes)}",
                 f"  RAM              {fmt_gib(p.min_ram)} = weights {fmt_gib(p.held_bytes)} + KV (bf16) "
                 f"{fmt_gib(p.kv_bytes)} + runtime {fmt_gib(p.runtime_bytes)} + logits (unified memory on a Mac; "
                 f"the GPU may use about {MLX_WORKING_SET:.0%} of it)",
                 f"  read per token   {fmt_gib(p.bytes_per_token)}"]
        return "\n".join(lines + _device_lines(p, device_name, device))
    if p.held_bytes is not None:
        lines = [f"{p.size} {p.quant} (ONNX, onnxruntime-genai) at context {p.ctx}: ~{p.params / 1e9:.2f}B parameters",
                 f"  file size        {fmt_gib(p.file_bytes)}",
                 f"  RAM              {fmt_gib(p.min_ram)} = weights held {fmt_gib(p.held_bytes)} + KV (fp32) "
                 f"{fmt_gib(p.kv_bytes)} + prompt logits {fmt_gib(p.compute_bytes)} + runtime "
                 f"{fmt_gib(p.runtime_bytes)}"
                 " (MatMulNBits prepacked with two float arrays per block"
                 + (f"; {fmt_gib(p.gathered_bytes)} of embedding table read a row per token)"
                    if p.gathered_bytes else ")"),
                 f"  read per token   {fmt_gib(p.bytes_per_token)}"]
        return "\n".join(lines + _device_lines(p, device_name, device))
    lines = [f"{p.size} {p.quant} at context {p.ctx}: ~{p.params / 1e9:.2f}B parameters",
             f"  file size        {fmt_gib(p.file_bytes)}",
             f"  peak RAM         {fmt_gib(p.peak_ram)} = weights {fmt_gib(p.weights_bytes)} + KV {fmt_gib(p.kv_bytes)}"
             f" + compute {fmt_gib(p.compute_bytes)} + runtime {fmt_gib(p.runtime_bytes)}"
             + (f" + AMX copies {fmt_gib(p.extra_bytes)}" if p.extra_bytes else "")
             + (f" ({fmt_gib(p.repack_bytes)} of the weights repacked as loaded, each original given back)"
                if p.released and p.repack_bytes else
                f" + repacked copies {fmt_gib(p.repack_bytes)}" if p.repack_bytes else ""),
             f"  min RAM          {fmt_gib(p.min_ram)} (full speed inside a memory limit; weights counted once"
             + ((", the untied embedding table held: a normal load reads the file into memory"
                 f"; {fmt_gib(p.min_ram - p.gathered_bytes)} with --lean)" if p.resident else
                 ", the untied embedding table not at all: a lean load; a normal one on Linux reads the file "
                 f"into memory, {fmt_gib(p.min_ram + p.gathered_bytes)})") if p.gathered_bytes else ")"),
             f"  read per token   {fmt_gib(p.bytes_per_token)}"]
    return "\n".join(lines + _device_lines(p, device_name, device))


def describe_draft(p: Plan, d: Plan, device_name: str | None, device: dict | None) -> str:
    """What a draft model adds: its own weights, KV cache at the same context and buffers, loaded beside the target."""
    if p.backend != "llama.cpp" or d.backend != "llama.cpp":
        raise UsageError("speculative decoding needs a GGUF target and a GGUF draft")
    if d.file_bytes >= p.file_bytes:
        raise UsageError(f"the draft {d.size} {d.quant} is not smaller than the target {p.size} {p.quant}")
    lines = [f"  with draft {d.size} {d.quant}: + peak RAM {fmt_gib(d.peak_ram)} (file {fmt_gib(d.file_bytes)}, KV "
             f"{fmt_gib(d.kv_bytes)}) -> peak RAM {fmt_gib(p.peak_ram + d.peak_ram)}, min RAM "
             f"{fmt_gib(p.min_ram + d.min_ram)} together"]
    if device:
        budget = device["ram_gib"] * 2**30 * device.get("usable_fraction", 0.8)
        fits = "fit" if p.min_ram + d.min_ram <= budget else "do NOT fit"
        lines.append(f"    target and draft together {fits} on {device_name} (budget {fmt_gib(budget)})")
    return "\n".join(lines)


def _device_lines(p: Plan, device_name: str | None, device: dict | None) -> list[str]:
    if not device:
        return []
    v = verdict(p, device, device_name)
    fits = "fits" if v["fits"] else "does NOT fit"
    err = (f" ±{v['error']:.0%} (leave-one-out median error of {v['calibration']}; worst {v['worst_error']:.0%})"
           if v["error"] is not None else " (efficiency assumed, no published rows to check it against)")
    return [f"  on {device_name} ({device['ram_gib']} GiB, {device['bandwidth_gbs']} GB/s; {device['source']}):",
            f"    {fits} (min RAM against a budget of {fmt_gib(v['budget'])}); "
            f"decode ceiling {v['ceiling_tps']:.1f} tok/s, expect ~{v['expected_tps']:.1f}{err}"]


def predicted_min_ram_for_row(row: dict) -> int | None:
    """Plan's min RAM for a fit row's build (sizes plan knows; None otherwise)."""
    b = row.get("build", {})
    if not b.get("size") or not b.get("quant"):
        return None
    try:
        return plan(b["size"], b["quant"], ctx=(row.get("config") or {}).get("n_ctx") or 4096,
                    prompt_tokens=(row.get("config") or {}).get("prompt_tokens", 64), config=b.get("config"),
                    resident=row.get("mapped") is False).min_ram   # rows before "mapped": every load mapped
    except Exception:
        return None


def predicted_rss_for_row(row: dict) -> int | None:
    """Plan's RAM for a bench row's build (None for sizes it does not know)."""
    b = row.get("build", {})
    size, quant = b.get("size"), b.get("quant")
    if not size or not quant or row.get("backend") != "llama.cpp" or row.get("speculative"):
        return None   # a speculative row holds a draft model too, which the row does not size
    try:   # rows from before the runner gave repacked originals back (no released_bytes) kept both copies
        return plan(size, quant, ctx=row.get("n_ctx") or 4096, prompt_tokens=row.get("prompt_tokens", 512),
                    config=b.get("config"),   # a lean load uses no AMX buffer
                    amx="amx_int8" in row.get("device", {}).get("isa", []) and not row.get("lean"),
                    # a load that read the file mapped no originals
                    release=bool(row.get("released_bytes")) or bool(row.get("lean")) or row.get("mapped") is False,
                    kv=row.get("kv", "f16")).peak_ram
    except Exception:
        return None




# --- several devices (llama.cpp RPC): `plan SIZE QUANT --devices 3xraspberry-pi-5-4gb` ----------------

# The network model, assumed (not measured on boards): llama.cpp's RPC split is a pipeline, so each token
# visits every device in turn. Each boundary costs the set-input / compute / get-output round trips of
# ggml-rpc (HOP_S on a wired LAN), and the last device's logits (vocab x 4 bytes) come back over the link.
HOP_S = 0.001
LINK_BYTES_S = 125e6   # 1 Gb/s Ethernet
MAX_POOL = 17          # this machine plus llama.cpp's 16 RPC servers


def parse_pool(spec: str, profiles: dict[str, dict]) -> list[tuple[str, dict]]:
    """'raspberry-pi-5-8gb,2xraspberry-pi-5-4gb' -> [(name, profile)] in order; the first runs the command."""
    import re
    out = []
    for part in (p.strip() for p in spec.split(",")):
        m = re.fullmatch(r"(?:(\d{1,2})x)?([A-Za-z0-9._-]+)", part)
        if not m:
            raise UsageError(f"--devices: {part!r} is not [COUNTx]PROFILE, e.g. 3xraspberry-pi-5-4gb")
        n, name = int(m.group(1) or 1), m.group(2)
        if name not in profiles:
            raise UsageError(f"--devices: unknown device {name!r}; see plan --device list")
        if n < 1:
            raise UsageError(f"--devices: {part!r}: a count of at least 1")
        out += [(name, profiles[name])] * n
    if not 2 <= len(out) <= MAX_POOL:
        raise UsageError(f"--devices: between 2 and {MAX_POOL} devices (this machine and up to 16 workers)")
    return out


@dataclass
class Share:
    device: str
    layers: int
    need: int       # min RAM on this device: its layers, their KV, compute, runtime (+ embeddings / output)
    budget: float
    seconds: float  # its part of one token's decode

    @property
    def fits(self) -> bool:
        return self.need <= self.budget


def plan_pool(size: str, quant: str, pool: list[tuple[str, dict]], ctx: int = 4096) -> dict:
    """Per-device memory and a pipeline decode estimate for a model split by layers over a pool of devices.

    Layers go to devices in proportion to the RAM each has left after its fixed costs, as llama.cpp's
    free-memory split would; the first device also keeps the token embeddings, the last the output layer."""
    from ..formats import FORMATS
    from ..recipes import DEFAULT_ALIASES, get_recipe
    workers = next(f for f in FORMATS.values() if f.workers)   # the format whose engine spreads over devices
    p = plan(size, quant, ctx=ctx)
    cfg = model_config(size)
    q = p.quant if size.lower() in EXTRA_MODELS else get_recipe(size).resolve_quant(quant, workers.name)
    q = DEFAULT_ALIASES.get(q, q)
    tensors = tensor_types(cfg, q)
    n = cfg.num_hidden_layers
    tied = cfg.tie_word_embeddings
    head = 2 if tied else 3
    per_layer = (len(tensors) - head) // n
    layer_bytes = [sum(nbytes(ne, t) for _, _, ne, t in tensors[head + i * per_layer: head + (i + 1) * per_layer])
                   for i in range(n)]
    embd = nbytes(tensors[0][2], tensors[0][3])
    output = embd if tied else nbytes(tensors[2][2], tensors[2][3])
    kv_layer = p.kv_bytes // n
    fixed = [p.compute_bytes + p.runtime_bytes + (embd if i == 0 else 0) + (output if i == len(pool) - 1 else 0)
             for i in range(len(pool))]
    budgets = [d["ram_gib"] * 2**30 * d.get("usable_fraction", 0.8) for _, d in pool]
    room = [max(b - f, 0.0) for b, f in zip(budgets, fixed)]
    total = sum(room) or 1.0
    counts = [int(n * r / total) for r in room]
    for i in sorted(range(len(pool)), key=lambda i: -(n * room[i] / total - counts[i]))[: n - sum(counts)]:
        counts[i] += 1
    per_token_kv = 2 * p.kv_bytes // p.ctx * 512 // n   # KV read per layer per token at a 512-token context

    def split(counts):
        out, start = [], 0
        for i, ((name, d), k) in enumerate(zip(pool, counts)):
            w = sum(layer_bytes[start:start + k])
            start += k
            read = w + k * per_token_kv + (output if i == len(pool) - 1 else 0)
            out.append(Share(f"{name} #{i + 1}" if i else f"{name} (this one)", k, fixed[i] + w + k * kv_layer,
                             budgets[i], read / (d["bandwidth_gbs"] * 1e9 * d.get("efficiency", 0.6))))
        return out
    shares = split(counts)
    for _ in range(n):   # layers differ in size (q4_k_m gives some more bits): move one from a full device
        over = [i for i, s in enumerate(shares) if not s.fits and s.layers]
        spare = max(range(len(shares)), key=lambda i: shares[i].budget - shares[i].need)
        if not over or shares[spare].budget - shares[spare].need < max(layer_bytes) + kv_layer:
            break
        counts[over[0]] -= 1
        counts[spare] += 1
        shares = split(counts)
    network = (len(pool) - 1) * HOP_S + 4 * cfg.vocab_size / LINK_BYTES_S
    compute = sum(s.seconds for s in shares)
    alone = [(name, verdict(p, d)["fits"]) for name, d in dict(pool).items()]
    return {"plan": p, "shares": shares, "fits": all(s.fits for s in shares), "network_s": network,
            "compute_s": compute, "tps": 1 / (compute + network), "alone": alone}


def describe_pool(r: dict) -> str:
    p = r["plan"]
    lines = [f"{p.size} {p.quant} at context {p.ctx} over {len(r['shares'])} devices (llama.cpp RPC, split by layers):",
             f"  {'device':32s} {'layers':>6s} {'needs':>10s} {'budget':>10s}"]
    for s in r["shares"]:
        lines.append(f"  {s.device:32s} {s.layers:>6d} {fmt_gib(s.need):>10s} {fmt_gib(s.budget):>10s}  "
                     f"{'ok' if s.fits else 'DOES NOT FIT'}")
    alone = ", ".join(f"{name} {'fits' if ok else 'does not'}" for name, ok in r["alone"])
    lines += [f"  the pool: {'fits' if r['fits'] else 'does NOT fit'} (min RAM {fmt_gib(p.min_ram)} in all; "
              f"alone: {alone})",
              f"  decode: ~{r['tps']:.2f} tok/s = 1 / ({r['compute_s'] * 1e3:.0f} ms of weights read on each device "
              f"in turn + {r['network_s'] * 1e3:.1f} ms network)",
              f"  network model (assumed): {HOP_S * 1e3:.0f} ms per device boundary per token on a wired LAN, "
              f"logits back over {LINK_BYTES_S * 8 / 1e9:.0f} Gb/s; a pipeline adds memory, not speed"]
    return "\n".join(lines)
