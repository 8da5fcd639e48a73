"""numba-cuda kernels: the CPU kernels' API and accuracy contract on NVIDIA GPUs.

Import this module only when the CUDA backend is wanted (``cestudy.backends.require_cuda``); it
needs NVIDIA's ``numba-cuda`` package and a GPU, or the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1`` set before numba is imported), in which CI runs every kernel.

Design:
- Softmax-family kernels give one block to a row. Each thread reads its strided share of the row
  once, keeping an online (max, sum) state (Milakov & Gimelshein 2018): the sum of the terms below
  its running maximum and the count of terms equal to it, rescaled by exp(m_old - m_new) when the
  maximum grows, so S = sum_{j != k} exp(x_j - m) never comes from (1 + S) - 1. Thread states
  merge in a shared-memory tree (the simulator has no warp shuffles; the same tree runs on a GPU).
- All arithmetic is float64 with the differences x_j - m exact (two-sum) and per-thread sums
  compensated (Neumaier), as on the CPU, so the results meet the same 4-ulp contract. Only libm
  functions without fastmath are used: fastmath would turn exp into __expf (about 100 ulp at
  x = -87).
- The fused kernels read the row a second time to write the gradient, optionally in place into
  the logits buffer (``inplace=True`` in :func:`device_loss`, as Liger-Kernel does) to halve
  memory.
- Element-wise kernels (BCE with logits, sigmoid focal) use one thread per element.

The host wrappers have the signatures of ``cestudy.kernels.cpu`` (numpy in, numpy out), so
``cestudy.api`` calls either module the same way; :func:`device_loss` serves device arrays
(anything with ``__cuda_array_interface__``) and returns device arrays, with no host round trip.
"""
from __future__ import annotations

import math
import os

import numpy as np
from numba import cuda, float64, int64

from . import scalar

_dev = cuda.jit(device=True)
two_diff = _dev(scalar.two_diff)
exp_dd = _dev(scalar.exp_dd)
softplus = _dev(scalar.softplus)
sigmoid = _dev(scalar.sigmoid)
neumaier_add = _dev(scalar.neumaier_add)
pow_nonneg = _dev(scalar.pow_nonneg)
EXP_UNDERFLOW = scalar.EXP_UNDERFLOW

# Threads per block for the row kernels: a power of two (the tree reduction halves it). Tests in
# the simulator lower it so that several blocks run quickly.
MAX_THREADS = 1024


def threads_per_block(n_classes: int = 0) -> int:
    """Threads per block for the row kernels: $CESTUDY_CUDA_THREADS when set (tests lower it for
    the simulator), else 1024: fastest at every shape of the H200 run in reports/cuda.md,
    which compares 256, 512 and 1024."""
    env = os.environ.get("CESTUDY_CUDA_THREADS")
    t = int(env) if env else 1024
    if t < 1 or t > MAX_THREADS or t & (t - 1):
        raise ValueError(f"CESTUDY_CUDA_THREADS must be a power of two in 1..{MAX_THREADS}; "
                         f"got {t}")
    return t


def _simulator() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def threads_per_row(n_classes: int, nt: int) -> int:
    """Threads that share one row: a power of two giving each about 8 elements, at most the
    block. Small rows are packed several to a block instead of idling most of its threads."""
    tpr = 1
    while tpr < nt and tpr * 8 < n_classes:
        tpr *= 2
    return tpr


# --------------------------------------------------------------------------------------------
# Device functions
# --------------------------------------------------------------------------------------------
LOG2E = 1.4426950408889634
LN2_HI = 6.93147180369123816490e-01
LN2_LO = 1.90821492927058770002e-10
SHIFTER = 6755399441055744.0
EXP_FLUSH = -708.0


@cuda.jit(device=True)
def exp_neg_fast(d):
    """exp(d) for d <= 0 in float64 to 7e-12 relative (Cody-Waite reduction, degree-9 Taylor),
    0 below -708: the CPU fast kernels' exp (cpu_fast.exp_neg), for float32 results only, where
    it is 1e-4 of an ulp and cheaper than libdevice's full-precision exp."""
    if d < EXP_FLUSH:
        return 0.0
    t = d * LOG2E + SHIFTER
    n = t - SHIFTER
    r = (d - n * LN2_HI) - n * LN2_LO
    p = 2.7557319223985893e-06
    p = p * r + 2.48015873015873e-05
    p = p * r + 0.0001984126984126984
    p = p * r + 0.001388888888888889
    p = p * r + 0.008333333333333333
    p = p * r + 0.041666666666666664
    p = p * r + 0.16666666666666666
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    return math.ldexp(p, int(n))


@cuda.jit(device=True)
def _scaled(m_from, m_to):
    """exp(m_from - m_to) for m_from <= m_to, from the exact difference (0 for -inf)."""
    hi, lo = two_diff(m_from, m_to)
    if hi < EXP_UNDERFLOW:
        return 0.0
    return exp_dd(hi, lo)


@cuda.jit(device=True)
def exp_shifted(v, m):
    """exp(v - m) from the exact difference (float64 results)."""
    hi, lo = two_diff(v, m)
    if hi < EXP_UNDERFLOW:
        return 0.0
    return exp_dd(hi, lo)


@cuda.jit(device=True)
def merge_stats(sh_m, sh_s, sh_t, sh_k, sh_bad, a, b):
    """Merge the online state in slot b into slot a (shared memory)."""
    m1 = sh_m[a]
    m2 = sh_m[b]
    s1 = sh_s[a]
    s2 = sh_s[b]
    t1 = sh_t[a]
    t2 = sh_t[b]
    k1 = sh_k[a]
    k2 = sh_k[b]
    if m2 > m1:
        m1, m2 = m2, m1
        s1, s2 = s2, s1
        t1, t2 = t2, t1
        k1, k2 = k2, k1
    if m2 == m1:
        sh_s[a] = s1 + s2
        sh_t[a] = t1 + t2
        sh_k[a] = min(k1, k2)
    else:
        sh_s[a] = s1 + (s2 + t2) * _scaled(m2, m1)
        sh_t[a] = t1
        sh_k[a] = k1
    sh_m[a] = m1
    sh_bad[a] = max(sh_bad[a], sh_bad[b])


@cuda.jit(device=True)
def group_sum(v, lane, tpr, base, sh):
    """Sum of one float64 per thread over each group of ``tpr`` threads (tree in shared memory;
    every thread of the block must call it, as it synchronises the block)."""
    sh[base + lane] = v
    cuda.syncthreads()
    stride = tpr // 2
    while stride > 0:
        if lane < stride:
            sh[base + lane] += sh[base + lane + stride]
        cuda.syncthreads()
        stride //= 2
    total = sh[base]
    cuda.syncthreads()
    return total


@cuda.jit(device=True)
def argmax_grad(a_sum, a_k, s, z):
    """A q_k - a_k at the argmax without cancellation: (A - a_k - a_k s) / z."""
    return ((a_sum - a_k) - a_k * s) / z


@cuda.jit(device=True)
def neg_log_prob(v, m, L):
    hi, lo = two_diff(m, v)
    return hi + (L + lo)


# --------------------------------------------------------------------------------------------
# Kernel factories (one compiled set per block size and precision path)
# --------------------------------------------------------------------------------------------
_CACHE = {}


def kernels(nt=None, fast32=False):
    """The kernel set for ``nt`` threads per block (compiled lazily, cached). ``fast32`` selects
    the float32-input path: plain float64 differences and sums and the polynomial exp, which
    float32 results allow; the default path is the float64-exact one."""
    nt = threads_per_block() if nt is None else nt
    key = (nt, bool(fast32))
    if key not in _CACHE:
        _CACHE[key] = _make_kernels(nt, bool(fast32))
    return _CACHE[key]


def _make_kernels(NT, FAST32=False):
    """Build the kernels for NT threads per block; returns {name: kernel}, with the plain Python
    functions under "_pyfuncs" so that tests can compile each one to PTX.

    Row kernels take ``tpr``, the threads per row: the block holds NT // tpr rows, thread
    ``tid`` works on row ``blockIdx.x * (NT // tpr) + tid // tpr``. Every thread reaches every
    ``syncthreads`` (rows past the end and ignored rows compute on row 0 and write nothing)."""

    @cuda.jit(device=True)
    def locate(tpr):
        """(lane, base, row): this thread's place in its group of ``tpr`` threads, the group's
        first slot in the shared arrays, and the row the group works on."""
        tid = cuda.threadIdx.x
        g = tid // tpr
        return tid - g * tpr, g * tpr, cuda.blockIdx.x * (NT // tpr) + g

    @cuda.jit(device=True)
    def term(v, m):
        """exp(v - m) for v < m."""
        if FAST32:
            return exp_neg_fast(v - m)
        return exp_shifted(v, m)

    @cuda.jit(device=True)
    def consume(v, j, m, s, c, t, k, bad):
        """Fold element v = x_j into a thread's online state (m, s + c, t ties, k, bad)."""
        if v != v:
            bad = 1
        elif v > m:
            f = _scaled(m, v)
            s = (s + t) * f
            c = c * f
            m = v
            t = 1
            k = j
        elif v == m:
            t += 1
            k = min(k, j)
        elif FAST32:
            s += exp_neg_fast(v - m)
        else:
            hi, lo = two_diff(v, m)
            if hi >= EXP_UNDERFLOW:
                s, c = neumaier_add(s, c, exp_dd(hi, lo))
        return m, s, c, t, k, bad

    @cuda.jit(device=True)
    def row_stats(x, lane, tpr, base, sh_m, sh_s, sh_t, sh_k, sh_bad):
        """Group-wide (m, S, k, bad) of row x: m = max, S = sum_{j != k} exp(x_j - m), k = the
        first argmax, bad = a NaN in the row. One read of the row; each thread issues four
        loads before it computes on them, to keep enough bytes in flight to stream from HBM."""
        n = x.shape[0]
        m = -math.inf
        s = 0.0
        c = 0.0
        t = 0
        k = n
        bad = 0
        j = lane
        while j + 3 * tpr < n:
            v0 = float64(x[j])
            v1 = float64(x[j + tpr])
            v2 = float64(x[j + 2 * tpr])
            v3 = float64(x[j + 3 * tpr])
            m, s, c, t, k, bad = consume(v0, j, m, s, c, t, k, bad)
            m, s, c, t, k, bad = consume(v1, j + tpr, m, s, c, t, k, bad)
            m, s, c, t, k, bad = consume(v2, j + 2 * tpr, m, s, c, t, k, bad)
            m, s, c, t, k, bad = consume(v3, j + 3 * tpr, m, s, c, t, k, bad)
            j += 4 * tpr
        while j < n:
            m, s, c, t, k, bad = consume(float64(x[j]), j, m, s, c, t, k, bad)
            j += tpr
        sh_m[base + lane] = m
        sh_s[base + lane] = s + c
        sh_t[base + lane] = t
        sh_k[base + lane] = k
        sh_bad[base + lane] = bad
        cuda.syncthreads()
        stride = tpr // 2
        while stride > 0:
            if lane < stride:
                merge_stats(sh_m, sh_s, sh_t, sh_k, sh_bad, base + lane, base + lane + stride)
            cuda.syncthreads()
            stride //= 2
        m = sh_m[base]
        S = sh_s[base] + (sh_t[base] - 1)
        k = sh_k[base]
        bad = sh_bad[base]
        cuda.syncthreads()  # the shared arrays are reused by the caller
        return m, S, k, bad

    @cuda.jit(device=True)
    def ce_grad(v, j, y, k, y_top, m, s, z, c_true, c_smooth, eps, wsum, weight):
        """One gradient element of the class-index cross-entropy (see cpu.py)."""
        p = (1.0 if v == m else term(v, m)) / z
        if j == y:
            gj = c_true * (-s / z if y_top else p - 1.0)
        else:
            gj = c_true * p
        if eps != 0.0:
            if (j == y and y_top) or (j == k and not y_top):
                gj += c_smooth * argmax_grad(wsum, weight[j], s, z)
            else:
                gj += c_smooth * (wsum * p - weight[j])
        return gj

    def ce_index(x, target, weight, ignore_index, eps, wsum, grad_scale, with_grad, tpr,
                 out_loss, out_grad):
        sh_m = cuda.shared.array(NT, float64)
        sh_s = cuda.shared.array(NT, float64)
        sh_t = cuda.shared.array(NT, int64)
        sh_k = cuda.shared.array(NT, int64)
        sh_b = cuda.shared.array(NT, int64)
        lane, base, i = locate(tpr)
        n = x.shape[0]
        active = i < n
        row = x[i if active else 0]
        nc = row.shape[0]
        y = target[i] if active else ignore_index
        skip = (not active) or y == ignore_index
        yy = 0 if skip else y
        xy = float64(row[yy])
        m, s, k, bad = row_stats(row, lane, tpr, base, sh_m, sh_s, sh_t, sh_k, sh_b)
        L = math.log1p(s)
        loss = weight[yy] * neg_log_prob(xy, m, L)
        if eps != 0.0:
            ps = 0.0
            pc = 0.0
            for j in range(lane, nc, tpr):
                ps, pc = neumaier_add(ps, pc, weight[j] * (m - float64(row[j])))
            smooth = group_sum(ps + pc, lane, tpr, base, sh_s) + wsum * L
            loss = (1.0 - eps) * loss + (eps / nc) * smooth
        if not active:
            return
        invalid = bad != 0 or not math.isfinite(m)
        if lane == 0:
            out_loss[i] = 0.0 if skip else (math.nan if invalid else loss)
        if not with_grad:
            return
        if skip or invalid:
            fill = 0.0 if skip else math.nan
            for j in range(lane, nc, tpr):
                out_grad[i, j] = fill
            return
        z = 1.0 + s
        y_top = xy == m
        c_true = (1.0 - eps) * weight[y] * grad_scale
        c_smooth = (eps / nc) * grad_scale
        j = lane
        while j + 3 * tpr < nc:
            v0 = float64(row[j])
            v1 = float64(row[j + tpr])
            v2 = float64(row[j + 2 * tpr])
            v3 = float64(row[j + 3 * tpr])
            out_grad[i, j] = ce_grad(v0, j, y, k, y_top, m, s, z, c_true, c_smooth, eps, wsum,
                                     weight)
            out_grad[i, j + tpr] = ce_grad(v1, j + tpr, y, k, y_top, m, s, z, c_true, c_smooth,
                                           eps, wsum, weight)
            out_grad[i, j + 2 * tpr] = ce_grad(v2, j + 2 * tpr, y, k, y_top, m, s, z, c_true,
                                               c_smooth, eps, wsum, weight)
            out_grad[i, j + 3 * tpr] = ce_grad(v3, j + 3 * tpr, y, k, y_top, m, s, z, c_true,
                                               c_smooth, eps, wsum, weight)
            j += 4 * tpr
        while j < nc:
            out_grad[i, j] = ce_grad(float64(row[j]), j, y, k, y_top, m, s, z, c_true, c_smooth,
                                     eps, wsum, weight)
            j += tpr

    def ce_prob(x, target, weight, eps, grad_scale, with_grad, tpr, out_loss, out_grad):
        sh_m = cuda.shared.array(NT, float64)
        sh_s = cuda.shared.array(NT, float64)
        sh_t = cuda.shared.array(NT, int64)
        sh_k = cuda.shared.array(NT, int64)
        sh_b = cuda.shared.array(NT, int64)
        lane, base, i = locate(tpr)
        active = i < x.shape[0]
        row = x[i if active else 0]
        trow = target[i if active else 0]
        nc = row.shape[0]
        m, s, k, bad = row_stats(row, lane, tpr, base, sh_m, sh_s, sh_t, sh_k, sh_b)
        L = math.log1p(s)
        sa = 0.0
        ca = 0.0
        st = 0.0
        ct = 0.0
        for j in range(lane, nc, tpr):
            a = weight[j] * ((1.0 - eps) * float64(trow[j]) + eps / nc)
            if a != 0.0:
                sa, ca = neumaier_add(sa, ca, a)
                hi, lo = two_diff(m, float64(row[j]))
                st, ct = neumaier_add(st, ct, a * hi)
                ct += a * lo
        a_sum = group_sum(sa + ca, lane, tpr, base, sh_s)
        t_sum = group_sum(st + ct, lane, tpr, base, sh_s)
        if not active:
            return
        invalid = bad != 0 or not math.isfinite(m)
        if lane == 0:
            out_loss[i] = math.nan if invalid else t_sum + a_sum * L
        if not with_grad:
            return
        z = 1.0 + s
        for j in range(lane, nc, tpr):
            if invalid:
                out_grad[i, j] = math.nan
                continue
            a = weight[j] * ((1.0 - eps) * float64(trow[j]) + eps / nc)
            v = float64(row[j])
            if j == k:
                gj = argmax_grad(a_sum, a, s, z)
            else:
                gj = a_sum * ((1.0 if v == m else term(v, m)) / z) - a
            out_grad[i, j] = gj * grad_scale

    def kl(x, target, grad_scale, with_grad, tpr, out_loss, out_grad):
        sh_m = cuda.shared.array(NT, float64)
        sh_s = cuda.shared.array(NT, float64)
        sh_t = cuda.shared.array(NT, int64)
        sh_k = cuda.shared.array(NT, int64)
        sh_b = cuda.shared.array(NT, int64)
        lane, base, i = locate(tpr)
        active = i < x.shape[0]
        row = x[i if active else 0]
        prow = target[i if active else 0]
        nc = row.shape[0]
        m, s, k, bad = row_stats(row, lane, tpr, base, sh_m, sh_s, sh_t, sh_k, sh_b)
        L = math.log1p(s)
        ks = 0.0
        kc = 0.0
        ps = 0.0
        pc = 0.0
        for j in range(lane, nc, tpr):
            p = float64(prow[j])
            if p != 0.0:
                hi, lo = two_diff(m, float64(row[j]))
                ks, kc = neumaier_add(ks, kc, p * ((hi + L) + (math.log(p) + lo)))
            ps, pc = neumaier_add(ps, pc, p)
        total = group_sum(ks + kc, lane, tpr, base, sh_s)
        p_sum = group_sum(ps + pc, lane, tpr, base, sh_s)
        if not active:
            return
        invalid = bad != 0 or not math.isfinite(m)
        if lane == 0:
            out_loss[i] = math.nan if invalid else total
        if not with_grad:
            return
        z = 1.0 + s
        for j in range(lane, nc, tpr):
            if invalid:
                out_grad[i, j] = math.nan
                continue
            p = float64(prow[j])
            v = float64(row[j])
            if j == k:
                gj = argmax_grad(p_sum, p, s, z)
            else:
                gj = p_sum * ((1.0 if v == m else term(v, m)) / z) - p
            out_grad[i, j] = gj * grad_scale

    def focal_softmax(x, target, weight, ignore_index, gamma, grad_scale, with_grad, tpr,
                      out_loss, out_grad):
        sh_m = cuda.shared.array(NT, float64)
        sh_s = cuda.shared.array(NT, float64)
        sh_t = cuda.shared.array(NT, int64)
        sh_k = cuda.shared.array(NT, int64)
        sh_b = cuda.shared.array(NT, int64)
        lane, base, i = locate(tpr)
        active = i < x.shape[0]
        row = x[i if active else 0]
        nc = row.shape[0]
        y = target[i] if active else ignore_index
        skip = (not active) or y == ignore_index
        yy = 0 if skip else y
        xy = float64(row[yy])
        m, s, k, bad = row_stats(row, lane, tpr, base, sh_m, sh_s, sh_t, sh_k, sh_b)
        if not active:
            return
        invalid = bad != 0 or not math.isfinite(m)
        if skip or invalid:
            fill = 0.0 if skip else math.nan
            if lane == 0:
                out_loss[i] = fill
            if with_grad:
                for j in range(lane, nc, tpr):
                    out_grad[i, j] = fill
            return
        z = 1.0 + s
        ce = neg_log_prob(xy, m, math.log1p(s))
        e_y = 1.0 if xy == m else exp_shifted(xy, m)
        a = s / z if xy == m else (z - e_y) / z
        p_y = e_y / z
        w = weight[y]
        a_gamma = pow_nonneg(a, gamma)
        if lane == 0:
            out_loss[i] = w * a_gamma * ce
        if not with_grad:
            return
        inner = gamma * ce * p_y + a
        for j in range(lane, nc, tpr):
            if j == y:
                gj = -w * a_gamma * inner
            else:
                v = float64(row[j])
                p = (1.0 if v == m else exp_shifted(v, m)) / z
                gj = 0.0 if p == 0.0 else w * (p / a) * a_gamma * inner
            out_grad[i, j] = gj * grad_scale

    def bce_logits(x, target, weight, pos_weight, grad_scale, with_grad, out_loss, out_grad):
        n, nc = x.shape
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for idx in range(start, n * nc, step):
            i = idx // nc
            j = idx - i * nc
            v = float64(x[i, j])
            t = float64(target[i, j])
            w = weight[i, j]
            pw = pos_weight[i, j]
            out_loss[i, j] = w * (pw * t * softplus(-v) + (1.0 - t) * softplus(v))
            if with_grad:
                out_grad[i, j] = w * ((1.0 - t) * sigmoid(v) - pw * t * sigmoid(-v)) * grad_scale

    def sigmoid_focal(x, target, alpha, gamma, grad_scale, with_grad, out_loss, out_grad):
        n, nc = x.shape
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for idx in range(start, n * nc, step):
            i = idx // nc
            j = idx - i * nc
            v = float64(x[i, j])
            t = float64(target[i, j])
            sp = sigmoid(v)
            sn = sigmoid(-v)
            b = t * sn + (1.0 - t) * sp
            ce = t * softplus(-v) + (1.0 - t) * softplus(v)
            bg = pow_nonneg(b, gamma)
            alpha_t = 1.0
            if alpha >= 0.0:
                alpha_t = alpha * t + (1.0 - alpha) * (1.0 - t)
            out_loss[i, j] = alpha_t * ce * bg
            if with_grad:
                g = ((1.0 - t) * sp - t * sn) * bg
                if b != 0.0 and gamma != 0.0:
                    g += gamma * ce * (bg / b) * ((1.0 - 2.0 * t) * sp * sn)
                out_grad[i, j] = alpha_t * g * grad_scale

    def reduce_sum(values, out):
        """Compensated block sum of a float64 vector into out[0] (one block)."""
        sh = cuda.shared.array(NT, float64)
        tid = cuda.threadIdx.x
        s = 0.0
        c = 0.0
        for j in range(tid, values.shape[0], NT):
            s, c = neumaier_add(s, c, values[j])
        total = group_sum(s + c, tid, NT, 0, sh)
        if tid == 0:
            out[0] = total

    def index_weight_sum(target, weight, ignore_index, out):
        """out[0] = sum of weight[target_i] over non-ignored rows (one block): torch's
        denominator for reduction="mean"."""
        sh = cuda.shared.array(NT, float64)
        tid = cuda.threadIdx.x
        s = 0.0
        c = 0.0
        for i in range(tid, target.shape[0], NT):
            y = target[i]
            if y != ignore_index:
                s, c = neumaier_add(s, c, weight[y])
        total = group_sum(s + c, tid, NT, 0, sh)
        if tid == 0:
            out[0] = total

    def scale_cast(src, factor, dst):
        """dst = src * factor, converted to dst's dtype (one rounding)."""
        start = cuda.grid(1)
        for j in range(start, src.shape[0], cuda.gridsize(1)):
            dst[j] = src[j] * factor

    funcs = dict(ce_index=ce_index, ce_prob=ce_prob, kl=kl, focal_softmax=focal_softmax,
                 bce_logits=bce_logits, sigmoid_focal=sigmoid_focal, reduce_sum=reduce_sum,
                 index_weight_sum=index_weight_sum, scale_cast=scale_cast)
    # launch_bounds caps the registers so that blocks of NT threads can always launch (without
    # it, 1024-thread blocks of the unrolled row kernels ran out of registers on an H200)
    # (the simulator's cuda.jit takes no launch_bounds)
    opts = {} if _simulator() else {"launch_bounds": NT}
    compiled = {name: cuda.jit(f, **opts) for name, f in funcs.items()}
    compiled["_pyfuncs"] = funcs
    compiled["threads"] = NT
    return compiled




# --------------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------------
def _is_device(a):
    """Whether ``a`` lives on the device: anything with ``__cuda_array_interface__``, or a device
    array of the CUDA simulator (which has no such interface)."""
    if a is None or isinstance(a, np.ndarray):
        return False
    return hasattr(a, "__cuda_array_interface__") or type(a).__name__ == "FakeCUDAArray"


def _as_device(a):
    """A numba view of any CUDA array (CuPy, torch), without a copy."""
    if hasattr(a, "__cuda_array_interface__") and hasattr(cuda, "as_cuda_array"):
        return cuda.as_cuda_array(a)
    if _is_device(a):
        return a
    raise TypeError(f"expected a device array (with __cuda_array_interface__); got "
                    f"{type(a).__name__}")


def _to_device(a):
    if _is_device(a):
        return a
    return cuda.to_device(np.ascontiguousarray(a))


def _grid_1d(total, nt):
    return max(1, min((total + nt - 1) // nt, 65535 * 4))


def _dummy_grad(dtype):
    """A stand-in gradient buffer (never written) of the logits' dtype, so that the forward and
    fused launches share one compiled specialisation."""
    return cuda.device_array((1, 1), dtype=dtype)


def _launch_rows(name, x, head, tail):
    """Launch row kernel ``name`` on logits ``x``: the block size and threads per row follow the
    class count, float32 logits take the fast32 path."""
    n, c = x.shape
    if n == 0:
        return
    nt = threads_per_block(c)
    tpr = threads_per_row(c, nt)
    k = kernels(nt, x.dtype == np.float32)
    rows_per_block = nt // tpr
    k[name][(n + rows_per_block - 1) // rows_per_block, nt](*head, tpr, *tail)


def _launch_elements(name, shape, args):
    k = kernels(threads_per_block())
    total = int(shape[0]) * int(shape[1])
    if total > 0:
        k[name][_grid_1d(total, k["threads"]), k["threads"]](*args)


def _finish(out_loss, d_loss, out_grad, d_grad):
    if out_loss is not None and not _is_device(out_loss):
        d_loss.copy_to_host(out_loss)
    if out_grad is not None and d_grad is not None and not _is_device(out_grad):
        d_grad.copy_to_host(out_grad)


# --------------------------------------------------------------------------------------------
# Host wrappers with the signatures of cestudy.kernels.cpu
# --------------------------------------------------------------------------------------------
def cross_entropy_index_fwd(logits, target, weight, ignore_index, label_smoothing, out_loss):
    _ce_index(logits, target, weight, ignore_index, label_smoothing, 1.0, out_loss, None)


def cross_entropy_index_fwd_grad(logits, target, weight, ignore_index, label_smoothing,
                                 grad_scale, out_loss, out_grad):
    _ce_index(logits, target, weight, ignore_index, label_smoothing, grad_scale, out_loss,
              out_grad)


def _ce_index(logits, target, weight, ignore_index, eps, grad_scale, out_loss, out_grad):
    w = np.asarray(weight, dtype=np.float64)
    wsum = float(math.fsum(w))
    d_loss = _to_device(out_loss) if _is_device(out_loss) else cuda.device_array(
        logits.shape[0], np.float64)
    d_grad = None if out_grad is None else (out_grad if _is_device(out_grad) else
                                            cuda.device_array(logits.shape, logits.dtype))
    _launch_rows("ce_index", logits, (
        _to_device(logits), _to_device(target), _to_device(w), int(ignore_index), float(eps),
        wsum, float(grad_scale), out_grad is not None),
        (d_loss, d_grad if d_grad is not None else _dummy_grad(logits.dtype)))
    _finish(out_loss, d_loss, out_grad, d_grad)


def cross_entropy_prob_fwd(logits, target, weight, label_smoothing, out_loss):
    _row_generic("ce_prob", logits, (target, np.asarray(weight, np.float64),
                                     float(label_smoothing)), 1.0, out_loss, None)


def cross_entropy_prob_fwd_grad(logits, target, weight, label_smoothing, grad_scale, out_loss,
                                out_grad):
    _row_generic("ce_prob", logits, (target, np.asarray(weight, np.float64),
                                     float(label_smoothing)), grad_scale, out_loss, out_grad)


def kl_divergence_fwd(logits, target, out_loss):
    _row_generic("kl", logits, (target,), 1.0, out_loss, None)


def kl_divergence_fwd_grad(logits, target, grad_scale, out_loss, out_grad):
    _row_generic("kl", logits, (target,), grad_scale, out_loss, out_grad)


def softmax_focal_fwd(logits, target, weight, ignore_index, gamma, out_loss):
    _row_generic("focal_softmax", logits, (target, np.asarray(weight, np.float64),
                                           int(ignore_index), float(gamma)), 1.0, out_loss, None)


def softmax_focal_fwd_grad(logits, target, weight, ignore_index, gamma, grad_scale, out_loss,
                           out_grad):
    _row_generic("focal_softmax", logits, (target, np.asarray(weight, np.float64),
                                           int(ignore_index), float(gamma)), grad_scale,
                 out_loss, out_grad)


def _row_generic(name, logits, extra, grad_scale, out_loss, out_grad):
    d_loss = out_loss if _is_device(out_loss) else cuda.device_array(logits.shape[0], np.float64)
    d_grad = None if out_grad is None else (out_grad if _is_device(out_grad) else
                                            cuda.device_array(logits.shape, logits.dtype))
    head = [_to_device(logits)]
    head += [_to_device(a) if isinstance(a, np.ndarray) or _is_device(a) else a for a in extra]
    head += [float(grad_scale), out_grad is not None]
    _launch_rows(name, logits, tuple(head),
                 (d_loss, d_grad if d_grad is not None else _dummy_grad(logits.dtype)))
    _finish(out_loss, d_loss, out_grad, d_grad)


def bce_with_logits_fwd(logits, target, weight, pos_weight, out_loss):
    _elementwise("bce_logits", logits, (target, _dense(weight, logits.shape),
                                        _dense(pos_weight, logits.shape)), 1.0, out_loss, None)


def bce_with_logits_fwd_grad(logits, target, weight, pos_weight, grad_scale, out_loss, out_grad):
    _elementwise("bce_logits", logits, (target, _dense(weight, logits.shape),
                                        _dense(pos_weight, logits.shape)), grad_scale, out_loss,
                 out_grad)


def sigmoid_focal_fwd(logits, target, alpha, gamma, out_loss):
    _elementwise("sigmoid_focal", logits, (target, float(alpha), float(gamma)), 1.0, out_loss,
                 None)


def sigmoid_focal_fwd_grad(logits, target, alpha, gamma, grad_scale, out_loss, out_grad):
    _elementwise("sigmoid_focal", logits, (target, float(alpha), float(gamma)), grad_scale,
                 out_loss, out_grad)


def _dense(w, shape):
    if _is_device(w):
        return w
    return np.ascontiguousarray(np.broadcast_to(np.asarray(w, np.float64), shape))


def _elementwise(name, logits, extra, grad_scale, out_loss, out_grad):
    d_loss = out_loss if _is_device(out_loss) else cuda.device_array(logits.shape, np.float64)
    d_grad = None if out_grad is None else (out_grad if _is_device(out_grad) else
                                            cuda.device_array(logits.shape, logits.dtype))
    args = [_to_device(logits)]
    args += [_to_device(a) if isinstance(a, np.ndarray) or _is_device(a) else a for a in extra]
    args += [float(grad_scale), out_grad is not None, d_loss,
             d_grad if d_grad is not None else _dummy_grad(logits.dtype)]
    _launch_elements(name, logits.shape, tuple(args))
    _finish(out_loss, d_loss, out_grad, d_grad)


# --------------------------------------------------------------------------------------------
# Device arrays in, device arrays out
# --------------------------------------------------------------------------------------------
DEVICE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def device_loss(variant, logits, target, *, reduction="mean", with_grad=False, inplace=False,
                weight=None, pos_weight=None, ignore_index=-100, label_smoothing=0.0,
                gamma=2.0, alpha=0.25):
    """Run a loss on device arrays and return device arrays (no host round trip).

    ``logits`` (N, C) and ``target`` are anything with ``__cuda_array_interface__`` (numba device
    arrays, CuPy arrays, torch CUDA tensors). Returns ``loss`` (a device array of shape () or
    (N,) / (N, C) for "none") and, with ``with_grad``, ``grad`` (a new device array, or the
    logits buffer itself with ``inplace=True``). float32 and float64 logits are supported;
    float16 and bfloat16 device arrays are not (convert them on the device first).
    """
    x = _as_device(logits)
    if x.dtype not in DEVICE_DTYPES:
        raise TypeError(f"logits: device arrays of dtype {x.dtype} are not supported by "
                        f"backend='cuda'; use float32 or float64")
    if x.ndim != 2:
        raise ValueError(f"logits must be a 2-D (N, C) device array; got shape {x.shape}")
    t = _as_device(target)
    n, c = x.shape
    elementwise = variant in ("bce_logits", "sigmoid_focal")
    per_sample = cuda.device_array(x.shape if elementwise else n, np.float64)
    grad = None
    if with_grad:
        grad = x if inplace else cuda.device_array(x.shape, x.dtype)
    if variant in ("ce_index", "focal_softmax"):
        if t.shape != (n,) or t.dtype.kind not in "iu":
            raise ValueError(f"target must be an integer (N,) = ({n},) device array of class "
                             f"indices; got {t.dtype} {t.shape}")
    elif t.shape != x.shape:
        raise ValueError(f"target must have the logits' shape {x.shape}; got {t.shape}")
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    k = kernels(threads_per_block())
    if variant in ("ce_index", "focal_softmax"):
        # torch's denominator sum_i w_{y_i} over non-ignored rows, summed on the device; its one
        # float64 is read back because the gradient kernel takes the scale as an argument
        d_denom = cuda.device_array(1, np.float64)
        k["index_weight_sum"][1, k["threads"]](t, cuda.to_device(w), int(ignore_index), d_denom)
        denom = float(d_denom.copy_to_host()[0]) if n else 0.0
    elif variant in ("ce_prob", "kl"):
        denom = float(n)
    else:
        denom = float(n * c)
    scale = 1.0 if reduction != "mean" else (1.0 / denom if denom else math.nan)
    if variant == "ce_index":
        _ce_index(x, t, w, ignore_index, label_smoothing, scale, per_sample, grad)
    elif variant == "ce_prob":
        _row_generic("ce_prob", x, (t, w, float(label_smoothing)), scale, per_sample, grad)
    elif variant == "kl":
        _row_generic("kl", x, (t,), scale, per_sample, grad)
    elif variant == "focal_softmax":
        _row_generic("focal_softmax", x, (t, w, int(ignore_index), float(gamma)), scale,
                     per_sample, grad)
    elif variant == "bce_logits":
        _elementwise("bce_logits", x, (t, _dense(w if weight is not None else 1.0, x.shape),
                                       _dense(1.0 if pos_weight is None else pos_weight,
                                              x.shape)), scale, per_sample, grad)
    elif variant == "sigmoid_focal":
        _elementwise("sigmoid_focal", x, (t, float(alpha), float(gamma)), scale, per_sample,
                     grad)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    loss = _device_reduce(per_sample, reduction, denom, x.dtype)
    return (loss, grad) if with_grad else loss


def _device_reduce(per_sample, reduction, denom, dtype):
    """Reduce float64 per-sample losses on the device and cast to ``dtype`` (device arrays)."""
    k = kernels(threads_per_block())
    nt = k["threads"]
    flat = per_sample.reshape(per_sample.size) if per_sample.ndim > 1 else per_sample
    if reduction == "none":
        out = cuda.device_array(per_sample.size, dtype)
        if per_sample.size:
            k["scale_cast"][_grid_1d(per_sample.size, nt), nt](flat, 1.0, out)
        return out.reshape(per_sample.shape)
    total = cuda.device_array(1, np.float64)
    k["reduce_sum"][1, nt](flat, total)
    factor = 1.0 if reduction == "sum" else (1.0 / denom if denom else math.nan)
    out = cuda.device_array(1, dtype)
    k["scale_cast"][1, 1](total, factor, out)
    return out
