"""Hugging Face safetensors -> ONNX decoder for onnxruntime-genai, streamed weight by weight.

The graph is the one onnxruntime-genai's model builder writes for Qwen2 on the CPU (fused QKV
MatMul + bias, GroupQueryAttention with rotary embedding, Skip/SimplifiedLayerNormalization,
int4/int8 MatMulNBits with accuracy level 4, a tied embedding read through GatherBlockQuantized),
quantized as the builder's options would (PRECISIONS). Unlike the builder it never holds the
model: each weight is read from memory-mapped safetensors in row blocks (the next block read ahead in a
thread), quantized block by block with onnxruntime's own functions (round-to-nearest) or kquant.py's
bit-exact k-quant search, and appended to the external-data file, so peak RSS is a few hundred MB at any
size
(fp32, which transposes whole matrices, is the exception and is only a reference).

One module on purpose: the graph's node names and the weight writer's initializer names must agree one
for one. What each precision writes, and how many bytes, is data in layout.py (plan reads it too).
"""
from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi import _pybind_state as ort_c

from ...checkpoints import Checkpoint, copy_tokenizer
from ...errors import BuildError, SourceError
from .layout import ALIGN, BLOCK, PRECISIONS, file_bytes, initializers, padding, promoted_layers
from ...checkpoints.safetensors import Reader, to_f32
from ...schemas import ModelConfig


# MatMulNBits with int8 activations; lower levels decode many times slower on CPU.
ACCURACY_LEVEL = 4
DATA_FILE = "model.onnx.data"
MS = "com.microsoft"


def output_size(ckpt: Checkpoint, precision: str) -> int:
    """Bytes the model files will take (exact up to alignment padding)."""
    shapes = {n: tuple(i.shape) for n, i in ckpt.tensors.items()}
    return file_bytes(initializers(shapes, ckpt.config, precision)) + padding(ckpt.n_layers)


def peak_estimate(ckpt: Checkpoint, precision: str) -> int:
    """Rough peak RSS of export(): a base plus what the largest weight needs in flight."""
    c = ckpt.config
    h, v = c.hidden_size, c.vocab_size
    base = 400 << 20
    sc = PRECISIONS[precision]
    if sc.bits is None:  # whole fp32 matrices are transposed in memory
        biggest = max(info.n_elements for info in ckpt.tensors.values())
        return base + 3 * biggest * 4
    if sc.algo == "k_quant":
        from ...process import physical_cores
        base += KQUANT_ELEMENTS * 4 * 24 * physical_cores()  # the search's temporaries, one set per thread
    return base + v * (h // BLOCK) * 5  # the lm_head scales (and zero points) are gathered before they are written


class _DataFile:
    """Appends tensors to the external-data file and hands back TensorProtos that point into it."""

    def __init__(self, path: Path, on_bytes: Callable[[int], None] | None = None):
        self.path = path
        self.f = open(path, "wb")
        self.on_bytes = on_bytes

    def add(self, name: str, dtype, shape: tuple[int, ...], chunks: Iterable[np.ndarray]) -> TensorProto:
        pos = self.f.tell()
        if pos % ALIGN:
            self.f.write(b"\0" * (ALIGN - pos % ALIGN))
        off = self.f.tell()
        try:
            for c in chunks:
                c = np.ascontiguousarray(c, dtype=dtype)
                self.f.write(memoryview(c).cast("B"))
                if self.on_bytes:
                    self.on_bytes(c.nbytes)
        finally:   # a failed write stops the threads reading ahead now, not when the traceback is freed
            getattr(chunks, "close", lambda: None)()
        length = self.f.tell() - off
        want = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if length != want:
            raise BuildError(f"ONNX export: {name} wrote {length} bytes, its shape {shape} needs {want}")
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        t.dims.extend(shape)
        t.data_location = TensorProto.EXTERNAL
        for k, val in (("location", self.path.name), ("offset", str(off)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = k, val
        return t

    def close(self) -> None:
        self.f.close()


@dataclass
class _Weights:
    """Source tensors as fp32 row blocks ([rows, K], HF layout: out_features x in_features)."""
    reader: Reader

    def rows(self, name: str) -> Iterator[np.ndarray]:
        dtype = self.reader.tensors[name].dtype
        for chunk in self.reader.chunks(name):
            yield to_f32(chunk, dtype)

    def full(self, name: str) -> np.ndarray:
        return np.concatenate(list(self.rows(name)), axis=0)


def _quantize_rows(w: np.ndarray, bits: int, algo: str = "rtn") -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """[n, K] fp32 -> MatMulNBits blobs [n, K/32, 32*bits/8], scales [n, K/32] and packed zero points (None
    when symmetric)."""
    if algo == "k_quant":
        return _kquant_rows(w, bits)
    n, k = w.shape
    blocks = -(-k // BLOCK)
    wt = np.ascontiguousarray(w.T)  # the kernels take the MatMul's [K, N] layout
    if blocks * BLOCK != k:
        wt = np.pad(wt, ((0, blocks * BLOCK - k), (0, 0)))
    packed = np.zeros((n, blocks, BLOCK * bits // 8), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    zp = np.zeros((n, (blocks + 8 // bits - 1) // (8 // bits)), dtype=np.uint8)
    fn = ort_c.quantize_matmul_4bits if bits == 4 else ort_c.quantize_matmul_8bits
    fn(packed, wt, scales, zp, BLOCK, n, k, True)
    return packed, scales, None


KQUANT_ELEMENTS = 1 << 21  # rows are k-quantized this many weights at a time: its search makes ~10 temporaries


def _kquant_rows(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """onnxruntime's k_quant (llama.cpp's make_qkx search for each block's scale and minimum; kquant.py computes
    it bit for bit, faster), packed as the builder packs it: low nibble first, zero points two to a byte along
    the row."""
    from .kquant import jit, quantize_rows
    n, k = w.shape
    blocks = -(-k // BLOCK)
    if blocks * BLOCK != k:
        w = np.pad(w, ((0, 0), (0, blocks * BLOCK - k)))
    step = max(1, KQUANT_ELEMENTS // (blocks * BLOCK))
    starts = range(0, n, step)
    pool = None if jit() else _kquant_pool()   # compiled, the search already runs on every core
    if pool is None:
        parts = [quantize_rows(w[r:r + step], bits, BLOCK) for r in starts]
    else:
        from concurrent.futures.process import BrokenProcessPool
        try:
            parts = list(pool.map(quantize_rows, (w[r:r + step] for r in starts), [bits] * len(starts),
                                  [BLOCK] * len(starts)))
        except BrokenProcessPool:
            _kquant_pool.cache_clear()
            raise BuildError("a k-quant worker process died (killed for memory?); nothing was installed") from None
    q, zp = np.concatenate([p[0] for p in parts]), np.concatenate([p[2] for p in parts])
    if bits == 4:
        q = q[..., ::2] | (q[..., 1::2] << 4)
        if blocks % 2:
            zp = np.pad(zp, ((0, 0), (0, 1)), constant_values=8)
        zp = zp[:, ::2] | (zp[:, 1::2] << 4)
    return q, np.concatenate([p[1] for p in parts]), zp


@functools.cache
def _kquant_pool():
    """Worker processes for the numpy k-quant search (without numba), one per core (None on one core). Not
    threads: the search is ~30 numpy calls per step on small arrays, and two threads spent most of their time
    waiting for the GIL (1.2x one thread on two cores, measured); processes get ~2x. Spawned, not forked: the
    exporter has threads and mapped files open."""
    import multiprocessing

    from ...process import physical_cores
    n = physical_cores()
    if n < 2:
        return None
    from concurrent.futures import ProcessPoolExecutor
    return ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"))


def _ahead(items: Iterable) -> Iterator:
    """`items`, produced one step ahead in a thread: the next rows are read and converted (and the next
    blobs quantized) while this thread quantizes (writes) the current ones. numpy drops the GIL inside
    each operation, so on two cores the serial parts of the export hide behind the k-quant search."""
    import queue
    import threading
    q: queue.Queue = queue.Queue(maxsize=1)
    end = object()
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put((item, None))
            q.put((end, None))
        except BaseException as e:  # noqa: BLE001  handed to the consumer, which raises it
            q.put((end, e))
        finally:   # a generator ends here, in its own thread: its own read-ahead stops before the reader closes
            getattr(items, "close", lambda: None)()
    t = threading.Thread(target=produce, daemon=True, name="edgeqwen-ahead")
    t.start()
    try:
        while True:
            item, err = q.get()
            if item is end:
                if err is not None:
                    raise err
                return
            yield item
    finally:   # the consumer stopped early (or failed): unblock the producer and let it end
        stop.set()
        while t.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass


class _Graph:
    """Nodes and initializers; weights come from the checkpoint and go straight to the data file."""

    def __init__(self, data: _DataFile, w: _Weights):
        self.nodes, self.inits, self.data, self.w = [], [], data, w
        self.consts: set[str] = set()

    def node(self, op: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "",
             outputs: list[str] | None = None, **attrs) -> list[str]:
        outs = outputs or [f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain, **attrs))
        return outs

    def const(self, value) -> str:
        arr = np.array(value, dtype=np.int64)
        key = f"/constants/INT64/{arr.tolist()}"
        if key not in self.consts:
            self.inits.append(numpy_helper.from_array(arr, key))
            self.consts.add(key)
        return key

    def tensor(self, name: str, dtype, shape, chunks) -> str:
        self.inits.append(self.data.add(name, dtype, tuple(shape), chunks))
        return name

    def quantized(self, base: str, sources: list[str], k: int, bits: int, algo: str = "rtn",
                  rows: bool = False) -> tuple:
        """concat(sources) as MatMulNBits blobs (streamed), scales and zero points (written after), named
        base + the builder's suffixes; returns (blobs, scales, zero points or "", N, bits). rows: the blobs
        as N rows of bytes, the shape GatherBlockQuantized reads, instead of MatMulNBits' N x blocks x bytes."""
        n = sum(self.w.reader.tensors[s].shape[0] for s in sources)
        blocks = -(-k // BLOCK)
        scales: list[np.ndarray] = []
        zps: list[np.ndarray] = []

        def blobs():
            for s in sources:
                for rows in _ahead(self.w.rows(s)):
                    packed, sc, zp = _quantize_rows(rows, bits, algo)
                    scales.append(sc)
                    if zp is not None:
                        zps.append(zp)
                    yield packed
        # the builder's initializer names for each algorithm, so graphs stay comparable
        suffix = f"_Q{bits}" if algo == "rtn" else f"_Q{bits}G{BLOCK}"
        shape = (n, blocks * BLOCK * bits // 8) if rows else (n, blocks, BLOCK * bits // 8)
        q = self.tensor(f"{base}{suffix}", np.uint8, shape, _ahead(blobs()))
        s = self.tensor(f"{base}_scale{'s' if algo == 'rtn' else ''}", np.float32, (n, blocks), scales)
        zp = ""
        if zps:
            zp = self.tensor(f"{base}_zp", np.uint8, (n, zps[0].shape[1]), zps)
        return q, s, zp, n, bits

    def nbits(self, x: str, weight: tuple, name: str, k: int, out: str | None = None) -> str:
        q, s, zp, n, bits = weight
        return self.node("MatMulNBits", [x, q, s] + ([zp] if zp else []), f"/{name}/MatMul_Q{bits}", domain=MS,
                         K=k, N=n, bits=bits, block_size=BLOCK, accuracy_level=ACCURACY_LEVEL,
                         outputs=[out] if out else None)[0]

    def matmul(self, x: str, name: str, sources: list[str], k: int, bits: int | None, algo: str = "rtn",
               out: str | None = None) -> str:
        """x @ concat(sources).T: MatMulNBits, or a plain fp32 MatMul when bits is None."""
        if bits is not None:
            return self.nbits(x, self.quantized(f"{name}.MatMul.weight", sources, k, bits, algo), name, k, out)
        mat = np.concatenate([self.w.full(s) for s in sources], axis=0).T
        wname = self.tensor(f"{name}.MatMul.weight", np.float32, mat.shape, [mat])
        del mat
        return self.node("MatMul", [x, wname], f"/{name}/MatMul", outputs=[out] if out else None)[0]


def _rope_cache(config: ModelConfig, head: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_positions, head/2] computed in fp32 as transformers does."""
    theta = float(config.rope_theta)
    inv = (1.0 / (theta ** (np.arange(0, head, 2, dtype=np.int64).astype(np.float32) / head))).astype(np.float32)
    t = np.arange(config.max_position_embeddings, dtype=np.float32)
    freqs = np.outer(t, inv).astype(np.float32)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def _check_supported(ckpt: Checkpoint) -> None:
    c = ckpt.config
    if c.rope_kind not in (None, "default"):   # the rotary cache below is plain rope only
        raise BuildError(f"ONNX export does not support rope_scaling {c.rope_kind!r}; build a GGUF instead")
    if c.extra("use_sliding_window"):
        raise BuildError("ONNX export does not support sliding-window attention; build a GGUF instead")


def export(ckpt: Checkpoint, out_dir: Path, precision: str, progress: Callable[[int], None] | None = None) -> dict:
    """Write model.onnx, model.onnx.data, genai_config.json and the tokenizer into out_dir."""
    if precision not in PRECISIONS:
        raise BuildError(f"ONNX precisions are {', '.join(PRECISIONS)}, not {precision}")
    _check_supported(ckpt)
    scheme = PRECISIONS[precision]
    bits, algo = scheme.bits, scheme.algo
    c = ckpt.config
    hidden, vocab, n_layers = c.hidden_size, c.vocab_size, ckpt.n_layers
    n_heads, n_kv = c.num_attention_heads, c.num_key_value_heads
    head = c.head_size
    eps = float(c.rms_norm_eps)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = _DataFile(out_dir / DATA_FILE, progress)
    reader = ckpt.reader()
    w = _Weights(reader)
    g = _Graph(data, w)
    try:
        # Attention-mask bookkeeping GroupQueryAttention wants: per-row lengths - 1, and the total length.
        msum = g.node("ReduceSum", ["attention_mask", g.const([1])], "/mask/ReduceSum", keepdims=0)[0]
        seqlens = g.node("Cast", [g.node("Sub", [msum, g.const(1)], "/mask/Sub")[0]], "/mask/seqlens_k",
                         to=TensorProto.INT32)[0]
        total = g.node("Cast", [g.node("Gather", [g.node("Shape", ["attention_mask"], "/mask/Shape")[0], g.const(1)],
                                       "/mask/Gather", axis=0)[0]], "/mask/total_len", to=TensorProto.INT32)[0]
        cos, sin = _rope_cache(c, head)
        g.tensor("cos_cache", np.float32, cos.shape, [cos])
        g.tensor("sin_cache", np.float32, sin.shape, [sin])
        del cos, sin

        lm_src = "model.embed_tokens.weight" if ckpt.tied else "lm_head.weight"
        shared = ckpt.tied and bits == 4 and scheme.head_bits() == 4 and algo == "rtn"
        if ckpt.tied and bits == 4:
            # A tied int4 embedding is read through GatherBlockQuantized (int4 only). With an int4 lm_head the
            # table is lm_head's own blobs (as the builder does), so lm_head is written first, and a Reshape
            # shows them as rows. onnxruntime folds that Reshape into a copy it holds (the 1.5B int4 held 112 MiB
            # more anonymous memory), so a table of its own is written as rows and stays a mapped file, a row
            # read per token.
            emb_q = g.quantized("lm_head.MatMul.weight" if shared else "model.embed_tokens.weight", [lm_src], hidden, 4,
                                rows=not shared)
            lm_q = emb_q if shared else None
            table = emb_q[0]
            if shared:
                table = g.node("Reshape", [emb_q[0], g.const([vocab, -(-hidden // BLOCK) * BLOCK // 2])],
                               "/model/embed_tokens/Reshape")[0]
            x = g.node("GatherBlockQuantized", [table, "input_ids", emb_q[1]],
                       "/model/embed_tokens/GatherBlockQuantized", domain=MS, bits=4, block_size=BLOCK, gather_axis=0,
                       quantize_axis=1)[0]
        else:
            emb = g.tensor("model.embed_tokens.weight", np.float32, (vocab, hidden),
                           w.rows("model.embed_tokens.weight"))
            x = g.node("Gather", [emb, "input_ids"], "/model/embed_tokens/Gather")[0]

        def norm_w(name):
            return g.tensor(name, np.float32, ckpt.tensors[name].shape, w.rows(name))

        residual, pending = x, None
        inputs, outputs = [], []
        promoted = promoted_layers(n_layers) if scheme.mixed else set()
        for i in range(n_layers):
            p = f"model.layers.{i}"
            sensitive = scheme.mixed if i in promoted else bits  # qkv and down_proj
            w_in = norm_w(f"{p}.input_layernorm.weight")
            if pending is None:
                h = g.node("SimplifiedLayerNormalization", [residual, w_in], f"/{p}/input_layernorm", axis=-1,
                           epsilon=eps, stash_type=1)[0]
            else:
                o = g.node("SkipSimplifiedLayerNormalization", [residual, pending, w_in], f"/{p}/input_layernorm",
                           n_out=4, domain=MS, epsilon=eps)
                h, residual = o[0], o[3]
            a = f"{p}.self_attn"
            qkv = g.matmul(h, f"{p}.attn.qkv_proj", [f"{a}.{t}_proj.weight" for t in "qkv"], hidden, sensitive, algo)
            if ckpt.arch.attention_bias:
                bias = g.tensor(f"{p}.attn.qkv_proj.Add.bias", np.float32, ((n_heads + 2 * n_kv) * head,),
                                (np.concatenate([w.full(f"{a}.{t}_proj.bias").ravel() for t in "qkv"]),))
                qkv = g.node("Add", [qkv, bias], f"/{p}/attn/qkv_proj/Add")[0]
            pk, pv = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
            inputs += [pk, pv]
            outputs += [f"present.{i}.key", f"present.{i}.value"]
            ctx = g.node("GroupQueryAttention", [qkv, "", "", pk, pv, seqlens, total, "cos_cache", "sin_cache"],
                         f"/{p}/attn/GroupQueryAttention", domain=MS,
                         outputs=[f"/{p}/attn/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"],
                         num_heads=n_heads, kv_num_heads=n_kv, scale=1.0 / math.sqrt(head), local_window_size=-1,
                         softcap=0.0, do_rotary=1, rotary_interleaved=0)[0]
            attn = g.matmul(ctx, f"{p}.attn.o_proj", [f"{a}.o_proj.weight"], n_heads * head, bits, algo)
            w_post = norm_w(f"{p}.post_attention_layernorm.weight")
            o = g.node("SkipSimplifiedLayerNormalization", [residual, attn, w_post], f"/{p}/post_attention_layernorm",
                       n_out=4, domain=MS, epsilon=eps)
            h, residual = o[0], o[3]
            m = f"{p}.mlp"
            gate = g.matmul(h, f"{m}.gate_proj", [f"{m}.gate_proj.weight"], hidden, bits, algo)
            up = g.matmul(h, f"{m}.up_proj", [f"{m}.up_proj.weight"], hidden, bits, algo)
            act = g.node("Mul", [gate, g.node("Sigmoid", [gate], f"/{m}/act/Sigmoid")[0]], f"/{m}/act/Mul")[0]
            prod = g.node("Mul", [act, up], f"/{m}/Mul")[0]
            inter = ckpt.tensors[f"{m}.down_proj.weight"].shape[1]
            pending = g.matmul(prod, f"{m}.down_proj", [f"{m}.down_proj.weight"], inter, sensitive, algo)

        o = g.node("SkipSimplifiedLayerNormalization", [residual, pending, norm_w("model.norm.weight")],
                   "/model/norm", n_out=4, domain=MS, epsilon=eps)
        if shared:
            g.nbits(o[0], lm_q, "lm_head", hidden, out="logits")
        elif bits is None and ckpt.tied:
            wt = g.node("Transpose", ["model.embed_tokens.weight"], "/lm_head/Transpose", perm=[1, 0])[0]
            g.node("MatMul", [o[0], wt], "/lm_head/MatMul", outputs=["logits"])
        else:
            g.matmul(o[0], "lm_head", [lm_src], hidden, scheme.head_bits(), algo, out="logits")
    finally:
        reader.close()
        data.close()
        if _kquant_pool.cache_info().currsize:   # its workers end with the export, not at interpreter exit
            pool = _kquant_pool()
            _kquant_pool.cache_clear()
            if pool is not None:
                pool.shutdown(cancel_futures=True)

    f32 = TensorProto.FLOAT
    kv_shape = ["batch_size", n_kv, "past_sequence_length", head]
    graph = helper.make_graph(
        g.nodes, "qwen2",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])]
        + [helper.make_tensor_value_info(n, f32, kv_shape) for n in inputs],
        [helper.make_tensor_value_info("logits", f32, ["batch_size", "sequence_length", vocab])]
        + [helper.make_tensor_value_info(n, f32, ["batch_size", n_kv, "total_sequence_length", head]) for n in outputs],
        initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)],
                              producer_name="edgeqwen", ir_version=10)
    onnx.save_model(model, out_dir / "model.onnx")
    write_genai_config(ckpt, out_dir)
    copy_tokenizer(ckpt.path, out_dir, also=("config.json",))
    return {"nodes": len(g.nodes), "initializers": len(g.inits),
            "bytes": (out_dir / "model.onnx").stat().st_size + (out_dir / DATA_FILE).stat().st_size}


def write_genai_config(ckpt: Checkpoint, out_dir: Path) -> None:
    c = ckpt.config
    gen = {}
    if (ckpt.path / "generation_config.json").exists():
        from ...schemas import read_json
        gen = read_json(ckpt.path / "generation_config.json", "generation_config.json")
        if not isinstance(gen, dict):
            raise SourceError(f"{ckpt.path / 'generation_config.json'}: not a JSON object")
    eos = gen.get("eos_token_id", c.eos_token_id)
    n_heads = c.num_attention_heads
    ctx = c.max_position_embeddings
    cfg = {
        "model": {
            "bos_token_id": gen.get("bos_token_id", c.bos_token_id),
            "eos_token_id": eos,
            "pad_token_id": gen.get("pad_token_id", c.extra("pad_token_id", eos[-1] if isinstance(eos, list) else eos)),
            "context_length": ctx,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": c.head_size,
                "hidden_size": c.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": n_heads,
                "num_hidden_layers": ckpt.n_layers,
                "num_key_value_heads": c.num_key_value_heads,
            },
            "type": ckpt.arch.name,
            "vocab_size": c.vocab_size,
        },
        "search": {
            "do_sample": bool(gen.get("do_sample", False)), "num_beams": 1, "num_return_sequences": 1,
            "max_length": ctx, "min_length": 0, "past_present_share_buffer": True,
            "temperature": float(gen.get("temperature", 1.0)), "top_k": int(gen.get("top_k", 50)),
            "top_p": float(gen.get("top_p", 1.0)), "repetition_penalty": float(gen.get("repetition_penalty", 1.0)),
            "early_stopping": True, "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0,
        },
    }
    (out_dir / "genai_config.json").write_text(json.dumps(cfg, indent=4) + "\n")


if __name__ == "__main__":  # python -m edgeqwen.formats.onnx.export CHECKPOINT OUT_DIR PRECISION (build benchmark)
    import sys

    from ...checkpoints import open_checkpoint
    print(json.dumps(export(open_checkpoint(Path(sys.argv[1])), Path(sys.argv[2]), sys.argv[3])))
