"""The GGUF row's planner: file size from llama.cpp's per-tensor type choices (llama-quant.cpp) for the common file
types; RAM = the weights + CPU repack copies + KV cache at the context + the part of the compute buffer a prompt
touches + the runtime; the bytes a decoded token reads."""
from __future__ import annotations

import gguf

from ...errors import UsageError
from ...schemas import ModelConfig
from ..plan import ARCH, KV_BYTES, Plan, kv_per_position

T = gguf.GGMLQuantizationType
BASE_TYPE = {
    "f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1, "q5_0": T.Q5_0,
    "q5_1": T.Q5_1, "q2_k": T.Q2_K, "q3_k_s": T.Q3_K, "q3_k_m": T.Q3_K, "q3_k_l": T.Q3_K, "q4_k_s": T.Q4_K,
    "q4_k_m": T.Q4_K, "q5_k_s": T.Q5_K, "q5_k_m": T.Q5_K, "q6_k": T.Q6_K, "iq4_nl": T.IQ4_NL, "iq4_xs": T.IQ4_XS,
    "iq3_xxs": T.IQ3_XXS, "iq3_s": T.IQ3_S, "iq3_m": T.IQ3_S, "iq3_xs": T.IQ3_S,
}
# K-quants need rows that are a multiple of 256; llama.cpp falls back to these otherwise.
FALLBACK = {T.Q2_K: T.IQ4_NL, T.Q3_K: T.IQ4_NL, T.IQ4_XS: T.IQ4_NL, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1,
            T.Q6_K: T.Q8_0, T.IQ3_XXS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL}
# Types llama.cpp's CPU backend copies into an interleaved layout at load time. Where the original is not given
# back once copied (pagecache.py does so on Linux) both copies are resident and these weights count twice in
# peak RSS; `release` says which case to predict.
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


METADATA_BYTES = 6 << 20  # vocabulary, merges and chat template in the GGUF header


def plan_gguf(size: str, quant: str, cfg: ModelConfig, ctx: int, prompt_tokens: int, amx: bool = False,
              release: bool = True, resident: bool = False, kv: str = "f16") -> Plan:
    """A GGUF build of cfg as quant (measure/plan.py's plan says what amx, release, resident and kv mean)."""
    if kv not in KV_BYTES:
        raise UsageError(f"--kv {kv}: choose {', '.join(KV_BYTES)}")
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
    kv_pos = kv_per_position(cfg, KV_BYTES[kv])
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
