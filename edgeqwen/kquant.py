"""The int4 k-quant search (llama.cpp's make_qkx: a scale and minimum per 32-weight block, 20 candidate
scales, weighted least squares), computing exactly what onnxruntime's quant_tensor_k_quant_cpu computes,
bit for bit (tests/test_onnx.py compares them), about twice as fast:

- the same float32 operations in the same order on each block, so every comparison decides alike;
- blocks in cache-sized chunks, and every temporary written in place, instead of ~15 full-size arrays per step;
- no record of each step's best quantized block (onnxruntime keeps one with a scatter per step and then
  recomputes the output from the scale and zero point, as here).
"""
from __future__ import annotations

import numpy as np

CHUNK_BLOCKS = 16384   # 2 MiB of float32 weights per pass: stays in cache through a step's dozen passes
STEPS = 20


def kquant_search(data: np.ndarray, num_bits: int = 4, group_size: int = 32, chunk: int = CHUNK_BLOCKS):
    """data -> (quantized values as float64 [nb, group], scales float64 [nb, 1], zero points uint8 [nb, 1]),
    with nb = data.size // group_size: onnxruntime's return values, for its callers."""
    data = np.reshape(data, (-1, group_size)).astype(np.float32)
    nb = data.shape[0]
    maxq, minq = 2**num_bits - 1, 0
    out_q = np.empty((nb, group_size), dtype=np.float64)
    out_scale = np.empty((nb, 1), dtype=np.float64)
    out_zp = np.empty((nb, 1), dtype=np.uint8)
    factors = [np.array([-1 + 0.1 * i + maxq - minq]).astype(np.float32)[0] for i in range(STEPS)]
    with np.errstate(divide="ignore", invalid="ignore"):   # constant blocks divide by zero there too
        for c0 in range(0, nb, chunk):
            _chunk(data[c0:c0 + chunk], c0, maxq, minq, group_size, factors, out_q, out_scale, out_zp)
    return out_q, out_scale, out_zp


def _chunk(x, c0, maxq, minq, group_size, factors, out_q, out_scale, out_zp):
    """One cache-sized run of blocks, written into the outputs at row c0."""
    n = x.shape[0]
    sum_x2 = np.sum(x**2, axis=1, keepdims=True)
    av_x = np.sqrt(sum_x2 / group_size)
    w = np.add(av_x, np.abs(x))
    rmin = np.min(x, axis=1, keepdims=True)
    rmax = np.max(x, axis=1, keepdims=True)
    sum_w = np.sum(w, axis=1, keepdims=True)
    sum_x = np.sum(w * x, axis=1, keepdims=True)
    iscale = np.ones(rmax.shape, dtype=np.float32)
    mask = rmin != rmax
    iscale[mask] = (maxq - minq) / (rmax[mask] - rmin[mask])
    scale = 1 / iscale
    q = np.clip(np.round(iscale * (x - rmin)), minq, maxq)
    diff = scale * q + rmin - x
    best = np.sum(w * diff**2, axis=1, keepdims=True)
    t = np.empty_like(x)
    wq = np.empty_like(x)
    tmp = np.empty_like(x)
    for factor in factors:
        isn = np.ones(rmax.shape, dtype=np.float32)
        mask = rmin != rmax
        isn[mask] = factor / (rmax[mask] - rmin[mask])
        np.subtract(x, rmin, out=t)
        np.multiply(isn, t, out=t)
        np.round(t, out=t)
        np.clip(t, minq, maxq, out=t)            # t = quant_data_new
        np.multiply(w, t, out=wq)
        sum_l = np.sum(wq, axis=1, keepdims=True)
        np.multiply(wq, t, out=tmp)
        sum_l2 = np.sum(tmp, axis=1, keepdims=True)
        np.multiply(wq, x, out=tmp)
        sum_xl = np.sum(tmp, axis=1, keepdims=True)
        D = np.subtract(sum_w * sum_l2, sum_l**2)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        np.multiply(this_scale, t, out=tmp)
        np.add(tmp, this_min, out=tmp)
        np.subtract(tmp, x, out=tmp)
        np.square(tmp, out=tmp)
        np.multiply(w, tmp, out=tmp)
        mad = np.sum(tmp, axis=1, keepdims=True)
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
    out_q[c0:c0 + n] = qw
    out_scale[c0:c0 + n] = s64
    out_zp[c0:c0 + n] = zp
