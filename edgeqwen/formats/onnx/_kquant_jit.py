"""kquant.py's search compiled with numba: the same float32 operations in the same order on each block, one
block at a time across all cores (no GIL), instead of numpy passes over [32, n] chunks. Bit for bit the same
as onnxruntime's quant_tensor_k_quant_cpu (tests/test_onnx.py), and several times faster (README).

Every operation's result is cast to float32 on its own, so none is fused or kept wider: what numpy computes
for float32 arrays, element by element. Imported only when numba is installed (kquant.py falls back to numpy).
"""
import numba as nb
import numpy as np

f32 = np.float32


@nb.njit(inline="always", cache=True)
def _sum32(a):
    """numpy's pairwise order for 32 contiguous float32s (see kquant._sum32)."""
    r0 = f32(f32(f32(a[0] + a[8]) + a[16]) + a[24])
    r1 = f32(f32(f32(a[1] + a[9]) + a[17]) + a[25])
    r2 = f32(f32(f32(a[2] + a[10]) + a[18]) + a[26])
    r3 = f32(f32(f32(a[3] + a[11]) + a[19]) + a[27])
    r4 = f32(f32(f32(a[4] + a[12]) + a[20]) + a[28])
    r5 = f32(f32(f32(a[5] + a[13]) + a[21]) + a[29])
    r6 = f32(f32(f32(a[6] + a[14]) + a[22]) + a[30])
    r7 = f32(f32(f32(a[7] + a[15]) + a[23]) + a[31])
    return f32(f32(f32(r0 + r1) + f32(r2 + r3)) + f32(f32(r4 + r5) + f32(r6 + r7)))


@nb.njit(inline="always", cache=True)
def _block(x, maxq, factors, tmp, w, t, wq):
    """One block's search: (scale, minimum), as onnxruntime's arrays would hold them for this row."""
    lo, hi = f32(0), f32(maxq)
    for j in range(32):
        tmp[j] = f32(x[j] * x[j])
    av = f32(np.sqrt(f32(_sum32(tmp) / f32(32))))
    rmin = x[0]
    rmax = x[0]
    for j in range(32):
        w[j] = f32(av + abs(x[j]))
        rmin = min(rmin, x[j])
        rmax = max(rmax, x[j])
    sum_w = _sum32(w)
    for j in range(32):
        tmp[j] = f32(w[j] * x[j])
    sum_x = _sum32(tmp)
    iscale = f32(f32(maxq) / f32(rmax - rmin)) if rmin != rmax else f32(1)
    scale = f32(f32(1) / iscale)
    for j in range(32):
        q = min(max(np.rint(f32(iscale * f32(x[j] - rmin))), lo), hi)
        d = f32(f32(f32(scale * q) + rmin) - x[j])
        tmp[j] = f32(w[j] * f32(d * d))
    best = _sum32(tmp)
    for k in range(factors.shape[0]):
        isn = f32(factors[k] / f32(rmax - rmin)) if rmin != rmax else f32(1)
        for j in range(32):
            t[j] = min(max(np.rint(f32(isn * f32(x[j] - rmin))), lo), hi)
            wq[j] = f32(w[j] * t[j])
        sum_l = _sum32(wq)
        for j in range(32):
            tmp[j] = f32(wq[j] * x[j])
        sum_xl = _sum32(tmp)
        for j in range(32):
            tmp[j] = f32(wq[j] * t[j])
        sum_l2 = _sum32(tmp)
        det = f32(f32(sum_w * sum_l2) - f32(sum_l * sum_l))
        this_scale = f32(f32(f32(sum_w * sum_xl) - f32(sum_x * sum_l)) / det)
        this_min = f32(f32(f32(sum_l2 * sum_x) - f32(sum_l * sum_xl)) / det)
        for j in range(32):
            d = f32(f32(f32(this_scale * t[j]) + this_min) - x[j])
            tmp[j] = f32(w[j] * f32(d * d))
        mad = _sum32(tmp)
        if mad < best:   # NaN (a zero determinant) never wins, as in numpy
            best = mad
            scale = this_scale
            rmin = this_min
    return scale, rmin


@nb.njit(parallel=True, error_model="numpy", cache=True)
def search(data, maxq, factors, out_q, out_scale, out_zp):
    """data [nb, 32] float32 -> out_q [nb, 32] (float64 or uint8), out_scale [nb, 1] float64, out_zp [nb, 1] uint8."""
    n = data.shape[0]
    per = 256   # blocks per task: scratch allocated once per task
    for c in nb.prange((n + per - 1) // per):
        tmp = np.empty(32, np.float32)
        w = np.empty(32, np.float32)
        t = np.empty(32, np.float32)
        wq = np.empty(32, np.float32)
        for b in range(c * per, min(n, (c + 1) * per)):
            x = data[b]
            scale, rmin = _block(x, maxq, factors, tmp, w, t, wq)
            zp = np.uint8(min(max(np.rint(f32(f32(-rmin) / scale)), f32(0)), f32(maxq)))
            s64 = np.float64(scale)
            for j in range(32):
                out_q[b, j] = min(max(np.rint(np.float64(x[j]) / s64 + np.float64(zp)), 0.0), np.float64(maxq))
            out_scale[b, 0] = s64
            out_zp[b, 0] = zp
