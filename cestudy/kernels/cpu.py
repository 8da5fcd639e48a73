"""Numba CPU kernels: the accurate reference-quality implementations behind the public API.

This module holds raw kernels only: no validation, no dtype conversion, no reductions over the
batch beyond what a kernel documents. ``cestudy.dispatch`` validates, converts and reduces.

Every kernel is a plain ``@njit`` function (parallel over rows with ``prange``) that other
projects may call from their own jitted code. Conventions shared by all kernels:

- ``logits`` is a C-contiguous float32 or float64 array of shape (N, C). All arithmetic is done in
  float64; float32 inputs are exact in float64, so for them the float64 evaluation is far more
  accurate than needed and the single final rounding gives <= 1 ulp. For float64 inputs the
  differences ``x_j - m`` are formed exactly with a two-sum and all sums are compensated
  (Neumaier), which keeps a few ulp even where the loss is tiny.
- Per-sample losses are written as float64 into ``out_loss`` (shape (N,) for row losses); the
  caller reduces and rounds them once. Element-wise losses (BCE with logits, sigmoid focal)
  write one loss per element when ``out_loss`` has the logits' shape (N, C), and when it is 1-D
  of length N, the compensated sum of each row instead (what "mean" and "sum" need, without an
  N x C float64 array).
- Gradients are written into ``out_grad`` (same shape and dtype as ``logits``), already multiplied
  by ``grad_scale`` (1 for "sum"/"none", 1/denominator for "mean").
  ``out_grad`` may be ``logits`` itself (the gradient written over the logits): every kernel reads
  what a row needs from the logits before it writes that row, or writes each element after the
  last read of it.
- A row containing NaN, or whose maximum is +inf or -inf (all classes masked), yields NaN loss and
  NaN gradient, as ``torch.nn.functional`` does. -inf logits of other classes contribute exactly 0.

Formulation (Blanchard, Higham & Higham 2021, "Accurately computing the log-sum-exp and softmax
functions", IMA J. Numer. Anal. 41(4)); with m = max_j x_j, k = argmax_j x_j:

    S   = sum_{j != k} exp(x_j - m)           (each term from the exact difference)
    L   = log1p(S)                            (so that lse = m + L loses nothing when S is tiny)
    -log p_c = (m - x_c) + L                  (a sum of two non-negative terms: no cancellation)
    p_c = exp(x_c - m) / (1 + S)              (softmax by division: error <= n + 3 units, less
                                               with compensated S)
    p_y - 1 = -S / (1 + S)    when y == k     (the true-class gradient keeps full relative accuracy;
                                               ``softmax - onehot`` would round it to 0)

The plain ``lse - x_y`` form returns 0 for a confident-correct row whose true loss is 1e-30, a
100% error; the form above returns it to within 1 ulp.
"""

import math
import types

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import types as nbtypes
from numba.extending import intrinsic, overload

from . import cache, scalar

_OPTS = dict(cache=True, error_model="numpy", nogil=True)


@intrinsic
def fma64(typingctx, a, b, c):
    """a b + c with one rounding (``llvm.fma.f64``; vectorises). Where a loss is a sum of
    products, the kernels write the FMA out: LLVM contracts a product into a sum only where the
    product has no other use (and did so here without the ``contract`` flag), so in a loop that
    also computes the gradient, which reuses the products, it chose otherwise, and the forward
    and fused kernels differed in the last bit of the loss."""
    if not (a == b == c == nbtypes.float64):
        return None

    def codegen(context, builder, signature, args):
        d = ir.DoubleType()
        fn = builder.module.declare_intrinsic("llvm.fma", [d], ir.FunctionType(d, [d, d, d]))
        return builder.call(fn, args)

    return nbtypes.float64(nbtypes.float64, nbtypes.float64, nbtypes.float64), codegen


_S = scalar.compiled(njit(**_OPTS), fma=fma64)
# kernels cached from other sources than these are dropped before numba loads any
# (cpu_fast and linear import this module first)
cache.drop_stale(cache.cache_dir_of(_S.two_sum))
two_sum = _S.two_sum
two_diff = _S.two_diff
exp_dd = _S.exp_dd
exp_diff = _S.exp_diff
softplus = _S.softplus
sigmoid = _S.sigmoid
neumaier_add = _S.neumaier_add
pow_nonneg = _S.pow_nonneg
row_guard = _S.row_guard
argmax_grad = _S.argmax_grad
soft_target = _S.soft_target
kl_term = _S.kl_term
focal_parts = _S.focal_parts
focal_inner = _S.focal_inner
focal_grad = _S.focal_grad
bce_logits = _S.bce_logits
bce_logits_grad = _S.bce_logits_grad
sigmoid_focal = _S.sigmoid_focal
_neg_log_prob_value = _S.neg_log_prob
EXP_UNDERFLOW = scalar.EXP_UNDERFLOW

# Calls of less work than this (:func:`call_work`, in elements of a softmax row) run the
# ``<kernel>_serial`` twin: starting the threads of a parallel loop costs more than a second
# core gives back below it.
SERIAL_BELOW = 1 << 15
ROW_COST = 64
"""What a row costs beyond its elements, in elements: its calls, its maximum, its scalar
remainders (a 10-class fused cross-entropy row takes about as long as 200 elements of a long
row; the forward of short rows in lanes about 60)."""


ELEMENTWISE_COST = 4
"""What an element of a sigmoid loss (BCE with logits, the sigmoid focal loss: an exp, a log1p
and a division in float64) costs, in elements of a softmax row (0.96 against 0.25-0.37 ns a
float32 element, serially)."""


def work(rows, cols, element_cost):
    """The work of ``rows`` rows of ``cols`` elements that cost ``element_cost`` each (1, or
    :data:`ELEMENTWISE_COST`), in elements of a softmax row: rows (cols element_cost +
    :data:`ROW_COST`). Plain Python, also compiled (:data:`work_jit`) for the kernels'
    chunking (``cpu_fast.n_chunks``), so that the two never drift apart."""
    return rows * (cols * element_cost + ROW_COST)


work_jit = njit(**_OPTS)(work)


def call_work(rows, cols, elementwise=False):
    """The work of a call on ``rows`` rows of ``cols`` elements (:func:`work`; an element of a
    sigmoid loss costs :data:`ELEMENTWISE_COST`): what :func:`kernel_for` weighs."""
    return work(rows, cols, ELEMENTWISE_COST if elementwise else 1)


def serial_twin(kernel):
    """``<kernel>_serial``: the same code compiled without ``parallel`` (``prange`` runs as
    ``range``), for calls too small to pay for starting threads. It gets its own name so that
    numba's on-disk cache (keyed by module and qualified name) keeps the two compilations apart."""
    f = kernel.py_func
    name = f.__name__ + "_serial"
    g = types.FunctionType(f.__code__, f.__globals__, name, f.__defaults__, f.__closure__)
    g.__qualname__ = name
    g.__doc__ = f"Serial twin of :func:`{f.__name__}`: same arguments and results, no threads."
    return njit(**_OPTS)(g)


def serial_twins(namespace, names):
    """Put :func:`serial_twin` of each kernel ``name`` in ``namespace`` (a module's globals) as
    ``<name>_serial``."""
    for name in names:
        namespace[name + "_serial"] = serial_twin(namespace[name])


def kernel_for(module, name, work):
    """The kernel ``name`` of ``module`` (``cpu`` or ``cpu_fast``) for a call of ``work``
    (:func:`call_work`, or the number of elements): its serial twin below :data:`SERIAL_BELOW`,
    else the parallel kernel."""
    return getattr(module, name + "_serial" if work < SERIAL_BELOW else name)


# --------------------------------------------------------------------------------------------
# Argument scans (``cestudy.dispatch`` raises the errors)
# --------------------------------------------------------------------------------------------
@njit(**_OPTS)
def indices_in_range(t, n_classes):
    """Whether every entry of the 1-D integer array ``t`` is in [0, n_classes): one vectorised
    min/max pass (numpy's t.min() and t.max() took 2.2 us of a 256 x 10 cross-entropy call;
    this takes 0.3 us there, and half numpy's time on 1e6 targets)."""
    lo = t.dtype.type(0)
    hi = t.dtype.type(0)
    for j in range(t.shape[0]):
        lo = min(lo, t[j])
        hi = max(hi, t[j])
    return lo >= 0 and hi < n_classes


# --------------------------------------------------------------------------------------------
# Row primitives
# --------------------------------------------------------------------------------------------
@njit(**_OPTS)
def row_max(x):
    """Return (m, k, has_nan): the maximum of the 1-D row x (as float64), its first index, and
    whether the row holds a NaN."""
    m = -np.inf
    k = 0
    has_nan = False
    for j in range(x.shape[0]):
        v = np.float64(x[j])
        if v > m:
            m = v
            k = j
        elif v != v:
            has_nan = True
    return m, k, has_nan


@njit(**_OPTS)
def row_start(x, ignored, with_grad, g):
    """The prologue of every softmax-family row: ``(skip, fill, m, k)``. When ``skip`` the row's
    loss is ``fill`` (0 ignored, NaN invalid: :func:`scalar.row_guard`) and, with ``with_grad``,
    its gradient row ``g`` has been filled with it; an ignored row is not read."""
    m, k, has_nan = (0.0, 0, False) if ignored else row_max(x)
    skip, fill = row_guard(ignored, has_nan, m)
    if skip and with_grad:
        g[:] = fill
    return skip, fill, m, k


@njit(**_OPTS)
def row_sumexp(x, m, k):
    """S = sum_{j != k} exp(x_j - m) for a row with finite maximum m at index k.

    Each difference is exact (two-sum) and the sum is compensated, so S has a relative error of
    about 2 ulp of float64 for any row length."""
    s = 0.0
    c = 0.0
    for j in range(x.shape[0]):
        if j != k:
            s, c = neumaier_add(s, c, exp_diff(np.float64(x[j]), m))
    return s + c


@njit(**_OPTS)
def row_exp_shifted(x, j, m, k):
    """exp(x_j - m) from the exact difference (1 at the argmax, 0 below underflow)."""
    return 1.0 if j == k else exp_diff(np.float64(x[j]), m)


@njit(**_OPTS)
def neg_log_prob(x, c, m, L):
    """-log softmax(x)_c = (m - x_c) + L, with the difference carried in double-double."""
    return _neg_log_prob_value(np.float64(x[c]), m, L)


@njit(**_OPTS)
def weighted_shift_sum(x, w, m):
    """sum_c w_c (m - x_c) (all terms >= 0), compensated. Used by label smoothing."""
    s = 0.0
    c = 0.0
    for j in range(x.shape[0]):
        s, c = neumaier_add(s, c, np.float64(w[j]) * (m - np.float64(x[j])))
    return s + c


@njit(**_OPTS)
def compensated_sum(a):
    """Neumaier-compensated float64 sum of a 1-D array of any float dtype (used for reductions
    over the batch)."""
    s = 0.0
    c = 0.0
    for i in range(a.shape[0]):
        s, c = neumaier_add(s, c, np.float64(a[i]))
    return s + c


compensated_sum_cast = compensated_sum  # the name it had when it took only non-float64 arrays


def loss_row(out_loss, i):
    """For element-wise kernels: the row of ``out_loss`` to write per-element losses into when
    it is (N, C), else None (``out_loss`` is (N,) and takes row sums): the row functions test
    ``is not None``, a branch numba prunes at compile time, so the loop stays vectorised."""


@overload(loss_row, jit_options=_OPTS)
def _loss_row(out_loss, i):
    if out_loss.ndim == 2:
        return lambda out_loss, i: out_loss[i]
    return lambda out_loss, i: None


def store_row_sum(out_loss, i, total):
    """For element-wise kernels: out_loss[i] = total when ``out_loss`` is (N,) (no-op for
    (N, C), whose rows were written element by element)."""


@overload(store_row_sum, jit_options=_OPTS)
def _store_row_sum(out_loss, i, total):
    if out_loss.ndim == 1:

        def store(out_loss, i, total):
            out_loss[i] = total

        return store
    return lambda out_loss, i, total: None


@njit(**_OPTS)
def bcast_row(a, i):
    """Row i of an (N, C) array, or its only row when it is (1, C) (a weight shared by every
    row: contiguous, unlike a zero-stride broadcast view, so loops over it vectorise)."""
    return a[np.int64(i) if a.shape[0] > 1 else 0]


# --------------------------------------------------------------------------------------------
# Softmax cross-entropy with class-index targets
# --------------------------------------------------------------------------------------------
@njit(**_OPTS)
def index_grad_entry(p, j, y, k, w_j, wsum, s, z, eps, c_true, c_smooth):
    """d loss / d x_j of a class-index row, before the ``grad_scale`` in ``c_true`` and
    ``c_smooth``: c_true (p_j - [j == y]) + c_smooth (W p_j - w_j), with p_y - 1 = -S / (1 + S)
    when y is the argmax k and the smoothing term at k by :func:`argmax_grad` (no cancellation).
    ``p`` = p_j, ``z`` = 1 + S, ``wsum`` = W."""
    if j == y:
        gj = c_true * (-s / z if y == k else p - 1.0)
    else:
        gj = c_true * p
    if eps != 0.0:
        if j == k:
            gj += c_smooth * argmax_grad(wsum, w_j, s, z)
        else:
            gj += c_smooth * (wsum * p - w_j)
    return gj


@njit(**_OPTS)
def _ce_index_row(x, y, weight, wsum, ignore_index, eps, grad_scale, with_grad, g):
    """Loss of one row (and, with ``with_grad``, its gradient into ``g``); see the kernels."""
    skip, fill, m, k = row_start(x, y == ignore_index, with_grad, g)
    if skip:
        return fill
    nc = x.shape[0]
    s = row_sumexp(x, m, k)
    L = math.log1p(s)
    loss = weight[y] * neg_log_prob(x, y, m, L)
    if eps != 0.0:
        smooth = weighted_shift_sum(x, weight, m) + wsum * L
        loss = (1.0 - eps) * loss + (eps / nc) * smooth
    if not with_grad:
        return loss
    z = 1.0 + s
    c_true = (1.0 - eps) * weight[y] * grad_scale
    c_smooth = (eps / nc) * grad_scale
    for j in range(nc):
        p = row_exp_shifted(x, j, m, k) / z
        g[j] = index_grad_entry(p, j, y, k, weight[j], wsum, s, z, eps, c_true, c_smooth)
    return loss


@njit(parallel=True, **_OPTS)
def cross_entropy_index_fwd(logits, target, weight, ignore_index, label_smoothing, out_loss):
    """Per-row softmax cross-entropy with class indices, torch semantics.

    loss_i = (1 - eps) * w_{y_i} * (-log p_{y_i}) + (eps / C) * sum_c w_c * (-log p_c),
    0 for rows whose target equals ``ignore_index``.

    Args: logits (N, C) float32/float64; target (N,) int64; weight (C,) float64 (ones when
    unweighted); ignore_index int; label_smoothing float; out_loss (N,) float64 (written).
    """
    wsum = compensated_sum(weight)
    for i in prange(logits.shape[0]):
        out_loss[i] = _ce_index_row(
            logits[i], target[i], weight, wsum, ignore_index, label_smoothing, 1.0, False, logits[i]
        )


@njit(parallel=True, **_OPTS)
def cross_entropy_index_fwd_grad(
    logits, target, weight, ignore_index, label_smoothing, grad_scale, out_loss, out_grad
):
    """Fused forward and gradient of :func:`cross_entropy_index_fwd`.

    d loss_i / d x_ij = (1 - eps) w_y (p_j - [j == y]) + (eps / C) (W p_j - w_j),  W = sum_c w_c,
    times ``grad_scale``. p_y - 1 is taken as -S / (1 + S) when y is the argmax.
    """
    wsum = compensated_sum(weight)
    for i in prange(logits.shape[0]):
        out_loss[i] = _ce_index_row(
            logits[i],
            target[i],
            weight,
            wsum,
            ignore_index,
            label_smoothing,
            grad_scale,
            True,
            out_grad[i],
        )


# --------------------------------------------------------------------------------------------
# Softmax cross-entropy with probability (soft) targets, H(p, q)
# --------------------------------------------------------------------------------------------
@njit(**_OPTS)
def add_soft_target_sums(x, t, weight, eps, nc, m, sums):
    """Add a row's (A, T) = (sum_j a_j, sum_j a_j (m - x_j)), a_j = w_j ((1 - eps) t_j + eps / nc),
    to ``sums`` = (A, its Neumaier compensation, T, its compensation), returned updated: terms
    with a_j == 0 contribute 0 (also where x_j = -inf), m - x_j is carried exactly (TwoSum).
    ``weight`` holds the w_j of the row's classes."""
    sa, ca, st, ct = sums
    for j in range(x.shape[0]):
        a = soft_target(weight[j], np.float64(t[j]), eps, nc)
        if a == 0.0:
            continue
        sa, ca = neumaier_add(sa, ca, a)
        hi, lo = two_diff(m, np.float64(x[j]))
        st, ct = neumaier_add(st, ct, a * hi)
        ct += a * lo
    return sa, ca, st, ct


@njit(**_OPTS)
def _ce_prob_row(x, t, weight, eps, grad_scale, with_grad, g):
    skip, fill, m, k = row_start(x, False, with_grad, g)
    if skip:
        return fill
    nc = x.shape[0]
    s = row_sumexp(x, m, k)
    sa, ca, st, ct = add_soft_target_sums(x, t, weight, eps, nc, m, (0.0, 0.0, 0.0, 0.0))
    a_sum = sa + ca
    loss = (st + ct) + a_sum * math.log1p(s)
    if with_grad:
        z = 1.0 + s
        a_k = soft_target(weight[k], np.float64(t[k]), eps, nc)
        for j in range(nc):
            if j == k:
                gj = argmax_grad(a_sum, a_k, s, z)
            else:
                a = soft_target(weight[j], np.float64(t[j]), eps, nc)
                gj = a_sum * (row_exp_shifted(x, j, m, k) / z) - a
            g[j] = gj * grad_scale
    return loss


@njit(parallel=True, **_OPTS)
def cross_entropy_prob_fwd(logits, target, weight, label_smoothing, out_loss):
    """Per-row H(a, softmax(x)) = sum_c a_c (-log q_c) with a_c the smoothed, weighted target.

    Computed as sum_c a_c (m - x_c) + (sum_c a_c) * L: non-negative terms, no cancellation.
    Terms with a_c == 0 contribute exactly 0 (the convention 0 log 0 = 0), also where x_c = -inf;
    torch returns NaN there (0 * -inf). target (N, C) float of the logits' dtype.
    """
    for i in prange(logits.shape[0]):
        out_loss[i] = _ce_prob_row(
            logits[i], target[i], weight, label_smoothing, 1.0, False, logits[i]
        )


@njit(parallel=True, **_OPTS)
def cross_entropy_prob_fwd_grad(
    logits, target, weight, label_smoothing, grad_scale, out_loss, out_grad
):
    """Fused forward and gradient of :func:`cross_entropy_prob_fwd`:
    d loss_i / d x_ij = (A q_j - a_j) * grad_scale with A = sum_c a_c."""
    for i in prange(logits.shape[0]):
        out_loss[i] = _ce_prob_row(
            logits[i], target[i], weight, label_smoothing, grad_scale, True, out_grad[i]
        )


# --------------------------------------------------------------------------------------------
# KL(p || softmax(x)) and the entropy H(p)
# --------------------------------------------------------------------------------------------
@njit(**_OPTS)
def _kl_row(x, t, grad_scale, with_grad, g):
    """sum_c p_c (log p_c + (m - x_c) + L), compensated; p_c == 0 terms are 0."""
    skip, fill, m, k = row_start(x, False, with_grad, g)
    if skip:
        return fill
    s = row_sumexp(x, m, k)
    L = math.log1p(s)
    ks = 0.0
    kc = 0.0
    for j in range(x.shape[0]):
        p = np.float64(t[j])
        if p != 0.0:
            ks, kc = neumaier_add(ks, kc, kl_term(p, np.float64(x[j]), m, L))
    if with_grad:
        z = 1.0 + s
        p_sum = compensated_sum(t)
        for j in range(x.shape[0]):
            p = np.float64(t[j])
            if j == k:
                gj = argmax_grad(p_sum, p, s, z)
            else:
                gj = p_sum * (row_exp_shifted(x, j, m, k) / z) - p
            g[j] = gj * grad_scale
    return ks + kc


@njit(parallel=True, **_OPTS)
def kl_divergence_fwd(logits, target, out_loss):
    """Per-row KL(p || softmax(x)) = sum_c p_c log(p_c / q_c), 0 log 0 = 0.

    KL is ill-conditioned where p is close to q (it is quadratic in p - q); its error there is
    bounded by the condition number, not by a few ulp (see the accuracy report)."""
    for i in prange(logits.shape[0]):
        out_loss[i] = _kl_row(logits[i], target[i], 1.0, False, logits[i])


@njit(parallel=True, **_OPTS)
def kl_divergence_fwd_grad(logits, target, grad_scale, out_loss, out_grad):
    """Fused KL forward and gradient: d KL_i / d x_ij = (P q_j - p_j) * grad_scale, P = sum p."""
    for i in prange(logits.shape[0]):
        out_loss[i] = _kl_row(logits[i], target[i], grad_scale, True, out_grad[i])


@njit(parallel=True, **_OPTS)
def entropy_fwd(p, out):
    """Per-row Shannon entropy H(p) = -sum_c p_c log p_c in nats, 0 log 0 = 0, compensated."""
    n, nc = p.shape
    for i in prange(n):
        s = 0.0
        c = 0.0
        for j in range(nc):
            v = np.float64(p[i, j])
            if v != 0.0:
                s, c = neumaier_add(s, c, -v * math.log(v))
        out[i] = s + c


# --------------------------------------------------------------------------------------------
# Softmax focal loss (Lin et al. 2017) with class-index targets
# --------------------------------------------------------------------------------------------
@njit(**_OPTS)
def _focal_row(x, y, weight, ignore_index, gamma, grad_scale, with_grad, g):
    """FL = -w_y (1 - p_y)^gamma log p_y, with a = 1 - p_y from :func:`scalar.focal_parts`.

    d FL / d x_j = w_y (p_j - [j == y]) a^(gamma-1) (gamma ce p_y + a)."""
    skip, fill, m, k = row_start(x, y == ignore_index, with_grad, g)
    if skip:
        return fill
    s = row_sumexp(x, m, k)
    ce = neg_log_prob(x, y, m, math.log1p(s))
    a, p_y = focal_parts(s, row_exp_shifted(x, y, m, k), y == k)
    w = weight[y]
    a_gamma = pow_nonneg(a, gamma)
    if with_grad:
        z = 1.0 + s
        inner = focal_inner(gamma, ce, p_y, a)
        for j in range(x.shape[0]):
            p = row_exp_shifted(x, j, m, k) / z
            g[j] = focal_grad(j == y, p, a, a_gamma, inner, w) * grad_scale
    return w * a_gamma * ce


@njit(parallel=True, **_OPTS)
def softmax_focal_fwd(logits, target, weight, ignore_index, gamma, out_loss):
    """Per-row softmax focal loss  FL_i = -w_y (1 - p_y)^gamma log p_y  (Lin et al. 2017)."""
    for i in prange(logits.shape[0]):
        out_loss[i] = _focal_row(
            logits[i], target[i], weight, ignore_index, gamma, 1.0, False, logits[i]
        )


@njit(parallel=True, **_OPTS)
def softmax_focal_fwd_grad(
    logits, target, weight, ignore_index, gamma, grad_scale, out_loss, out_grad
):
    """Fused softmax focal loss and gradient (see :func:`_focal_row`)."""
    for i in prange(logits.shape[0]):
        out_loss[i] = _focal_row(
            logits[i], target[i], weight, ignore_index, gamma, grad_scale, True, out_grad[i]
        )


# --------------------------------------------------------------------------------------------
# Element-wise sigmoid losses: binary cross-entropy with logits, sigmoid focal loss
# --------------------------------------------------------------------------------------------
@njit(**_OPTS)
def _bce_row(x, t, w, pw, grad_scale, with_grad, lrow, g):
    """One row of BCE with logits (:func:`scalar.bce_logits`): per-element losses into ``lrow``
    unless it is None; returns the row's compensated sum."""
    s = 0.0
    c = 0.0
    for j in range(x.shape[0]):
        v = np.float64(x[j])
        tj = np.float64(t[j])
        loss = w[j] * bce_logits(v, tj, pw[j])
        if lrow is not None:  # pruned at compile time when None
            lrow[j] = loss
        s, c = neumaier_add(s, c, loss)
        if with_grad:
            g[j] = w[j] * bce_logits_grad(v, tj, pw[j]) * grad_scale
    return s + c


@njit(parallel=True, **_OPTS)
def bce_with_logits_fwd(logits, target, weight, pos_weight, out_loss):
    """Element-wise BCE with logits. ``weight`` and ``pos_weight`` float64, (N, C) or (1, C)
    (broadcast views with zero strides work too, slower). ``out_loss`` float64: (N, C) for
    per-element losses, (N,) for row sums."""
    for i in prange(logits.shape[0]):
        x = logits[i]
        total = _bce_row(
            x,
            target[i],
            bcast_row(weight, i),
            bcast_row(pos_weight, i),
            1.0,
            False,
            loss_row(out_loss, i),
            x,
        )
        store_row_sum(out_loss, i, total)


@njit(parallel=True, **_OPTS)
def bce_with_logits_fwd_grad(logits, target, weight, pos_weight, grad_scale, out_loss, out_grad):
    """Fused BCE with logits and gradient: d/dx = w (-pw t s(-x) + (1 - t) s(x))."""
    for i in prange(logits.shape[0]):
        total = _bce_row(
            logits[i],
            target[i],
            bcast_row(weight, i),
            bcast_row(pos_weight, i),
            grad_scale,
            True,
            loss_row(out_loss, i),
            out_grad[i],
        )
        store_row_sum(out_loss, i, total)


@njit(**_OPTS)
def _sigmoid_focal_row(x, t, alpha, gamma, grad_scale, with_grad, lrow, g):
    """One row of the sigmoid focal loss (:func:`scalar.sigmoid_focal`), as :func:`_bce_row`."""
    s = 0.0
    c = 0.0
    for j in range(x.shape[0]):
        loss, gj = sigmoid_focal(np.float64(x[j]), np.float64(t[j]), alpha, gamma)
        if lrow is not None:  # pruned at compile time when None
            lrow[j] = loss
        s, c = neumaier_add(s, c, loss)
        if with_grad:
            g[j] = gj * grad_scale
    return s + c


@njit(parallel=True, **_OPTS)
def sigmoid_focal_fwd(logits, target, alpha, gamma, out_loss):
    """Element-wise sigmoid focal loss (torchvision semantics); out_loss as in
    :func:`bce_with_logits_fwd`."""
    for i in prange(logits.shape[0]):
        x = logits[i]
        total = _sigmoid_focal_row(x, target[i], alpha, gamma, 1.0, False, loss_row(out_loss, i), x)
        store_row_sum(out_loss, i, total)


@njit(parallel=True, **_OPTS)
def sigmoid_focal_fwd_grad(logits, target, alpha, gamma, grad_scale, out_loss, out_grad):
    """Fused sigmoid focal loss and gradient."""
    for i in prange(logits.shape[0]):
        total = _sigmoid_focal_row(
            logits[i], target[i], alpha, gamma, grad_scale, True, loss_row(out_loss, i), out_grad[i]
        )
        store_row_sum(out_loss, i, total)


# --------------------------------------------------------------------------------------------
# logsumexp, log_softmax, softmax over the last axis
# --------------------------------------------------------------------------------------------
@njit(parallel=True, **_OPTS)
def logsumexp_rows(logits, out):
    """out_i = m + log1p(S) (float64). +inf in a row gives +inf, all -inf gives -inf, NaN NaN."""
    n, nc = logits.shape
    for i in prange(n):
        x = logits[i]
        m, k, has_nan = row_max(x)
        if has_nan:
            out[i] = np.nan
        elif not math.isfinite(m):
            out[i] = m
        else:
            out[i] = m + math.log1p(row_sumexp(x, m, k))


@njit(parallel=True, **_OPTS)
def log_softmax_rows(logits, out):
    """out_ij = (x_j - m) - L with the difference in double-double. Rows with NaN or a
    non-finite maximum give NaN."""
    for i in prange(logits.shape[0]):
        x = logits[i]
        skip, fill, m, k = row_start(x, False, True, out[i])
        if skip:
            continue
        L = math.log1p(row_sumexp(x, m, k))
        for j in range(x.shape[0]):
            hi, lo = two_diff(np.float64(x[j]), m)
            hi2, lo2 = two_diff(hi, L)
            out[i, j] = hi2 + (lo2 + lo)


@njit(parallel=True, **_OPTS)
def softmax_rows(logits, out):
    """out_ij = exp(x_j - m) / (1 + S). Rows with NaN or a non-finite maximum give NaN."""
    for i in prange(logits.shape[0]):
        x = logits[i]
        skip, fill, m, k = row_start(x, False, True, out[i])
        if skip:
            continue
        z = 1.0 + row_sumexp(x, m, k)
        for j in range(x.shape[0]):
            out[i, j] = row_exp_shifted(x, j, m, k) / z


# --------------------------------------------------------------------------------------------
# Losses on log-probabilities (torch's nll_loss and kl_div)
# --------------------------------------------------------------------------------------------
@njit(parallel=True, **_OPTS)
def nll_fwd(log_probs, target, weight, ignore_index, out_loss):
    """Negative log-likelihood, ``torch.nn.functional.nll_loss``: loss_i = -w_{y_i} x_{i, y_i},
    0 for ignored rows. ``log_probs`` (N, C), ``target`` (N,) int64 in range."""
    for i in prange(log_probs.shape[0]):
        y = target[i]
        out_loss[i] = 0.0 if y == ignore_index else -weight[y] * np.float64(log_probs[i, y])


@njit(parallel=True, **_OPTS)
def nll_fwd_grad(log_probs, target, weight, ignore_index, grad_scale, out_loss, out_grad):
    """Fused :func:`nll_fwd` and its gradient: -w_y grad_scale at the target, 0 elsewhere.
    ``out_grad`` may be ``log_probs`` (x_y is read before the row is zeroed)."""
    for i in prange(log_probs.shape[0]):
        y = target[i]
        ignored = y == ignore_index
        out_loss[i] = 0.0 if ignored else -weight[y] * np.float64(log_probs[i, y])
        for j in range(log_probs.shape[1]):
            out_grad[i, j] = 0.0
        if not ignored:
            out_grad[i, y] = -weight[y] * grad_scale


@njit(**_OPTS)
def _kl_div_elem(x, t, log_target):
    """torch's pointwise KL term: t (log t - x), with 0 log 0 = 0 (xlogy), or
    exp(t) (t - x) for log-space targets. The difference is formed in float64, so float32
    inputs keep full accuracy; for float64 inputs it is accurate relative to t max(|log t|, |x|)
    (the term is ill-conditioned where log t is close to x)."""
    if log_target:
        return math.exp(t) * (t - x)
    if t == 0.0:
        return -(t * x)  # xlogy(0, 0) = 0; 0 * inf stays NaN as in torch
    return t * (math.log(t) - x)


@njit(**_OPTS)
def _kl_div_row(x, t, log_target, grad_scale, with_grad, lrow, g):
    s = 0.0
    c = 0.0
    for j in range(x.shape[0]):
        tj = np.float64(t[j])
        loss = _kl_div_elem(np.float64(x[j]), tj, log_target)
        if lrow is not None:  # pruned at compile time when None
            lrow[j] = loss
        s, c = neumaier_add(s, c, loss)
        if with_grad:
            g[j] = -(math.exp(tj) if log_target else tj) * grad_scale
    return s + c


@njit(parallel=True, **_OPTS)
def kl_div_fwd(log_probs, target, log_target, out_loss):
    """Element-wise KL terms of ``torch.nn.functional.kl_div`` (input = log q). ``out_loss``
    float64: (N, C) per element, or (N,) for row sums."""
    for i in prange(log_probs.shape[0]):
        x = log_probs[i]
        total = _kl_div_row(x, target[i], log_target, 1.0, False, loss_row(out_loss, i), x)
        store_row_sum(out_loss, i, total)


@njit(parallel=True, **_OPTS)
def kl_div_fwd_grad(log_probs, target, log_target, grad_scale, out_loss, out_grad):
    """Fused :func:`kl_div_fwd` and its gradient d/dx = -t (or -exp(t)), times grad_scale."""
    for i in prange(log_probs.shape[0]):
        x = log_probs[i]
        total = _kl_div_row(
            x, target[i], log_target, grad_scale, True, loss_row(out_loss, i), out_grad[i]
        )
        store_row_sum(out_loss, i, total)


# --------------------------------------------------------------------------------------------
# Serial twins (see SERIAL_BELOW)
# --------------------------------------------------------------------------------------------
KERNELS = (
    "cross_entropy_index_fwd",
    "cross_entropy_index_fwd_grad",
    "cross_entropy_prob_fwd",
    "cross_entropy_prob_fwd_grad",
    "kl_divergence_fwd",
    "kl_divergence_fwd_grad",
    "entropy_fwd",
    "softmax_focal_fwd",
    "softmax_focal_fwd_grad",
    "bce_with_logits_fwd",
    "bce_with_logits_fwd_grad",
    "sigmoid_focal_fwd",
    "sigmoid_focal_fwd_grad",
    "logsumexp_rows",
    "log_softmax_rows",
    "softmax_rows",
    "nll_fwd",
    "nll_fwd_grad",
    "kl_div_fwd",
    "kl_div_fwd_grad",
)
serial_twins(globals(), KERNELS)
