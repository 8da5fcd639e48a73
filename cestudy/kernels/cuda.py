"""numba-cuda kernels: the CPU kernels' calling convention and accuracy contract on NVIDIA GPUs.

Import this module only when the CUDA backend is wanted (``cestudy.backends.require_cuda``); it
needs NVIDIA's ``numba-cuda`` package and a GPU, or the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1`` set before numba is imported), in which CI runs every kernel.

This module holds raw kernels and the raw device helpers that ``cestudy.dispatch`` calls: no
validation, no variant names, no choice of reduction. The formulas are ``scalar.py``'s, compiled
here with ``cuda.jit(device=True)``.

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
- The fused kernels read the row a second time to write the gradient, which may be the logits
  buffer itself (as Liger-Kernel does) to halve memory.
- Element-wise kernels (BCE with logits, sigmoid focal) use one thread per element.

The host wrappers ``<kernel>_fwd`` / ``<kernel>_fwd_grad`` have the signatures of
``cestudy.kernels.cpu`` and take numpy arrays or device arrays (anything with
``__cuda_array_interface__``) alike; device outputs are written in place, host outputs copied
back. As on the CPU, an element-wise kernel given a 1-D ``out_loss`` of length N writes row sums.
"""
from __future__ import annotations

import math
import os

import numpy as np
from numba import cuda, float64, int32

from . import scalar

_S = scalar.compiled(cuda.jit(device=True))
two_diff = _S.two_diff
exp_diff = _S.exp_diff
neumaier_add = _S.neumaier_add
pow_nonneg = _S.pow_nonneg
row_guard = _S.row_guard
argmax_grad = _S.argmax_grad
neg_log_prob = _S.neg_log_prob
soft_target = _S.soft_target
kl_term = _S.kl_term
focal_parts = _S.focal_parts
focal_grad = _S.focal_grad
bce_logits_elem = _S.bce_logits
bce_logits_grad = _S.bce_logits_grad
sigmoid_focal_elem = _S.sigmoid_focal
_exp_parts = _S.exp_parts
EXP_UNDERFLOW = scalar.EXP_UNDERFLOW
EXP_FLUSH = scalar.EXP_FLUSH

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
@cuda.jit(device=True)
def exp_neg_fast(d):
    """exp(d) for d <= 0 in float64 to 7e-12 relative (``scalar.exp_parts``), 0 below -708:
    the CPU fast kernels' exp, for float32 results only, where it is 1e-4 of an ulp and cheaper
    than libdevice's full-precision exp."""
    if d < EXP_FLUSH:
        return 0.0
    p, n = _exp_parts(d)
    return math.ldexp(p, int(n))


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
        sh_s[a] = s1 + (s2 + t2) * exp_diff(m2, m1)
        sh_t[a] = t1
        sh_k[a] = k1
    sh_m[a] = m1
    sh_bad[a] = max(sh_bad[a], sh_bad[b])


@cuda.jit(device=True)
def write_row(out_loss, out_grad, i, lane, tpr, skip, fill, loss, with_grad):
    """Write row i's loss (``fill`` when ``skip``, see ``scalar.row_guard``) and, for a skipped
    row with ``with_grad``, fill its gradient; returns whether the caller writes the gradient."""
    if lane == 0:
        out_loss[i] = fill if skip else loss
    if with_grad and skip:
        for j in range(lane, out_grad.shape[1], tpr):
            out_grad[i, j] = fill
    return with_grad and not skip


@cuda.jit(device=True)
def element(x, target, idx):
    """(i, j, x_ij, t_ij) for flat index idx, as float64: the element kernels' prologue."""
    nc = x.shape[1]
    i = idx // nc
    j = idx - i * nc
    return i, j, float64(x[i, j]), float64(target[i, j])


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
    ``syncthreads`` (rows past the end compute on row 0 and write nothing)."""

    @cuda.jit(device=True)
    def locate(n_rows, tpr):
        """(lane, base, i, active, r): this thread's place in its group of ``tpr`` threads, the
        group's first slot in the shared arrays, the row the group works on, whether that row
        exists, and the row to read (i, or 0 past the end)."""
        tid = cuda.threadIdx.x
        g = tid // tpr
        i = cuda.blockIdx.x * (NT // tpr) + g
        active = i < n_rows
        return tid - g * tpr, g * tpr, i, active, i if active else 0

    @cuda.jit(device=True)
    def group_sum(v, lane, tpr, base):
        """Sum of one float64 per thread over each group of ``tpr`` threads (tree in shared
        memory; every thread of the block must call it, as it synchronises the block)."""
        sh = cuda.shared.array(NT, float64)
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
    def term(v, m):
        """exp(v - m) for v < m."""
        if FAST32:
            return exp_neg_fast(v - m)
        return exp_diff(v, m)

    @cuda.jit(device=True)
    def consume(v, j, m, s, c, t, k, bad):
        """Fold element v = x_j into a thread's online state (m, s + c, t ties, k, bad)."""
        if v != v:
            bad = 1
        elif v > m:
            f = exp_diff(m, v)
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
            s, c = neumaier_add(s, c, exp_diff(v, m))
        return m, s, c, t, k, bad

    @cuda.jit(device=True)
    def row_stats(x, lane, tpr, base):
        """Group-wide (m, S, k, bad) of row x: m = max, S = sum_{j != k} exp(x_j - m), k = the
        first argmax, bad = a NaN in the row. One read of the row; each thread issues four
        loads before it computes on them, to keep enough bytes in flight to stream from HBM."""
        sh_m = cuda.shared.array(NT, float64)
        sh_s = cuda.shared.array(NT, float64)
        sh_t = cuda.shared.array(NT, int32)
        sh_k = cuda.shared.array(NT, int32)
        sh_b = cuda.shared.array(NT, int32)
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
        sh_b[base + lane] = bad
        cuda.syncthreads()
        stride = tpr // 2
        while stride > 0:
            if lane < stride:
                merge_stats(sh_m, sh_s, sh_t, sh_k, sh_b, base + lane, base + lane + stride)
            cuda.syncthreads()
            stride //= 2
        m = sh_m[base]
        S = sh_s[base] + (sh_t[base] - 1)
        k = sh_k[base]
        bad = sh_b[base]
        cuda.syncthreads()  # the shared arrays are reused by the next call
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
        lane, base, i, active, r = locate(x.shape[0], tpr)
        row = x[r]
        nc = row.shape[0]
        y = target[r]
        ignored = y == ignore_index
        yy = 0 if ignored else y
        xy = float64(row[yy])
        m, s, k, bad = row_stats(row, lane, tpr, base)
        L = math.log1p(s)
        loss = weight[yy] * neg_log_prob(xy, m, L)
        if eps != 0.0:
            ps = 0.0
            pc = 0.0
            for j in range(lane, nc, tpr):
                ps, pc = neumaier_add(ps, pc, weight[j] * (m - float64(row[j])))
            smooth = group_sum(ps + pc, lane, tpr, base) + wsum * L
            loss = (1.0 - eps) * loss + (eps / nc) * smooth
        if not active:
            return
        skip, fill = row_guard(ignored, bad != 0, m)
        if not write_row(out_loss, out_grad, i, lane, tpr, skip, fill, loss, with_grad):
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
        lane, base, i, active, r = locate(x.shape[0], tpr)
        row = x[r]
        trow = target[r]
        nc = row.shape[0]
        m, s, k, bad = row_stats(row, lane, tpr, base)
        sa = 0.0
        ca = 0.0
        st = 0.0
        ct = 0.0
        for j in range(lane, nc, tpr):
            a = soft_target(weight[j], float64(trow[j]), eps, nc)
            if a != 0.0:
                sa, ca = neumaier_add(sa, ca, a)
                hi, lo = two_diff(m, float64(row[j]))
                st, ct = neumaier_add(st, ct, a * hi)
                ct += a * lo
        a_sum = group_sum(sa + ca, lane, tpr, base)
        t_sum = group_sum(st + ct, lane, tpr, base)
        if not active:
            return
        skip, fill = row_guard(False, bad != 0, m)
        loss = t_sum + a_sum * math.log1p(s)
        if not write_row(out_loss, out_grad, i, lane, tpr, skip, fill, loss, with_grad):
            return
        z = 1.0 + s
        for j in range(lane, nc, tpr):
            a = soft_target(weight[j], float64(trow[j]), eps, nc)
            v = float64(row[j])
            if j == k:
                gj = argmax_grad(a_sum, a, s, z)
            else:
                gj = a_sum * ((1.0 if v == m else term(v, m)) / z) - a
            out_grad[i, j] = gj * grad_scale

    def kl(x, target, grad_scale, with_grad, tpr, out_loss, out_grad):
        lane, base, i, active, r = locate(x.shape[0], tpr)
        row = x[r]
        prow = target[r]
        nc = row.shape[0]
        m, s, k, bad = row_stats(row, lane, tpr, base)
        L = math.log1p(s)
        ks = 0.0
        kc = 0.0
        ps = 0.0
        pc = 0.0
        for j in range(lane, nc, tpr):
            p = float64(prow[j])
            if p != 0.0:
                ks, kc = neumaier_add(ks, kc, kl_term(p, float64(row[j]), m, L))
            ps, pc = neumaier_add(ps, pc, p)
        total = group_sum(ks + kc, lane, tpr, base)
        p_sum = group_sum(ps + pc, lane, tpr, base)
        if not active:
            return
        skip, fill = row_guard(False, bad != 0, m)
        if not write_row(out_loss, out_grad, i, lane, tpr, skip, fill, total, with_grad):
            return
        z = 1.0 + s
        for j in range(lane, nc, tpr):
            p = float64(prow[j])
            v = float64(row[j])
            if j == k:
                gj = argmax_grad(p_sum, p, s, z)
            else:
                gj = p_sum * ((1.0 if v == m else term(v, m)) / z) - p
            out_grad[i, j] = gj * grad_scale

    def focal_softmax(x, target, weight, ignore_index, gamma, grad_scale, with_grad, tpr,
                      out_loss, out_grad):
        lane, base, i, active, r = locate(x.shape[0], tpr)
        row = x[r]
        y = target[r]
        ignored = y == ignore_index
        yy = 0 if ignored else y
        xy = float64(row[yy])
        m, s, k, bad = row_stats(row, lane, tpr, base)
        if not active:
            return
        skip, fill = row_guard(ignored, bad != 0, m)
        z = 1.0 + s
        ce = neg_log_prob(xy, m, math.log1p(s))
        y_top = xy == m
        a, p_y = focal_parts(s, 1.0 if y_top else exp_diff(xy, m), y_top)
        w = weight[yy]
        a_gamma = pow_nonneg(a, gamma)
        loss = w * a_gamma * ce
        if not write_row(out_loss, out_grad, i, lane, tpr, skip, fill, loss, with_grad):
            return
        inner = gamma * ce * p_y + a
        for j in range(lane, row.shape[0], tpr):
            v = float64(row[j])
            p = (1.0 if v == m else exp_diff(v, m)) / z
            out_grad[i, j] = focal_grad(j == y, p, a, a_gamma, inner, w) * grad_scale

    def bce_logits(x, target, weight, pos_weight, grad_scale, with_grad, out_loss, out_grad):
        for idx in range(cuda.grid(1), x.size, cuda.gridsize(1)):
            i, j, v, t = element(x, target, idx)
            w = weight[i, j]
            pw = pos_weight[i, j]
            out_loss[i, j] = w * bce_logits_elem(v, t, pw)
            if with_grad:
                out_grad[i, j] = w * bce_logits_grad(v, t, pw) * grad_scale

    def sigmoid_focal(x, target, alpha, gamma, grad_scale, with_grad, out_loss, out_grad):
        for idx in range(cuda.grid(1), x.size, cuda.gridsize(1)):
            i, j, v, t = element(x, target, idx)
            loss, g = sigmoid_focal_elem(v, t, alpha, gamma)
            out_loss[i, j] = loss
            if with_grad:
                out_grad[i, j] = g * grad_scale

    def row_sum(values, tpr, out):
        """out_i = compensated sum of row i of ``values`` (N, C) float64."""
        lane, base, i, active, r = locate(values.shape[0], tpr)
        row = values[r]
        s = 0.0
        c = 0.0
        for j in range(lane, row.shape[0], tpr):
            s, c = neumaier_add(s, c, row[j])
        total = group_sum(s + c, lane, tpr, base)
        if active and lane == 0:
            out[i] = total

    def reduce_sum(values, out):
        """Compensated block sum of a float64 vector into out[0] (one block)."""
        tid = cuda.threadIdx.x
        s = 0.0
        c = 0.0
        for j in range(tid, values.shape[0], NT):
            s, c = neumaier_add(s, c, values[j])
        total = group_sum(s + c, tid, NT, 0)
        if tid == 0:
            out[0] = total

    def index_weight_sum(target, weight, ignore_index, out):
        """out[0] = sum of weight[target_i] over non-ignored rows (one block): torch's
        denominator for reduction="mean"."""
        tid = cuda.threadIdx.x
        s = 0.0
        c = 0.0
        for i in range(tid, target.shape[0], NT):
            y = target[i]
            if y != ignore_index:
                s, c = neumaier_add(s, c, weight[y])
        total = group_sum(s + c, tid, NT, 0)
        if tid == 0:
            out[0] = total

    def count_invalid(target, n_classes, ignore_index, out):
        """out[0] += the number of targets outside [0, n_classes) other than ignore_index
        (grid-wide: block counts added atomically)."""
        count = 0.0
        for i in range(cuda.grid(1), target.shape[0], cuda.gridsize(1)):
            y = target[i]
            if y != ignore_index and (y < 0 or y >= n_classes):
                count += 1.0
        total = group_sum(count, cuda.threadIdx.x, NT, 0)
        if cuda.threadIdx.x == 0 and total != 0.0:
            cuda.atomic.add(out, 0, total)

    def count_negative(values, out):
        """out[0] += the number of entries < 0 of the flat ``values`` (grid-wide)."""
        count = 0.0
        for i in range(cuda.grid(1), values.shape[0], cuda.gridsize(1)):
            if values[i] < 0:
                count += 1.0
        total = group_sum(count, cuda.threadIdx.x, NT, 0)
        if cuda.threadIdx.x == 0 and total != 0.0:
            cuda.atomic.add(out, 0, total)

    def scale_cast(src, factor, dst):
        """dst = src * factor, converted to dst's dtype (one rounding)."""
        for j in range(cuda.grid(1), src.shape[0], cuda.gridsize(1)):
            dst[j] = src[j] * factor

    funcs = dict(cross_entropy_index=ce_index, cross_entropy_prob=ce_prob, kl_divergence=kl,
                 softmax_focal=focal_softmax, bce_with_logits=bce_logits,
                 sigmoid_focal=sigmoid_focal, row_sum=row_sum, reduce_sum=reduce_sum,
                 index_weight_sum=index_weight_sum, count_invalid=count_invalid,
                 count_negative=count_negative, scale_cast=scale_cast)
    # launch_bounds caps the registers so that blocks of NT threads can always launch (without
    # it, 1024-thread blocks of the unrolled row kernels ran out of registers on an H200)
    # (the simulator's cuda.jit takes no launch_bounds)
    opts = {} if _simulator() else {"launch_bounds": NT}
    compiled = {name: cuda.jit(f, **opts) for name, f in funcs.items()}
    compiled["_pyfuncs"] = funcs
    compiled["threads"] = NT
    return compiled


# --------------------------------------------------------------------------------------------
# Raw device helpers (called by cestudy.dispatch)
# --------------------------------------------------------------------------------------------
def is_device_array(a) -> bool:
    """Whether ``a`` lives on the device: anything with ``__cuda_array_interface__``, or a device
    array of the CUDA simulator (which has no such interface)."""
    if a is None or isinstance(a, np.ndarray):
        return False
    return hasattr(a, "__cuda_array_interface__") or type(a).__name__ == "FakeCUDAArray"


def as_device(a):
    """A numba view of any CUDA array (numba, CuPy, torch), without a copy; TypeError for host
    arrays."""
    if hasattr(a, "__cuda_array_interface__") and hasattr(cuda, "as_cuda_array"):
        return cuda.as_cuda_array(a)
    if is_device_array(a):
        return a
    raise TypeError(f"expected a device array (with __cuda_array_interface__); got "
                    f"{type(a).__name__}")


def device_array(shape, dtype):
    """A new, uninitialised device array."""
    return cuda.device_array(shape, dtype)


def _to_device(a):
    """Device arrays as they are, host arrays copied (contiguous) to the device."""
    if is_device_array(a):
        return as_device(a)
    return cuda.to_device(np.ascontiguousarray(a))


def _grid_1d(total, nt):
    return max(1, min((total + nt - 1) // nt, 65535 * 4))


def _flat(a):
    return a.reshape(a.size) if a.ndim != 1 else a


def _device_float(kernel_name, grid, *args) -> float:
    """Launch a helper kernel that accumulates into one float64 and read that float back."""
    k = kernels(threads_per_block())
    out = cuda.to_device(np.zeros(1))
    k[kernel_name][grid, k["threads"]](*args, out)
    return float(out.copy_to_host()[0])


def index_weight_sum(d_target, d_weight, ignore_index) -> float:
    """sum_i w_{y_i} over the rows whose target is not ``ignore_index`` (torch's denominator for
    reduction="mean"), summed on the device (compensated, one block); ``d_weight`` (C,) float64,
    on the host or the device. The targets must have been checked first
    (:func:`count_invalid_targets`)."""
    t = as_device(d_target)
    if t.shape[0] == 0:
        return 0.0
    w = _to_device(np.asarray(d_weight, np.float64) if not is_device_array(d_weight)
                   else d_weight)
    return _device_float("index_weight_sum", 1, t, w, int(ignore_index))


def count_invalid_targets(d_target, n_classes, ignore_index) -> int:
    """How many targets lie outside [0, n_classes) and are not ``ignore_index`` (on the device)."""
    t = _flat(as_device(d_target))
    if t.size == 0:
        return 0
    nt = threads_per_block()
    return int(_device_float("count_invalid", _grid_1d(t.size, nt), t, int(n_classes),
                             int(ignore_index)))


def count_negative(d_array) -> int:
    """How many entries of a device array are < 0 (NaN is not)."""
    a = _flat(as_device(d_array))
    if a.size == 0:
        return 0
    return int(_device_float("count_negative", _grid_1d(a.size, threads_per_block()), a))


def reduce_loss(d_per_sample, reduction, denom, dtype):
    """Per-sample float64 losses (device) reduced on the device and cast to ``dtype``: the same
    shape for "none", else a (1,) array holding the sum ("sum") or sum / denom ("mean"; NaN when
    denom is 0, as torch)."""
    k = kernels(threads_per_block())
    nt = k["threads"]
    flat = _flat(d_per_sample)
    if reduction == "none":
        out = cuda.device_array(flat.size, dtype)
        if flat.size:
            k["scale_cast"][_grid_1d(flat.size, nt), nt](flat, 1.0, out)
        return out.reshape(d_per_sample.shape)
    total = cuda.device_array(1, np.float64)
    k["reduce_sum"][1, nt](flat, total)
    factor = 1.0 if reduction == "sum" else (1.0 / denom if denom else math.nan)
    out = cuda.device_array(1, dtype)
    k["scale_cast"][1, 1](total, factor, out)
    return out


# --------------------------------------------------------------------------------------------
# Launches and host wrappers with the signatures of cestudy.kernels.cpu
# --------------------------------------------------------------------------------------------
def _outputs(logits, loss_shape, out_loss, out_grad):
    """Device buffers for the kernel's outputs (the callers' own when on the device) and a
    stand-in gradient (never written) for the forward, so that forward and fused launches share
    one compiled specialisation."""
    d_loss = as_device(out_loss) if is_device_array(out_loss) else cuda.device_array(
        loss_shape, np.float64)
    if out_grad is None:
        return d_loss, cuda.device_array((1, 1), dtype=logits.dtype)
    if is_device_array(out_grad):
        return d_loss, as_device(out_grad)
    return d_loss, cuda.device_array(logits.shape, logits.dtype)


def _finish(out_loss, d_loss, out_grad, d_grad):
    if not is_device_array(out_loss):
        d_loss.copy_to_host(out_loss)
    if out_grad is not None and not is_device_array(out_grad):
        d_grad.copy_to_host(out_grad)


def _launch_rows(name, logits, extra, grad_scale, out_loss, out_grad):
    """Launch row kernel ``name``: the block size and threads per row follow the class count,
    float32 logits take the fast32 path."""
    n, c = logits.shape
    d_loss, d_grad = _outputs(logits, n, out_loss, out_grad)
    if n:
        nt = threads_per_block(c)
        tpr = threads_per_row(c, nt)
        k = kernels(nt, logits.dtype == np.float32)
        args = [_to_device(a) if isinstance(a, np.ndarray) or is_device_array(a) else a
                for a in (logits, *extra)]
        rows_per_block = nt // tpr
        k[name][(n + rows_per_block - 1) // rows_per_block, nt](
            *args, float(grad_scale), out_grad is not None, tpr, d_loss, d_grad)
    _finish(out_loss, d_loss, out_grad, d_grad)


def _class_weight(weight):
    """(device weight, its compensated sum): the weight stays where it is."""
    if is_device_array(weight):
        w = as_device(weight)
        return w, _device_float("reduce_sum", 1, w)
    w = np.asarray(weight, dtype=np.float64)
    return cuda.to_device(w), float(math.fsum(w))


def cross_entropy_index_fwd(logits, target, weight, ignore_index, label_smoothing, out_loss):
    cross_entropy_index_fwd_grad(logits, target, weight, ignore_index, label_smoothing, 1.0,
                                 out_loss, None)


def cross_entropy_index_fwd_grad(logits, target, weight, ignore_index, label_smoothing,
                                 grad_scale, out_loss, out_grad):
    w, wsum = _class_weight(weight)
    _launch_rows("cross_entropy_index", logits, (target, w, int(ignore_index),
                                                 float(label_smoothing), wsum),
                 grad_scale, out_loss, out_grad)


def cross_entropy_prob_fwd(logits, target, weight, label_smoothing, out_loss):
    cross_entropy_prob_fwd_grad(logits, target, weight, label_smoothing, 1.0, out_loss, None)


def cross_entropy_prob_fwd_grad(logits, target, weight, label_smoothing, grad_scale, out_loss,
                                out_grad):
    _launch_rows("cross_entropy_prob", logits,
                 (target, _class_weight(weight)[0], float(label_smoothing)), grad_scale,
                 out_loss, out_grad)


def kl_divergence_fwd(logits, target, out_loss):
    kl_divergence_fwd_grad(logits, target, 1.0, out_loss, None)


def kl_divergence_fwd_grad(logits, target, grad_scale, out_loss, out_grad):
    _launch_rows("kl_divergence", logits, (target,), grad_scale, out_loss, out_grad)


def softmax_focal_fwd(logits, target, weight, ignore_index, gamma, out_loss):
    softmax_focal_fwd_grad(logits, target, weight, ignore_index, gamma, 1.0, out_loss, None)


def softmax_focal_fwd_grad(logits, target, weight, ignore_index, gamma, grad_scale, out_loss,
                           out_grad):
    _launch_rows("softmax_focal", logits, (target, _class_weight(weight)[0], int(ignore_index),
                                           float(gamma)), grad_scale, out_loss, out_grad)


def _dense(w, shape):
    """An element-wise weight as a dense (N, C) device array (host broadcast views expanded)."""
    if is_device_array(w):
        return as_device(w)
    return cuda.to_device(np.ascontiguousarray(np.broadcast_to(np.asarray(w, np.float64), shape)))


def _launch_elements(name, logits, extra, grad_scale, out_loss, out_grad):
    """Launch element kernel ``name``; a 1-D ``out_loss`` of length N takes row sums (computed
    on the device from the per-element losses), as on the CPU."""
    row_sums = len(out_loss.shape) == 1
    per_elem = cuda.device_array(logits.shape, np.float64) if row_sums else None
    d_loss, d_grad = _outputs(logits, logits.shape, None if row_sums else out_loss, out_grad)
    if row_sums:
        d_loss = per_elem
    nt = threads_per_block()
    k = kernels(nt)
    n, c = logits.shape
    if n * c:
        args = [_to_device(a) if isinstance(a, np.ndarray) or is_device_array(a) else a
                for a in (logits, *extra)]
        k[name][_grid_1d(n * c, nt), nt](*args, float(grad_scale), out_grad is not None,
                                         d_loss, d_grad)
    if row_sums:
        sums = as_device(out_loss) if is_device_array(out_loss) else cuda.device_array(
            n, np.float64)
        if n:
            tpr = threads_per_row(c, nt)
            k["row_sum"][(n * tpr + nt - 1) // nt, nt](per_elem, tpr, sums)
        d_loss = sums
    _finish(out_loss, d_loss, out_grad, d_grad)


def bce_with_logits_fwd(logits, target, weight, pos_weight, out_loss):
    bce_with_logits_fwd_grad(logits, target, weight, pos_weight, 1.0, out_loss, None)


def bce_with_logits_fwd_grad(logits, target, weight, pos_weight, grad_scale, out_loss, out_grad):
    _launch_elements("bce_with_logits", logits, (target, _dense(weight, logits.shape),
                                                 _dense(pos_weight, logits.shape)),
                     grad_scale, out_loss, out_grad)


def sigmoid_focal_fwd(logits, target, alpha, gamma, out_loss):
    sigmoid_focal_fwd_grad(logits, target, alpha, gamma, 1.0, out_loss, None)


def sigmoid_focal_fwd_grad(logits, target, alpha, gamma, grad_scale, out_loss, out_grad):
    _launch_elements("sigmoid_focal", logits, (target, float(alpha), float(gamma)), grad_scale,
                     out_loss, out_grad)
