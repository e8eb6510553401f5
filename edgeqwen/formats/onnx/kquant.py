"""The int4 k-quant search (llama.cpp's make_qkx: a scale and minimum per 32-weight block, 20 candidate
scales, weighted least squares), computing exactly what onnxruntime's quant_tensor_k_quant_cpu computes,
bit for bit (tests/test_onnx.py compares them), about twice as fast:

- the same float32 operations in the same order on each block, so every comparison decides alike; the
  per-block sums are numpy's own pairwise order for 32 elements (8 running sums, then a tree), spelled out;
- blocks laid out across (a [32, n] chunk), so every operation runs on long contiguous rows instead of
  numpy's slow inner loops over 32 elements with a per-block operand;
- blocks in cache-sized chunks, and every temporary written in place;
- no record of each step's best quantized block (onnxruntime keeps one with a scatter per step and then
  recomputes the output from the scale and zero point, as here).

With numba installed (the onnx extra has it) the same search runs compiled, a block at a time on every core
(_kquant_jit.py); this numpy version is the fallback and the readable statement of the order of operations.
"""
from __future__ import annotations

import functools
import os

import numpy as np

CHUNK_BLOCKS = 2048    # 256 KiB of float32 weights per array: the step's arrays stay in L2
STEPS = 20


def kquant_search(data: np.ndarray, num_bits: int = 4, group_size: int = 32, chunk: int = CHUNK_BLOCKS,
                  impl: str | None = None):
    """data -> (quantized values as float64 [nb, group], scales float64 [nb, 1], zero points uint8 [nb, 1]),
    with nb = data.size // group_size: onnxruntime's return values, for its callers. impl: "jit" (numba),
    "numpy", or None for jit when numba is installed."""
    data, factors, maxq = _prepare(data, num_bits, group_size)
    nb = data.shape[0]
    out_q = np.empty((nb, group_size), dtype=np.float64)
    out_scale = np.empty((nb, 1), dtype=np.float64)
    out_zp = np.empty((nb, 1), dtype=np.uint8)
    if (impl or ("jit" if jit() else "numpy")) == "jit":
        if not jit():
            raise RuntimeError("the compiled k-quant search needs numba")
        jit().search(data, maxq, np.array(factors, dtype=np.float32), out_q, out_scale, out_zp)
        return out_q, out_scale, out_zp
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):   # constant blocks divide by zero there too
        for c0 in range(0, nb, chunk):
            _chunk(data[c0:c0 + chunk], c0, maxq, 0, factors, out_q, out_scale, out_zp)
    return out_q, out_scale, out_zp


def _prepare(data, num_bits, group_size):
    if group_size != 32:
        raise ValueError("kquant_search spells out numpy's summation order for blocks of 32")
    maxq = 2**num_bits - 1
    factors = [np.array([-1 + 0.1 * i + maxq]).astype(np.float32)[0] for i in range(STEPS)]
    return np.ascontiguousarray(np.reshape(data, (-1, group_size)), dtype=np.float32), factors, maxq


@functools.cache
def jit():
    """The numba-compiled search (edgeqwen/formats/onnx/_kquant_jit.py), or None without numba
    (EDGEQWEN_KQUANT=numpy also says no)."""
    if os.environ.get("EDGEQWEN_KQUANT") == "numpy":
        return None
    try:
        from . import _kquant_jit
    except ImportError:
        return None
    return _kquant_jit


def quantize_rows(rows: np.ndarray, num_bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[n, k] float32 rows -> (values uint8 [n, k/group, group], scales float32 [n, k/group], zero points uint8
    [n, k/group]): the search in the shapes MatMulNBits packs, small enough to send between processes."""
    n, k = rows.shape
    blocks = k // group_size
    if jit():   # straight into uint8: the values are whole numbers in [0, maxq]
        data, factors, maxq = _prepare(rows, num_bits, group_size)
        q = np.empty((n * blocks, group_size), dtype=np.uint8)
        sc = np.empty((n * blocks, 1), dtype=np.float64)
        zp = np.empty((n * blocks, 1), dtype=np.uint8)
        jit().search(data, maxq, np.array(factors, dtype=np.float32), q, sc, zp)
    else:
        q, sc, zp = kquant_search(rows, num_bits, group_size, impl="numpy")
    return (q.astype(np.uint8).reshape(n, blocks, group_size), sc.astype(np.float32).reshape(n, blocks),
            zp.reshape(n, blocks))


def _sum32(a: np.ndarray) -> np.ndarray:
    """[32, n] -> [n]: each column summed in exactly the order numpy sums a contiguous run of 32 float32s
    (pairwise_sum: r[j] = a[j] + a[j+8] + a[j+16] + a[j+24], then ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7)))."""
    r = a[0:8] + a[8:16]
    r += a[16:24]
    r += a[24:32]
    p = r[0::2] + r[1::2]
    q = p[0::2] + p[1::2]
    return q[0] + q[1]


def _chunk(xr, c0, maxq, minq, factors, out_q, out_scale, out_zp):
    """One cache-sized run of blocks, written into the outputs at row c0."""
    n = xr.shape[0]
    x = np.ascontiguousarray(xr.T)                     # [32, n]: a block per column
    sum_x2 = _sum32(x**2)
    av_x = np.sqrt(sum_x2 / 32)
    w = np.add(av_x, np.abs(x))
    rmin = np.min(x, axis=0)
    rmax = np.max(x, axis=0)
    sum_w = _sum32(w)
    sum_x = _sum32(w * x)
    mask = rmin != rmax
    iscale = np.where(mask, (maxq - minq) / (rmax - rmin), np.float32(1))
    scale = 1 / iscale
    q = np.clip(np.round(iscale * (x - rmin)), minq, maxq)
    diff = scale * q + rmin - x
    best = _sum32(w * diff**2)
    lo, hi = np.float32(minq), np.float32(maxq)        # float32 bounds: clip then needs no casting
    t = np.empty_like(x)
    wq = np.empty_like(x)
    tmp = np.empty_like(x)
    for factor in factors:
        isn = np.where(rmin != rmax, factor / (rmax - rmin), np.float32(1))
        np.subtract(x, rmin, out=t)
        np.multiply(isn, t, out=t)
        np.round(t, out=t)
        np.clip(t, lo, hi, out=t)                      # this step's quantized blocks
        np.multiply(w, t, out=wq)
        sum_l = _sum32(wq)
        np.multiply(wq, x, out=tmp)
        sum_xl = _sum32(tmp)
        np.multiply(wq, t, out=wq)                     # w*q*q, in place: wq is not needed again this step
        sum_l2 = _sum32(wq)
        d = np.subtract(sum_w * sum_l2, sum_l**2)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / d
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d
        np.multiply(this_scale, t, out=tmp)
        np.add(tmp, this_min, out=tmp)
        np.subtract(tmp, x, out=tmp)
        np.square(tmp, out=tmp)
        np.multiply(w, tmp, out=tmp)
        mad = _sum32(tmp)
        better = mad < best
        np.copyto(best, mad, where=better)
        np.copyto(scale, this_scale, where=better)
        np.copyto(rmin, this_min, where=better)
    zp = np.clip(((-rmin) / scale).round(), 0, maxq).astype("uint8")
    s64 = scale.astype(np.float64)
    qw = np.divide(x, s64)
    np.add(qw, zp, out=qw)
    np.round(qw, out=qw)
    np.clip(qw, minq, maxq, out=qw)
    out_q[c0:c0 + n] = qw.T
    out_scale[c0:c0 + n, 0] = s64
    out_zp[c0:c0 + n, 0] = zp
