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

from . import _scalar

_dev = cuda.jit(device=True)
two_diff = _dev(_scalar.two_diff)
exp_dd = _dev(_scalar.exp_dd)
softplus = _dev(_scalar.softplus)
sigmoid = _dev(_scalar.sigmoid)
neumaier_add = _dev(_scalar.neumaier_add)
pow_nonneg = _dev(_scalar.pow_nonneg)
EXP_UNDERFLOW = _scalar.EXP_UNDERFLOW

# Threads per block for the row kernels: a power of two (the tree reduction halves it). Tests in
# the simulator lower it so that several blocks run quickly.
MAX_THREADS = 1024


def threads_per_block() -> int:
    t = int(os.environ.get("CESTUDY_CUDA_THREADS", "256"))
    if t < 1 or t > MAX_THREADS or t & (t - 1):
        raise ValueError(f"CESTUDY_CUDA_THREADS must be a power of two in 1..{MAX_THREADS}; "
                         f"got {t}")
    return t


# --------------------------------------------------------------------------------------------
# Device functions: the row statistics and block reductions
# --------------------------------------------------------------------------------------------
@cuda.jit(device=True)
def _scaled(m_from, m_to):
    """exp(m_from - m_to) for m_from <= m_to, from the exact difference (0 for -inf)."""
    hi, lo = two_diff(m_from, m_to)
    if hi < EXP_UNDERFLOW:
        return 0.0
    return exp_dd(hi, lo)


@cuda.jit(device=True)
def row_stats(x, tid, nt, sh_m, sh_s, sh_t, sh_k, sh_bad):
    """Block-wide (m, S, k, bad) of row x: m = max, S = sum_{j != k} exp(x_j - m), k = first
    argmax, bad = the row holds a NaN. One read of the row; every thread gets the result."""
    n = x.shape[0]
    m = -math.inf
    s = 0.0
    c = 0.0
    t = 0
    k = n
    bad = 0
    for j in range(tid, n, nt):
        v = float64(x[j])
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
        else:
            hi, lo = two_diff(v, m)
            if hi >= EXP_UNDERFLOW:
                s, c = neumaier_add(s, c, exp_dd(hi, lo))
    sh_m[tid] = m
    sh_s[tid] = s + c
    sh_t[tid] = t
    sh_k[tid] = k
    sh_bad[tid] = bad
    cuda.syncthreads()
    stride = nt // 2
    while stride > 0:
        if tid < stride:
            m1 = sh_m[tid]
            m2 = sh_m[tid + stride]
            s1 = sh_s[tid]
            s2 = sh_s[tid + stride]
            t1 = sh_t[tid]
            t2 = sh_t[tid + stride]
            k1 = sh_k[tid]
            k2 = sh_k[tid + stride]
            if m2 > m1:
                m1, m2 = m2, m1
                s1, s2 = s2, s1
                t1, t2 = t2, t1
                k1, k2 = k2, k1
            if m2 == m1:
                sh_s[tid] = s1 + s2
                sh_t[tid] = t1 + t2
                sh_k[tid] = min(k1, k2)
            else:
                sh_s[tid] = s1 + (s2 + t2) * _scaled(m2, m1)
                sh_t[tid] = t1
                sh_k[tid] = k1
            sh_m[tid] = m1
            sh_bad[tid] = max(sh_bad[tid], sh_bad[tid + stride])
        cuda.syncthreads()
        stride //= 2
    m = sh_m[0]
    S = sh_s[0] + (sh_t[0] - 1)
    k = sh_k[0]
    bad = sh_bad[0]
    cuda.syncthreads()  # the shared arrays are reused by the caller
    return m, S, k, bad


@cuda.jit(device=True)
def block_sum(v, tid, nt, sh):
    """Sum of one float64 per thread over the block (tree in shared memory)."""
    sh[tid] = v
    cuda.syncthreads()
    stride = nt // 2
    while stride > 0:
        if tid < stride:
            sh[tid] += sh[tid + stride]
        cuda.syncthreads()
        stride //= 2
    total = sh[0]
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


@cuda.jit(device=True)
def exp_shifted(v, m):
    hi, lo = two_diff(v, m)
    if hi < EXP_UNDERFLOW:
        return 0.0
    return exp_dd(hi, lo)


# --------------------------------------------------------------------------------------------
# Kernel factories (one compiled set per block size)
# --------------------------------------------------------------------------------------------
_CACHE = {}


def kernels(nt=None):
    """The kernel set for ``nt`` threads per block (compiled lazily, cached)."""
    nt = threads_per_block() if nt is None else nt
    if nt not in _CACHE:
        _CACHE[nt] = _make_kernels(nt)
    return _CACHE[nt]


def _make_kernels(NT):
    """Build the kernels for NT threads per block; returns {name: kernel}. ``PYFUNCS`` keeps the
    plain Python functions so that tests can compile each one to PTX."""

    def ce_index(x, target, weight, ignore_index, eps, wsum, grad_scale, with_grad, out_loss,
                 out_grad):
        sh_m = cuda.shared.array(NT, float64)
        sh_s = cuda.shared.array(NT, float64)
        sh_t = cuda.shared.array(NT, int64)
        sh_k = cuda.shared.array(NT, int64)
        sh_b = cuda.shared.array(NT, int64)
        i = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        row = x[i]
        nc = row.shape[0]
        y = target[i]
        if y == ignore_index:
            if tid == 0:
                out_loss[i] = 0.0
            if with_grad:
                for j in range(tid, nc, NT):
                    out_grad[i, j] = 0.0
            return
        xy = float64(row[y])
        m, s, k, bad = row_stats(row, tid, NT, sh_m, sh_s, sh_t, sh_k, sh_b)
        if bad != 0 or not math.isfinite(m):
            if tid == 0:
                out_loss[i] = math.nan
            if with_grad:
                for j in range(tid, nc, NT):
                    out_grad[i, j] = math.nan
            return
        L = math.log1p(s)
        loss = weight[y] * neg_log_prob(xy, m, L)
        if eps != 0.0:
            ps = 0.0
            pc = 0.0
            for j in range(tid, nc, NT):
                ps, pc = neumaier_add(ps, pc, weight[j] * (m - float64(row[j])))
            smooth = block_sum(ps + pc, tid, NT, sh_s) + wsum * L
            loss = (1.0 - eps) * loss + (eps / nc) * smooth
        if tid == 0:
            out_loss[i] = loss
        if with_grad:
            z = 1.0 + s
            y_top = xy == m
            c_true = (1.0 - eps) * weight[y] * grad_scale
            c_smooth = (eps / nc) * grad_scale
            for j in range(tid, nc, NT):
                v = float64(row[j])
                p = exp_shifted(v, m) / z
                if j == y:
                    g = c_true * (-s / z if y_top else p - 1.0)
                else:
                    g = c_true * p
                if eps != 0.0:
                    if (j == y and y_top) or (j == k and not y_top):
                        g += c_smooth * argmax_grad(wsum, weight[j], s, z)
                    else:
                        g += c_smooth * (wsum * p - weight[j])
                out_grad[i, j] = g

    def ce_prob(x, target, weight, eps, grad_scale, with_grad, out_loss, out_grad):
        sh_m = cuda.shared.array(NT, float64)
        sh_s = cuda.shared.array(NT, float64)
        sh_t = cuda.shared.array(NT, int64)
        sh_k = cuda.shared.array(NT, int64)
        sh_b = cuda.shared.array(NT, int64)
        i = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        row = x[i]
        trow = target[i]
        nc = row.shape[0]
        m, s, k, bad = row_stats(row, tid, NT, sh_m, sh_s, sh_t, sh_k, sh_b)
        if bad != 0 or not math.isfinite(m):
            if tid == 0:
                out_loss[i] = math.nan
            if with_grad:
                for j in range(tid, nc, NT):
                    out_grad[i, j] = math.nan
            return
        L = math.log1p(s)
        sa = 0.0
        ca = 0.0
        st = 0.0
        ct = 0.0
        for j in range(tid, nc, NT):
            a = weight[j] * ((1.0 - eps) * float64(trow[j]) + eps / nc)
            if a != 0.0:
                sa, ca = neumaier_add(sa, ca, a)
                hi, lo = two_diff(m, float64(row[j]))
                st, ct = neumaier_add(st, ct, a * hi)
                ct += a * lo
        a_sum = block_sum(sa + ca, tid, NT, sh_s)
        t_sum = block_sum(st + ct, tid, NT, sh_s)
        if tid == 0:
            out_loss[i] = t_sum + a_sum * L
        if with_grad:
            z = 1.0 + s
            for j in range(tid, nc, NT):
                a = weight[j] * ((1.0 - eps) * float64(trow[j]) + eps / nc)
                if j == k:
                    g = argmax_grad(a_sum, a, s, z)
                else:
                    g = a_sum * (exp_shifted(float64(row[j]), m) / z) - a
                out_grad[i, j] = g * grad_scale

    def kl(x, target, grad_scale, with_grad, out_loss, out_grad):
        sh_m = cuda.shared.array(NT, float64)
        sh_s = cuda.shared.array(NT, float64)
        sh_t = cuda.shared.array(NT, int64)
        sh_k = cuda.shared.array(NT, int64)
        sh_b = cuda.shared.array(NT, int64)
        i = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        row = x[i]
        prow = target[i]
        nc = row.shape[0]
        m, s, k, bad = row_stats(row, tid, NT, sh_m, sh_s, sh_t, sh_k, sh_b)
        if bad != 0 or not math.isfinite(m):
            if tid == 0:
                out_loss[i] = math.nan
            if with_grad:
                for j in range(tid, nc, NT):
                    out_grad[i, j] = math.nan
            return
        L = math.log1p(s)
        ks = 0.0
        kc = 0.0
        ps = 0.0
        pc = 0.0
        for j in range(tid, nc, NT):
            p = float64(prow[j])
            if p != 0.0:
                hi, lo = two_diff(m, float64(row[j]))
                ks, kc = neumaier_add(ks, kc, p * ((hi + L) + (math.log(p) + lo)))
            ps, pc = neumaier_add(ps, pc, p)
        total = block_sum(ks + kc, tid, NT, sh_s)
        p_sum = block_sum(ps + pc, tid, NT, sh_s)
        if tid == 0:
            out_loss[i] = total
        if with_grad:
            z = 1.0 + s
            for j in range(tid, nc, NT):
                p = float64(prow[j])
                if j == k:
                    g = argmax_grad(p_sum, p, s, z)
                else:
                    g = p_sum * (exp_shifted(float64(row[j]), m) / z) - p
                out_grad[i, j] = g * grad_scale

    def focal_softmax(x, target, weight, ignore_index, gamma, grad_scale, with_grad, out_loss,
                      out_grad):
        sh_m = cuda.shared.array(NT, float64)
        sh_s = cuda.shared.array(NT, float64)
        sh_t = cuda.shared.array(NT, int64)
        sh_k = cuda.shared.array(NT, int64)
        sh_b = cuda.shared.array(NT, int64)
        i = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        row = x[i]
        nc = row.shape[0]
        y = target[i]
        if y == ignore_index:
            if tid == 0:
                out_loss[i] = 0.0
            if with_grad:
                for j in range(tid, nc, NT):
                    out_grad[i, j] = 0.0
            return
        xy = float64(row[y])
        m, s, k, bad = row_stats(row, tid, NT, sh_m, sh_s, sh_t, sh_k, sh_b)
        if bad != 0 or not math.isfinite(m):
            if tid == 0:
                out_loss[i] = math.nan
            if with_grad:
                for j in range(tid, nc, NT):
                    out_grad[i, j] = math.nan
            return
        z = 1.0 + s
        ce = neg_log_prob(xy, m, math.log1p(s))
        e_y = exp_shifted(xy, m)
        a = s / z if xy == m else (z - e_y) / z
        p_y = e_y / z
        w = weight[y]
        a_gamma = pow_nonneg(a, gamma)
        if tid == 0:
            out_loss[i] = w * a_gamma * ce
        if with_grad:
            inner = gamma * ce * p_y + a
            for j in range(tid, nc, NT):
                if j == y:
                    g = -w * a_gamma * inner
                else:
                    p = exp_shifted(float64(row[j]), m) / z
                    g = 0.0 if p == 0.0 else w * (p / a) * a_gamma * inner
                out_grad[i, j] = g * grad_scale

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
        total = block_sum(s + c, tid, NT, sh)
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
        total = block_sum(s + c, tid, NT, sh)
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
    compiled = {name: cuda.jit(f) for name, f in funcs.items()}
    compiled["_pyfuncs"] = funcs
    compiled["threads"] = NT
    return compiled


ROW_KERNELS = ("ce_index", "ce_prob", "kl", "focal_softmax")
ELEMENT_KERNELS = ("bce_logits", "sigmoid_focal")


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


def _launch_rows(name, n, args):
    k = kernels()
    if n > 0:
        k[name][n, k["threads"]](*args)


def _launch_elements(name, shape, args):
    k = kernels()
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
    _launch_rows("ce_index", logits.shape[0], (
        _to_device(logits), _to_device(target), _to_device(w), int(ignore_index), float(eps),
        wsum, float(grad_scale), out_grad is not None, d_loss,
        d_grad if d_grad is not None else _dummy_grad(logits.dtype)))
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
    args = [_to_device(logits)]
    args += [_to_device(a) if isinstance(a, np.ndarray) or _is_device(a) else a for a in extra]
    args += [float(grad_scale), out_grad is not None, d_loss,
             d_grad if d_grad is not None else _dummy_grad(logits.dtype)]
    _launch_rows(name, logits.shape[0], tuple(args))
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
    k = kernels()
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
    k = kernels()
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
