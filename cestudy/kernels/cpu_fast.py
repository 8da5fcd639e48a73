"""Fast float32 CPU kernels: the same accuracy contract as ``cpu.py``, at memory speed.

numba 0.68 has no SVML, so ``math.exp`` in a jitted loop stays a scalar libm call (about 3 ns per
element). These kernels use ``exp_neg``, an exp that LLVM vectorises: ``scalar.exp_parts``
(float64 Cody-Waite range reduction, a degree-9 Taylor polynomial on |r| <= ln2/2, truncation
error < 7e-12 relative, 1e-4 of a float32 ulp) and 2^n built by an int64-to-float64 bitcast. For
float32 inputs every step stays in float64:

- x_j - m is exact in float64 (both are float32), so the tiny losses of confident rows, where
  the rounding of x_j - m would decide the result in float32 arithmetic, need no special path;
- the sum of exp terms is a plain float64 sum, vectorised with the ``reassoc`` flag (partial
  sums); its relative error is at most C * 2^-53 (3e-11 for C = 262144), far below a float32 ulp.

The result is rounded to float32 once, so the kernels stay within 1 ulp of the exact value
(measured in ``tests/test_fast_kernels.py`` and the studies). Terms below exp(-708) are flushed
to 0: they cannot affect a float32 result. Only ``contract`` (FMA) and ``reassoc`` are used:
never ``nnan``/``ninf``, which would fold away the NaN checks. The maximum is taken over integer
keys of the bit patterns, a reduction LLVM vectorises without fast-math flags.
"""
import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from . import scalar
from .cpu import argmax_grad, bcast_row, compensated_sum, loss_row, row_guard, store_row_sum

_OPTS = dict(cache=True, error_model="numpy", nogil=True)
_SUM = dict(fastmath={"reassoc", "contract"}, **_OPTS)
# the shared formulas again, with FMA contraction for the polynomials (not cached: a second
# cached compilation of the same source with other flags would share cpu.py's cache entries)
_F = scalar.compiled(njit(fastmath={"contract"}, error_model="numpy", nogil=True))
soft_target = _F.soft_target
_exp_parts = _F.exp_parts
EXP_FLUSH = scalar.EXP_FLUSH


def _bitcast(int_type, float_type, llvm_type, doc):
    """An intrinsic that reinterprets ``int_type`` bits as ``float_type`` (no conversion)."""

    @intrinsic
    def cast(typingctx, x):
        if x != int_type:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], llvm_type)

        return float_type(int_type), codegen

    cast.__doc__ = doc
    return cast


_bits_to_float64 = _bitcast(types.int64, types.float64, ir.DoubleType(),
                            "int64 bits as float64: how 2^n is built without ldexp.")
_bits_to_float32 = _bitcast(types.int32, types.float32, ir.FloatType(),
                            "int32 bits as float32: the maximum back from its integer key.")


@njit(fastmath={"contract"}, **_OPTS)
def exp_neg(d):
    """exp(d) for d <= 0 in float64, vectorisable, relative error < 7e-12; 0 for d < -708
    (and for d = -inf). NaN propagates through the polynomial."""
    p, n = _exp_parts(max(d, EXP_FLUSH))
    res = p * _bits_to_float64((np.int64(n) + 1023) << 52)
    return 0.0 if d < EXP_FLUSH else res


@njit(**_OPTS)
def row_max_f32(x):
    """(m, has_nan) of a float32 row, m as float64.

    The maximum is taken over order-preserving integer keys of the bit patterns
    (key = bits ^ ((bits >> 31) & 0x7fffffff)), an integer max reduction that LLVM vectorises
    without fast-math flags; a float max reduction would need ``nnan``. NaNs are counted apart."""
    bits = x.view(np.int32)
    best = -2147483648  # numba computes in int64: the keys stay within int32's range
    nans = 0
    for j in range(bits.shape[0]):
        b = np.int64(bits[j])
        nans += (b & 0x7FFFFFFF) > 0x7F800000
        best = max(best, b ^ ((b >> 31) & 0x7FFFFFFF))
    m = _bits_to_float32(np.int32(best ^ ((best >> 31) & 0x7FFFFFFF)))
    return np.float64(m), nans > 0


@njit(**_OPTS)
def row_start_f32(x, ignored, with_grad, g):
    """:func:`cestudy.kernels.cpu.row_start` for float32 rows: ``(skip, fill, m)``."""
    m, bad = (0.0, False) if ignored else row_max_f32(x)
    skip, fill = row_guard(ignored, bad, m)
    if skip and with_grad:
        g[:] = fill
    return skip, fill, m


@njit(**_OPTS)
def first_index_of(x, m):
    for j in range(x.shape[0]):
        if x[j] == m:
            return j
    return 0


@njit(**_SUM)
def row_sumexp_f32(x, m, store, out):
    """S = sum_{j != k} exp(x_j - m) in float64 (vectorised partial sums), k one argmax: the
    terms below the maximum, plus 1 for each further tie. With ``store``, also
    out_j = float32(exp(x_j - m))."""
    s = 0.0
    ties = 0
    for j in range(x.shape[0]):
        d = np.float64(x[j]) - m
        e = exp_neg(d)
        if store:
            out[j] = np.float32(e)
        s += e if d < 0.0 else 0.0
        ties += d == 0.0
    return s + (ties - 1)


@njit(**_SUM)
def row_weighted_shift_sum_f32(x, w, m):
    """sum_c w_c (m - x_c) in float64 (all terms >= 0; +inf for masked classes)."""
    s = 0.0
    for j in range(x.shape[0]):
        s += w[j] * (m - np.float64(x[j]))
    return s


@njit(**_SUM)
def row_scale_f32(g, a, b, w):
    """g_j = float32(a * g_j - b * w_j): turns stored exps into the gradient row."""
    for j in range(g.shape[0]):
        g[j] = np.float32(a * np.float64(g[j]) - b * w[j])


@njit(**_OPTS)
def _ce_index_row(x, y, weight, wsum, ignore_index, eps, grad_scale, with_grad, g):
    """One row of the float32 class-index cross-entropy (two passes over a row that stays in
    L2, three with the gradient)."""
    skip, fill, m = row_start_f32(x, y == ignore_index, with_grad, g)  # pass 1: from memory
    if skip:
        return fill
    nc = x.shape[0]
    s = row_sumexp_f32(x, m, with_grad, g)  # pass 2: the row is in L2
    L = math.log1p(s)
    loss = weight[y] * ((m - np.float64(x[y])) + L)
    if eps != 0.0:
        smooth = row_weighted_shift_sum_f32(x, weight, m) + wsum * L
        loss = (1.0 - eps) * loss + (eps / nc) * smooth
    if not with_grad:
        return loss
    y_top = np.float64(x[y]) == m  # y is (one of) the argmax: p_y - 1 = -S / (1 + S)
    z = 1.0 + s
    c_true = (1.0 - eps) * weight[y] * grad_scale
    c_smooth = (eps / nc) * grad_scale
    row_scale_f32(g, (c_true + c_smooth * wsum) / z, c_smooth, weight)
    # entries that the scaled row would get by cancellation, recomputed exactly
    e_y = 1.0 if y_top else math.exp(np.float64(x[y]) - m)
    p_y = e_y / z
    g_y = c_true * (-s / z if y_top else p_y - 1.0)
    if eps != 0.0:
        g_y += c_smooth * (argmax_grad(wsum, weight[y], s, z) if y_top
                           else wsum * p_y - weight[y])
        if not y_top:
            k = first_index_of(x, np.float32(m))
            g[k] = np.float32(c_true / z + c_smooth * argmax_grad(wsum, weight[k], s, z))
    g[y] = np.float32(g_y)
    return loss


@njit(parallel=True, **_OPTS)
def cross_entropy_index_fwd(logits, target, weight, ignore_index, label_smoothing, out_loss):
    """float32 version of :func:`cestudy.kernels.cpu.cross_entropy_index_fwd` (same signature
    and semantics); ``logits`` must be float32."""
    wsum = compensated_sum(weight)
    for i in prange(logits.shape[0]):
        out_loss[i] = _ce_index_row(logits[i], target[i], weight, wsum, ignore_index,
                                    label_smoothing, 1.0, False, logits[i])


@njit(parallel=True, **_OPTS)
def cross_entropy_index_fwd_grad(logits, target, weight, ignore_index, label_smoothing,
                                 grad_scale, out_loss, out_grad):
    """float32 version of :func:`cestudy.kernels.cpu.cross_entropy_index_fwd_grad`.

    Three passes over a row that stays in L2: the max; exp(x_j - m) stored as float32 into the
    gradient row while S is summed in float64; then the row is scaled into the gradient
    (1 rounding of e_j, 1 of the result: < 1.5 ulp). The true-class entry and, with label
    smoothing, the argmax entry are recomputed by the cancellation-free formulas."""
    wsum = compensated_sum(weight)
    for i in prange(logits.shape[0]):
        out_loss[i] = _ce_index_row(logits[i], target[i], weight, wsum, ignore_index,
                                    label_smoothing, grad_scale, True, out_grad[i])


# --------------------------------------------------------------------------------------------
# Soft-target cross-entropy, float32
# --------------------------------------------------------------------------------------------
@njit(**_SUM)
def _row_soft_target_sums(x, t, w, m, eps):
    """(A, T) = (sum_c a_c, sum_c a_c (m - x_c)), a_c = w_c ((1 - eps) t_c + eps / C); terms with
    a_c = 0 contribute 0 (also where x_c = -inf)."""
    nc = x.shape[0]
    a_sum = 0.0
    t_sum = 0.0
    for j in range(nc):
        a = soft_target(w[j], np.float64(t[j]), eps, nc)
        a_sum += a
        t_sum += a * (m - np.float64(x[j])) if a != 0.0 else 0.0
    return a_sum, t_sum


@njit(**_SUM)
def _row_soft_target_grad(g, t, w, eps, scale_q, scale_a):
    """g_j = float32(scale_q * e_j - scale_a * a_j), e_j stored in g."""
    nc = g.shape[0]
    for j in range(nc):
        a = soft_target(w[j], np.float64(t[j]), eps, nc)
        g[j] = np.float32(scale_q * np.float64(g[j]) - scale_a * a)


@njit(**_OPTS)
def _ce_prob_row(x, t, weight, eps, grad_scale, with_grad, g):
    """One row of the float32 soft-target cross-entropy; the argmax entry of the gradient is
    recomputed without cancellation as (A - a_k - a_k S) / (1 + S)."""
    skip, fill, m = row_start_f32(x, False, with_grad, g)
    if skip:
        return fill
    s = row_sumexp_f32(x, m, with_grad, g)
    a_sum, t_sum = _row_soft_target_sums(x, t, weight, m, eps)
    if with_grad:
        z = 1.0 + s
        _row_soft_target_grad(g, t, weight, eps, a_sum / z * grad_scale, grad_scale)
        k = first_index_of(x, np.float32(m))
        a_k = soft_target(weight[k], np.float64(t[k]), eps, x.shape[0])
        g[k] = np.float32(argmax_grad(a_sum, a_k, s, z) * grad_scale)
    return t_sum + a_sum * math.log1p(s)


@njit(parallel=True, **_OPTS)
def cross_entropy_prob_fwd(logits, target, weight, label_smoothing, out_loss):
    """float32 version of :func:`cestudy.kernels.cpu.cross_entropy_prob_fwd`."""
    for i in prange(logits.shape[0]):
        out_loss[i] = _ce_prob_row(logits[i], target[i], weight, label_smoothing, 1.0, False,
                                   logits[i])


@njit(parallel=True, **_OPTS)
def cross_entropy_prob_fwd_grad(logits, target, weight, label_smoothing, grad_scale, out_loss,
                                out_grad):
    """float32 version of :func:`cestudy.kernels.cpu.cross_entropy_prob_fwd_grad`."""
    for i in prange(logits.shape[0]):
        out_loss[i] = _ce_prob_row(logits[i], target[i], weight, label_smoothing, grad_scale,
                                   True, out_grad[i])


# --------------------------------------------------------------------------------------------
# Binary cross-entropy with logits, float32
# --------------------------------------------------------------------------------------------
@njit(fastmath={"contract"}, **_OPTS)
def log1p_unit(e):
    """log1p(e) for 0 <= e <= 1 in float64, vectorisable, relative error < 1e-13:
    2 atanh(s) with s = e / (2 + e) <= 1/3, the series sum_k s^(2k+1) / (2k+1) to k = 12."""
    s = e / (2.0 + e)
    s2 = s * s
    p = 1.0 / 25.0
    p = p * s2 + 1.0 / 23.0
    p = p * s2 + 1.0 / 21.0
    p = p * s2 + 1.0 / 19.0
    p = p * s2 + 1.0 / 17.0
    p = p * s2 + 1.0 / 15.0
    p = p * s2 + 1.0 / 13.0
    p = p * s2 + 1.0 / 11.0
    p = p * s2 + 1.0 / 9.0
    p = p * s2 + 1.0 / 7.0
    p = p * s2 + 1.0 / 5.0
    p = p * s2 + 1.0 / 3.0
    p = p * s2 + 1.0
    return 2.0 * s * p


@njit(**_SUM)
def _bce_row(x, t, w, pw, grad_scale, with_grad, lrow, g):
    """One row of BCE with logits: loss_j = w (pw t softplus(-x) + (1 - t) softplus(x)) with
    softplus(+-x) = max(+-x, 0) + log1p(exp(-|x|)); one exp and one log1p per element. Losses
    into ``lrow`` unless it is None; returns the row sum (float64 partial sums of non-negative
    terms: relative error <= C 2^-53, far below a float32 ulp)."""
    total = 0.0
    for j in range(x.shape[0]):
        v = np.float64(x[j])
        tj = np.float64(t[j])
        e = exp_neg(-abs(v))
        lp = log1p_unit(e)
        sp_pos = max(v, 0.0) + lp
        sp_neg = max(-v, 0.0) + lp
        loss = w[j] * (pw[j] * tj * sp_neg + (1.0 - tj) * sp_pos)
        total += loss
        if lrow is not None:  # pruned at compile time when None
            lrow[j] = loss
        if with_grad:
            r = 1.0 / (1.0 + e)
            sig_pos = r if v >= 0.0 else e * r
            sig_neg = e * r if v >= 0.0 else r
            g[j] = np.float32(w[j] * ((1.0 - tj) * sig_pos - pw[j] * tj * sig_neg) * grad_scale)
    return total


@njit(parallel=True, **_OPTS)
def bce_with_logits_fwd(logits, target, weight, pos_weight, out_loss):
    """float32 version of :func:`cestudy.kernels.cpu.bce_with_logits_fwd`. ``weight`` and
    ``pos_weight`` are (N, C) or, when the same for every row, (1, C): contiguous rows keep the
    loop vectorised (zero-stride broadcast views made it 6x slower). ``out_loss`` (N, C) for
    per-element losses, (N,) for row sums."""
    for i in prange(logits.shape[0]):
        x = logits[i]
        total = _bce_row(x, target[i], bcast_row(weight, i), bcast_row(pos_weight, i), 1.0,
                         False, loss_row(out_loss, i), x)
        store_row_sum(out_loss, i, total)


@njit(parallel=True, **_OPTS)
def bce_with_logits_fwd_grad(logits, target, weight, pos_weight, grad_scale, out_loss, out_grad):
    """float32 version of :func:`cestudy.kernels.cpu.bce_with_logits_fwd_grad` (weights and
    ``out_loss`` as in :func:`bce_with_logits_fwd`)."""
    for i in prange(logits.shape[0]):
        total = _bce_row(logits[i], target[i], bcast_row(weight, i), bcast_row(pos_weight, i),
                         grad_scale, True, loss_row(out_loss, i),
                         out_grad[i])
        store_row_sum(out_loss, i, total)
