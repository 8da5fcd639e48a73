"""Numba CPU kernels: the accurate reference-quality implementations behind the public API.

This module holds raw kernels only: no validation, no dtype conversion, no reductions over the
batch beyond what a kernel documents. ``cestudy.api`` validates, converts and reduces.

Every kernel is a plain ``@njit`` function (parallel over rows with ``prange``) that other
projects may call from their own jitted code. Conventions shared by all kernels:

- ``logits`` is a C-contiguous float32 or float64 array of shape (N, C). All arithmetic is done in
  float64; float32 inputs are exact in float64, so for them the float64 evaluation is far more
  accurate than needed and the single final rounding gives <= 1 ulp. For float64 inputs the
  differences ``x_j - m`` are formed exactly with a two-sum and all sums are compensated
  (Neumaier), which keeps a few ulp even where the loss is tiny.
- Per-sample losses are written as float64 into ``out_loss`` (shape (N,) for row losses, the shape
  of ``logits`` for element-wise losses); the caller reduces and rounds them once.
- Gradients are written into ``out_grad`` (same shape and dtype as ``logits``), already multiplied
  by ``grad_scale`` (1 for "sum"/"none", 1/denominator for "mean").
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

import numpy as np
from numba import njit, prange

from . import scalar

_OPTS = dict(cache=True, error_model="numpy", nogil=True)

two_diff = njit(**_OPTS)(scalar.two_diff)
exp_dd = njit(**_OPTS)(scalar.exp_dd)
softplus = njit(**_OPTS)(scalar.softplus)
sigmoid = njit(**_OPTS)(scalar.sigmoid)
neumaier_add = njit(**_OPTS)(scalar.neumaier_add)
pow_nonneg = njit(**_OPTS)(scalar.pow_nonneg)
EXP_UNDERFLOW = scalar.EXP_UNDERFLOW


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
def row_sumexp(x, m, k):
    """S = sum_{j != k} exp(x_j - m) for a row with finite maximum m at index k.

    Each difference is exact (two-sum) and the sum is compensated, so S has a relative error of
    about 2 ulp of float64 for any row length."""
    s = 0.0
    c = 0.0
    for j in range(x.shape[0]):
        if j == k:
            continue
        hi, lo = two_diff(np.float64(x[j]), m)
        if hi < EXP_UNDERFLOW:
            continue
        s, c = neumaier_add(s, c, exp_dd(hi, lo))
    return s + c


@njit(**_OPTS)
def row_exp_shifted(x, j, m, k):
    """exp(x_j - m) from the exact difference (1 at the argmax, 0 below underflow)."""
    if j == k:
        return 1.0
    hi, lo = two_diff(np.float64(x[j]), m)
    if hi < EXP_UNDERFLOW:
        return 0.0
    return exp_dd(hi, lo)


@njit(**_OPTS)
def neg_log_prob(x, c, m, L):
    """-log softmax(x)_c = (m - x_c) + L, with the difference carried in double-double."""
    hi, lo = two_diff(m, np.float64(x[c]))
    return hi + (L + lo)


@njit(**_OPTS)
def weighted_shift_sum(x, w, m):
    """sum_c w_c (m - x_c) (all terms >= 0), compensated. Used by label smoothing."""
    s = 0.0
    c = 0.0
    for j in range(x.shape[0]):
        s, c = neumaier_add(s, c, np.float64(w[j]) * (m - np.float64(x[j])))
    return s + c


@njit(**_OPTS)
def _fill_row(out, i, value):
    for j in range(out.shape[1]):
        out[i, j] = value


@njit(**_OPTS)
def argmax_grad(a_sum, a_k, s, z):
    """A q_k - a_k at the argmax, where q_k = 1 / z rounds close to 1:
    (A - a_k - a_k s) / z, with A - a_k formed first (a sum of the other, non-negative terms
    when the caller's A is compensated), so the cancellation is confined to the small a_k s."""
    return ((a_sum - a_k) - a_k * s) / z


@njit(**_OPTS)
def compensated_sum_cast(a):
    """Neumaier-compensated float64 sum of a 1-D array of any float dtype."""
    s = 0.0
    c = 0.0
    for i in range(a.shape[0]):
        s, c = neumaier_add(s, c, np.float64(a[i]))
    return s + c


@njit(**_OPTS)
def compensated_sum(a):
    """Neumaier-compensated sum of a 1-D float64 array (used for reductions over the batch)."""
    s = 0.0
    c = 0.0
    for i in range(a.shape[0]):
        s, c = neumaier_add(s, c, a[i])
    return s + c


# --------------------------------------------------------------------------------------------
# Softmax cross-entropy with class-index targets
# --------------------------------------------------------------------------------------------
@njit(parallel=True, **_OPTS)
def cross_entropy_index_fwd(logits, target, weight, ignore_index, label_smoothing, out_loss):
    """Per-row softmax cross-entropy with class indices, torch semantics.

    loss_i = (1 - eps) * w_{y_i} * (-log p_{y_i}) + (eps / C) * sum_c w_c * (-log p_c),
    0 for rows whose target equals ``ignore_index``.

    Args: logits (N, C) float32/float64; target (N,) int64; weight (C,) float64 (ones when
    unweighted); ignore_index int; label_smoothing float; out_loss (N,) float64 (written).
    """
    n, nc = logits.shape
    wsum = compensated_sum(weight)
    eps = label_smoothing
    for i in prange(n):
        y = target[i]
        if y == ignore_index:
            out_loss[i] = 0.0
            continue
        x = logits[i]
        m, k, has_nan = row_max(x)
        if has_nan or not math.isfinite(m):
            out_loss[i] = np.nan
            continue
        L = math.log1p(row_sumexp(x, m, k))
        loss = weight[y] * neg_log_prob(x, y, m, L)
        if eps != 0.0:
            smooth = weighted_shift_sum(x, weight, m) + wsum * L
            loss = (1.0 - eps) * loss + (eps / nc) * smooth
        out_loss[i] = loss


@njit(parallel=True, **_OPTS)
def cross_entropy_index_fwd_grad(logits, target, weight, ignore_index, label_smoothing,
                                 grad_scale, out_loss, out_grad):
    """Fused forward and gradient of :func:`cross_entropy_index_fwd`.

    d loss_i / d x_ij = (1 - eps) w_y (p_j - [j == y]) + (eps / C) (W p_j - w_j),  W = sum_c w_c,
    times ``grad_scale``. p_y - 1 is taken as -S / (1 + S) when y is the argmax.
    """
    n, nc = logits.shape
    wsum = compensated_sum(weight)
    eps = label_smoothing
    for i in prange(n):
        y = target[i]
        if y == ignore_index:
            out_loss[i] = 0.0
            _fill_row(out_grad, i, 0.0)
            continue
        x = logits[i]
        m, k, has_nan = row_max(x)
        if has_nan or not math.isfinite(m):
            out_loss[i] = np.nan
            _fill_row(out_grad, i, np.nan)
            continue
        s = row_sumexp(x, m, k)
        L = math.log1p(s)
        z = 1.0 + s
        loss = weight[y] * neg_log_prob(x, y, m, L)
        if eps != 0.0:
            smooth = weighted_shift_sum(x, weight, m) + wsum * L
            loss = (1.0 - eps) * loss + (eps / nc) * smooth
        out_loss[i] = loss
        c_true = (1.0 - eps) * weight[y] * grad_scale
        c_smooth = (eps / nc) * grad_scale
        for j in range(nc):
            p = row_exp_shifted(x, j, m, k) / z
            if j == y:
                g = c_true * (-s / z if y == k else p - 1.0)
            else:
                g = c_true * p
            if eps != 0.0:
                if j == k:
                    g += c_smooth * argmax_grad(wsum, weight[j], s, z)
                else:
                    g += c_smooth * (wsum * p - weight[j])
            out_grad[i, j] = g


# --------------------------------------------------------------------------------------------
# Softmax cross-entropy with probability (soft) targets, H(p, q)
# --------------------------------------------------------------------------------------------
@njit(**_OPTS)
def _soft_target_weight(target, weight, j, eps, nc):
    """a_j = w_j * ((1 - eps) * p_j + eps / C), torch's smoothed, class-weighted soft target."""
    return weight[j] * ((1.0 - eps) * np.float64(target[j]) + eps / nc)


@njit(parallel=True, **_OPTS)
def cross_entropy_prob_fwd(logits, target, weight, label_smoothing, out_loss):
    """Per-row H(a, softmax(x)) = sum_c a_c (-log q_c) with a_c the smoothed, weighted target.

    Computed as sum_c a_c (m - x_c) + (sum_c a_c) * L: non-negative terms, no cancellation.
    Terms with a_c == 0 contribute exactly 0 (the convention 0 log 0 = 0), also where x_c = -inf;
    torch returns NaN there (0 * -inf). target (N, C) float of the logits' dtype.
    """
    n, nc = logits.shape
    eps = label_smoothing
    for i in prange(n):
        x = logits[i]
        t = target[i]
        m, k, has_nan = row_max(x)
        if has_nan or not math.isfinite(m):
            out_loss[i] = np.nan
            continue
        L = math.log1p(row_sumexp(x, m, k))
        sa = 0.0
        ca = 0.0
        st = 0.0
        ct = 0.0
        for j in range(nc):
            a = _soft_target_weight(t, weight, j, eps, nc)
            if a == 0.0:
                continue
            sa, ca = neumaier_add(sa, ca, a)
            hi, lo = two_diff(m, np.float64(x[j]))
            st, ct = neumaier_add(st, ct, a * hi)
            ct += a * lo
        out_loss[i] = (st + ct) + (sa + ca) * L


@njit(parallel=True, **_OPTS)
def cross_entropy_prob_fwd_grad(logits, target, weight, label_smoothing, grad_scale, out_loss,
                                out_grad):
    """Fused forward and gradient of :func:`cross_entropy_prob_fwd`:
    d loss_i / d x_ij = (A q_j - a_j) * grad_scale with A = sum_c a_c."""
    n, nc = logits.shape
    eps = label_smoothing
    for i in prange(n):
        x = logits[i]
        t = target[i]
        m, k, has_nan = row_max(x)
        if has_nan or not math.isfinite(m):
            out_loss[i] = np.nan
            _fill_row(out_grad, i, np.nan)
            continue
        s = row_sumexp(x, m, k)
        L = math.log1p(s)
        z = 1.0 + s
        sa = 0.0
        ca = 0.0
        st = 0.0
        ct = 0.0
        for j in range(nc):
            a = _soft_target_weight(t, weight, j, eps, nc)
            if a == 0.0:
                continue
            sa, ca = neumaier_add(sa, ca, a)
            hi, lo = two_diff(m, np.float64(x[j]))
            st, ct = neumaier_add(st, ct, a * hi)
            ct += a * lo
        a_sum = sa + ca
        out_loss[i] = (st + ct) + a_sum * L
        a_k = _soft_target_weight(t, weight, k, eps, nc)
        for j in range(nc):
            a = _soft_target_weight(t, weight, j, eps, nc)
            if j == k:
                g = argmax_grad(a_sum, a_k, s, z)
            else:
                g = a_sum * (row_exp_shifted(x, j, m, k) / z) - a
            out_grad[i, j] = g * grad_scale


# --------------------------------------------------------------------------------------------
# KL(p || softmax(x)) and the entropy H(p)
# --------------------------------------------------------------------------------------------
@njit(**_OPTS)
def _kl_row(x, t, m, L):
    """sum_c p_c (log p_c + (m - x_c) + L), compensated; p_c == 0 terms are 0."""
    s = 0.0
    c = 0.0
    for j in range(x.shape[0]):
        p = np.float64(t[j])
        if p == 0.0:
            continue
        hi, lo = two_diff(m, np.float64(x[j]))
        # log(p / q) = (m - x_j) + L + log p, with the larger terms first
        v = (hi + L) + (math.log(p) + lo)
        s, c = neumaier_add(s, c, p * v)
    return s + c


@njit(parallel=True, **_OPTS)
def kl_divergence_fwd(logits, target, out_loss):
    """Per-row KL(p || softmax(x)) = sum_c p_c log(p_c / q_c), 0 log 0 = 0.

    KL is ill-conditioned where p is close to q (it is quadratic in p - q); its error there is
    bounded by the condition number, not by a few ulp (see the accuracy report)."""
    n, nc = logits.shape
    for i in prange(n):
        x = logits[i]
        m, k, has_nan = row_max(x)
        if has_nan or not math.isfinite(m):
            out_loss[i] = np.nan
            continue
        L = math.log1p(row_sumexp(x, m, k))
        out_loss[i] = _kl_row(x, target[i], m, L)


@njit(parallel=True, **_OPTS)
def kl_divergence_fwd_grad(logits, target, grad_scale, out_loss, out_grad):
    """Fused KL forward and gradient: d KL_i / d x_ij = (P q_j - p_j) * grad_scale, P = sum p."""
    n, nc = logits.shape
    for i in prange(n):
        x = logits[i]
        t = target[i]
        m, k, has_nan = row_max(x)
        if has_nan or not math.isfinite(m):
            out_loss[i] = np.nan
            _fill_row(out_grad, i, np.nan)
            continue
        s = row_sumexp(x, m, k)
        L = math.log1p(s)
        z = 1.0 + s
        out_loss[i] = _kl_row(x, t, m, L)
        p_sum = compensated_sum_cast(t)
        for j in range(nc):
            p = np.float64(t[j])
            if j == k:
                g = argmax_grad(p_sum, p, s, z)
            else:
                g = p_sum * (row_exp_shifted(x, j, m, k) / z) - p
            out_grad[i, j] = g * grad_scale


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
def _focal_parts(x, y, m, k, gamma):
    """Return (ce, a, p_y, s, z) for the row: ce = -log p_y, a = 1 - p_y computed as
    sum_{j != y} e_j / (1 + S) (all terms positive, no cancellation)."""
    s = row_sumexp(x, m, k)
    z = 1.0 + s
    L = math.log1p(s)
    ce = neg_log_prob(x, y, m, L)
    if y == k:
        a = s / z
    else:
        a = (z - row_exp_shifted(x, y, m, k)) / z  # z >= 2 e_y here, so no cancellation
    p_y = row_exp_shifted(x, y, m, k) / z
    return ce, a, p_y, s, z


@njit(parallel=True, **_OPTS)
def softmax_focal_fwd(logits, target, weight, ignore_index, gamma, out_loss):
    """Per-row softmax focal loss  FL_i = -w_y (1 - p_y)^gamma log p_y  (Lin et al. 2017)."""
    n, nc = logits.shape
    for i in prange(n):
        y = target[i]
        if y == ignore_index:
            out_loss[i] = 0.0
            continue
        x = logits[i]
        m, k, has_nan = row_max(x)
        if has_nan or not math.isfinite(m):
            out_loss[i] = np.nan
            continue
        ce, a, p_y, s, z = _focal_parts(x, y, m, k, gamma)
        out_loss[i] = weight[y] * pow_nonneg(a, gamma) * ce


@njit(parallel=True, **_OPTS)
def softmax_focal_fwd_grad(logits, target, weight, ignore_index, gamma, grad_scale, out_loss,
                           out_grad):
    """Fused softmax focal loss and gradient.

    With a = 1 - p_y and ce = -log p_y:  d FL / d x_j = w_y (p_j - [j == y]) a^(gamma-1)
    (gamma ce p_y + a). For j == y this is -w_y a^gamma (gamma ce p_y + a), evaluated in that
    form so that a -> 0 gives 0 rather than 0 * inf.
    """
    n, nc = logits.shape
    for i in prange(n):
        y = target[i]
        if y == ignore_index:
            out_loss[i] = 0.0
            _fill_row(out_grad, i, 0.0)
            continue
        x = logits[i]
        m, k, has_nan = row_max(x)
        if has_nan or not math.isfinite(m):
            out_loss[i] = np.nan
            _fill_row(out_grad, i, np.nan)
            continue
        ce, a, p_y, s, z = _focal_parts(x, y, m, k, gamma)
        w = weight[y]
        a_gamma = pow_nonneg(a, gamma)
        out_loss[i] = w * a_gamma * ce
        inner = gamma * ce * p_y + a
        for j in range(nc):
            if j == y:
                g = -w * a_gamma * inner
            else:
                p = row_exp_shifted(x, j, m, k) / z
                # p_j * a^(gamma - 1) = (p_j / a) * a^gamma, with p_j <= a
                g = 0.0 if p == 0.0 else w * (p / a) * a_gamma * inner
            out_grad[i, j] = g * grad_scale


# --------------------------------------------------------------------------------------------
# Element-wise sigmoid losses: binary cross-entropy with logits, sigmoid focal loss
# --------------------------------------------------------------------------------------------
@njit(**_OPTS)
def _bce_logits_elem(x, t, pw):
    """pw t softplus(-x) + (1 - t) softplus(x) = -[pw t log s(x) + (1 - t) log(1 - s(x))].

    Both terms are >= 0 for t in [0, 1], so no cancellation, unlike torch's
    (1 - t) x + (1 + (pw - 1) t) (log1p(exp(-|x|)) + max(-x, 0))."""
    return pw * t * softplus(-x) + (1.0 - t) * softplus(x)


@njit(parallel=True, **_OPTS)
def bce_with_logits_fwd(logits, target, weight, pos_weight, out_loss):
    """Element-wise BCE with logits. All arrays 2-D of one shape (weights may be broadcast
    views with zero strides). out_loss float64."""
    n, nc = logits.shape
    for i in prange(n):
        for j in range(nc):
            x = np.float64(logits[i, j])
            t = np.float64(target[i, j])
            out_loss[i, j] = weight[i, j] * _bce_logits_elem(x, t, pos_weight[i, j])


@njit(parallel=True, **_OPTS)
def bce_with_logits_fwd_grad(logits, target, weight, pos_weight, grad_scale, out_loss, out_grad):
    """Fused BCE with logits and gradient: d/dx = w (-pw t s(-x) + (1 - t) s(x))."""
    n, nc = logits.shape
    for i in prange(n):
        for j in range(nc):
            x = np.float64(logits[i, j])
            t = np.float64(target[i, j])
            w = weight[i, j]
            pw = pos_weight[i, j]
            out_loss[i, j] = w * _bce_logits_elem(x, t, pw)
            out_grad[i, j] = w * ((1.0 - t) * sigmoid(x) - pw * t * sigmoid(-x)) * grad_scale


@njit(**_OPTS)
def _sigmoid_focal_elem(x, t, alpha, gamma):
    """torchvision.ops.sigmoid_focal_loss for one element, returns (loss, dloss/dx).

    b = 1 - p_t = t s(-x) + (1 - t) s(x) (positive terms), ce = BCE with logits,
    loss = alpha_t ce b^gamma,
    d/dx = alpha_t [(s(x) - t) b^gamma + gamma ce b^(gamma-1) (1 - 2t) s(x) s(-x)].
    """
    sp = sigmoid(x)
    sn = sigmoid(-x)
    b = t * sn + (1.0 - t) * sp
    ce = _bce_logits_elem(x, t, 1.0)
    bg = pow_nonneg(b, gamma)
    alpha_t = 1.0
    if alpha >= 0.0:
        alpha_t = alpha * t + (1.0 - alpha) * (1.0 - t)
    loss = alpha_t * ce * bg
    dce = (1.0 - t) * sp - t * sn
    db = (1.0 - 2.0 * t) * sp * sn
    g = dce * bg
    if b != 0.0 and gamma != 0.0:
        # b^(gamma - 1) * db, written so that b -> 0 does not produce 0 * inf
        g += gamma * ce * (bg / b) * db
    return loss, alpha_t * g


@njit(parallel=True, **_OPTS)
def sigmoid_focal_fwd(logits, target, alpha, gamma, out_loss):
    """Element-wise sigmoid focal loss (torchvision semantics); out_loss float64."""
    n, nc = logits.shape
    for i in prange(n):
        for j in range(nc):
            loss, g = _sigmoid_focal_elem(np.float64(logits[i, j]), np.float64(target[i, j]),
                                          alpha, gamma)
            out_loss[i, j] = loss


@njit(parallel=True, **_OPTS)
def sigmoid_focal_fwd_grad(logits, target, alpha, gamma, grad_scale, out_loss, out_grad):
    """Fused sigmoid focal loss and gradient."""
    n, nc = logits.shape
    for i in prange(n):
        for j in range(nc):
            loss, g = _sigmoid_focal_elem(np.float64(logits[i, j]), np.float64(target[i, j]),
                                          alpha, gamma)
            out_loss[i, j] = loss
            out_grad[i, j] = g * grad_scale


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
    n, nc = logits.shape
    for i in prange(n):
        x = logits[i]
        m, k, has_nan = row_max(x)
        if has_nan or not math.isfinite(m):
            _fill_row(out, i, np.nan)
            continue
        L = math.log1p(row_sumexp(x, m, k))
        for j in range(nc):
            hi, lo = two_diff(np.float64(x[j]), m)
            hi2, lo2 = two_diff(hi, L)
            out[i, j] = hi2 + (lo2 + lo)


@njit(parallel=True, **_OPTS)
def softmax_rows(logits, out):
    """out_ij = exp(x_j - m) / (1 + S). Rows with NaN or a non-finite maximum give NaN."""
    n, nc = logits.shape
    for i in prange(n):
        x = logits[i]
        m, k, has_nan = row_max(x)
        if has_nan or not math.isfinite(m):
            _fill_row(out, i, np.nan)
            continue
        z = 1.0 + row_sumexp(x, m, k)
        for j in range(nc):
            out[i, j] = row_exp_shifted(x, j, m, k) / z
