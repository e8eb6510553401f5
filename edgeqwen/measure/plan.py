"""`edgeqwen plan`: predict file size, peak RAM and the decode ceiling of a build before making it.

The model's shape comes from its recipe (or EXTRA_MODELS); each format's memory model is its row's planner
(formats/<format>/plan.py: GGUF from llama.cpp's per-tensor type choices, ONNX from the exporter's initializer
list, MLX from the folder's tensors). Here: devices, verdicts (decode ceiling = bandwidth / bytes read per token),
rendering, and pools of devices (llama.cpp RPC).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import UsageError
from ..formats.gguf.plan import nbytes, tensor_types
from ..formats.mlx.plan import MLX_WORKING_SET
from ..formats.plan import Plan
from ..schemas import ModelConfig, check_typed

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



def model_config(size: str, override: dict | None = None) -> ModelConfig:
    """The typed config of a recipe size or one of EXTRA_MODELS; override: a build manifest's own shape."""
    from ..recipes import get_recipe
    key = size.lower()
    data = dict(EXTRA_MODELS[key]) if key in EXTRA_MODELS else get_recipe(key).hf_config()
    data.update({k: v for k, v in (override or {}).items() if v is not None})
    return check_typed(ModelConfig, data, f"the config of {size}", "a model config")


def plan(size: str, quant: str, ctx: int = 4096, prompt_tokens: int = 512, config: dict | None = None,
         amx: bool = False, release: bool = True, resident: bool = False, kv: str = "f16", parallel: int = 1) -> Plan:
    """Predict a build of `size` (a recipe size or one of EXTRA_MODELS) as `quant`.

    config overrides the recipe's shape (a build's manifest records its checkpoint's own); amx: the CPU
    has AMX-INT8, so llama.cpp keeps a repacked copy of more weight types; release=False: the runner keeps
    the repacked originals resident (before pagecache.py, or where it cannot release them); resident: a
    normal load that reads the file into memory (the runner on Linux) rather than mapping it, as a lean one does.
    kv: the GGUF KV cache type (f16, or q8_0: 34 bytes per 32 values). parallel: conversations served at once
    (serve --parallel), each with a context of ctx: the KV cache is that many times larger.
    """
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
    if parallel > 1 and not fmt.batched:
        raise UsageError(f"--parallel is for builds that decode several conversations at once; {quant} is not one")
    p = fmt.load("planner")(size, quant, cfg, ctx, prompt_tokens, amx=amx, release=release, resident=resident, kv=kv)
    return replace(p, kv_bytes=p.kv_bytes * parallel, parallel=parallel) if parallel > 1 else p


MAX_DEFAULT_SLOTS = 4   # llama-server's automatic slot count (-np -1), and what Ollama's OLLAMA_NUM_PARALLEL picks


def parallel_slots(build: str, ctx: int | None, wanted: int | None, kv: str = "f16",
                   available: int | None = None) -> int:
    """How many conversations `serve` decodes at once for a build whose format batches them: wanted, if plan's
    memory for that many contexts fits in 90% of the memory available now, else a UsageError; not given: the most
    up to MAX_DEFAULT_SLOTS that fit (1 when plan does not know the build's size)."""
    import psutil

    from ..home import resolve_build
    path, manifest = resolve_build(build)
    size = ((manifest or {}).get("recipe") or {}).get("size")
    avail = psutil.virtual_memory().available if available is None else available
    budget = 0.9 * avail

    def need(n: int) -> int | None:
        if not size:
            return None
        try:
            return plan(size, manifest["quant"], ctx=ctx or 4096, config=manifest.get("config"), kv=kv,
                        parallel=n, resident=True).peak_ram
        except UsageError:
            return None
    if wanted is not None:
        b = need(wanted)
        if b is not None and b > budget:
            raise UsageError(f"--parallel {wanted}: {path.name} needs ~{fmt_gib(b)} for {wanted} contexts of "
                             f"{ctx or 4096} tokens (plan), and {fmt_gib(avail)} is available; lower --parallel or "
                             "--ctx")
        return wanted
    fits = [n for n in range(1, MAX_DEFAULT_SLOTS + 1) if (need(n) or budget + 1) <= budget]
    return max(fits) if fits else 1


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
    at = f"{p.parallel} contexts of {p.ctx} (serve --parallel {p.parallel})" if p.parallel > 1 else f"context {p.ctx}"
    lines = [f"{p.size} {p.quant} at {at}: ~{p.params / 1e9:.2f}B parameters",
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
