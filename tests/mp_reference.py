"""mpmath references for every function of ``cestudy.reference.oracle`` (test side only).

Each function evaluates the textbook formula, with no cancellation-avoiding rewrite: the working
precision does that job. Inputs are float64 and are converted to mpmath exactly; results are
mpmath numbers (lists for rows). The conventions are the oracle's (torch's): a row holding NaN or
+inf, or only -inf, gives NaN everywhere (logsumexp: +inf and -inf); ignored rows give 0; 0 log 0
= 0; ``binary_cross_entropy`` clamps each log at -100.

Precision: :func:`digits_for` picks the decimal digits a row needs: 40 guard digits, plus the
digits of its largest finite magnitude (x_j - m and lse - x_y cancel that many), plus
(max - min) / ln 10 (the smallest loss of a confident row is about exp(min - max), and 1 - p_y is
that small too). ``tests/test_oracle.py::test_mp_reference_has_converged`` checks the choice by
re-evaluating the extreme rows 60 digits higher. Gradients are analytic here; they are checked
against ``mpmath.diff`` of these losses in the same test module.

Keep rows few and short: mpmath at several hundred digits costs tens of microseconds per exp.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
from mpmath import mpf

NAN = mpf("nan")
INF = mpf("inf")


# --------------------------------------------------------------------------------------------
# Precision and exact conversions
# --------------------------------------------------------------------------------------------
def digits_for(*arrays, guard=40):
    """Decimal digits that the textbook formulas need on these inputs (see the module doc)."""
    vals = np.concatenate([np.ravel(np.asarray(a, dtype=np.float64)) for a in arrays])
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return guard
    big = float(np.abs(vals).max())
    mag = math.log10(big) if big > 1 else 0.0
    # capped at 1000 (434 digits): terms e^-1000 below a row's maximum are not resolved (a row
    # whose only competitors sit that far below needs its own dps)
    spread = min(float(vals.max() - vals.min()), 1000.0) / math.log(10)
    return int(guard + mag + spread) + 1


def mp(v):
    """A float64 (or anything float() takes) as an exact mpmath number; mpmath numbers pass
    through (``mpmath.diff`` perturbs the inputs in mpmath)."""
    return v if isinstance(v, mpf) else mpf(float(v))


def from_longdouble(v):
    """A numpy longdouble as an exact mpmath number (NaN and infinities kept)."""
    v = np.longdouble(v)
    if np.isnan(v):
        return NAN
    if np.isinf(v):
        return INF if v > 0 else -INF
    if v == 0:
        return mpf(0)
    mant, e = np.frexp(v)  # |mant| in [0.5, 1), at most 113 significand bits
    hi = np.floor(np.ldexp(mant, 56))
    lo = np.ldexp(np.ldexp(mant, 56) - hi, 64)  # the remaining <= 57 bits, an integer
    with mpmath.workprec(128):  # >= 113 bits: exact
        return mpmath.ldexp(mpf(int(hi) * 2**64 + int(lo)), int(e) - 120)


def _row(x):
    if isinstance(x, (list, tuple)):
        return [mp(v) for v in x]
    return [mp(v) for v in np.asarray(x, dtype=np.float64).ravel()]


def _bad(xs):
    """NaN anywhere, +inf anywhere or every entry -inf: the row's results are NaN."""
    return (
        any(mpmath.isnan(v) for v in xs) or any(v == INF for v in xs) or all(v == -INF for v in xs)
    )


def _weights(weight, c):
    return [mpf(1)] * c if weight is None else _row(weight)


# --------------------------------------------------------------------------------------------
# logsumexp, log_softmax, softmax
# --------------------------------------------------------------------------------------------
def logsumexp_row(x, dps=None):
    dps = dps or digits_for(x)
    with mpmath.workdps(dps):
        xs = _row(x)
        if any(mpmath.isnan(v) for v in xs):
            return NAN
        if any(v == INF for v in xs):
            return INF
        if all(v == -INF for v in xs):
            return -INF
        return mpmath.log(mpmath.fsum(mpmath.exp(v) for v in xs if v != -INF))


def log_softmax_row(x, dps=None):
    """[log p_j] of one row."""
    dps = dps or digits_for(x)
    with mpmath.workdps(dps):
        xs = _row(x)
        if _bad(xs):
            return [NAN] * len(xs)
        lse = logsumexp_row(x, dps)
        return [v - lse for v in xs]


def softmax_row(x, dps=None):
    dps = dps or digits_for(x)
    with mpmath.workdps(dps):
        return [mpmath.exp(v) for v in log_softmax_row(x, dps)]


# --------------------------------------------------------------------------------------------
# Softmax cross-entropy with class indices
# --------------------------------------------------------------------------------------------
def cross_entropy_row(x, y, weight=None, ignore_index=-100, label_smoothing=0.0, dps=None):
    """torch's per-row loss: (1 - eps) w_y (-log p_y) + (eps / C) sum_j w_j (-log p_j)."""
    dps = dps or digits_for(x)
    c = len(np.ravel(x))
    if y == ignore_index:
        return mpf(0)
    with mpmath.workdps(dps):
        lp = log_softmax_row(x, dps)
        if mpmath.isnan(lp[0]):
            return NAN
        w = _weights(weight, c)
        eps = mp(label_smoothing)
        loss = -w[y] * lp[y]
        if label_smoothing:
            smooth = mpmath.fsum(-wj * lj for wj, lj in zip(w, lp))
            loss = (1 - eps) * loss + eps / c * smooth
        return loss


def cross_entropy_grad_row(x, y, weight=None, ignore_index=-100, label_smoothing=0.0, dps=None):
    """d loss / d x_j = (1 - eps) w_y (p_j - [j = y]) + (eps / C) (sum(w) p_j - w_j)."""
    dps = dps or digits_for(x)
    c = len(np.ravel(x))
    if y == ignore_index:
        return [mpf(0)] * c
    with mpmath.workdps(dps):
        p = softmax_row(x, dps)
        if mpmath.isnan(p[0]):
            return [NAN] * c
        w = _weights(weight, c)
        eps = mp(label_smoothing)
        wsum = mpmath.fsum(w)
        return [
            (1 - eps) * w[y] * (p[j] - (j == y)) + eps / c * (wsum * p[j] - w[j]) for j in range(c)
        ]


# --------------------------------------------------------------------------------------------
# Probability targets: cross-entropy, KL divergence, entropy
# --------------------------------------------------------------------------------------------
def _soft_target(t, weight, label_smoothing, c):
    eps = mp(label_smoothing)
    return [wj * ((1 - eps) * tj + eps / c) for wj, tj in zip(_weights(weight, c), _row(t))]


def cross_entropy_probs_row(x, t, weight=None, label_smoothing=0.0, dps=None):
    """sum_j a_j (-log p_j), a_j = w_j ((1 - eps) t_j + eps / C); a_j = 0 terms are 0."""
    dps = dps or digits_for(x)
    c = len(np.ravel(x))
    with mpmath.workdps(dps):
        lp = log_softmax_row(x, dps)
        if mpmath.isnan(lp[0]):
            return NAN
        a = _soft_target(t, weight, label_smoothing, c)
        return mpmath.fsum(-aj * lj for aj, lj in zip(a, lp) if aj != 0)


def cross_entropy_probs_grad_row(x, t, weight=None, label_smoothing=0.0, dps=None):
    """sum(a) p_j - a_j."""
    dps = dps or digits_for(x)
    c = len(np.ravel(x))
    with mpmath.workdps(dps):
        p = softmax_row(x, dps)
        if mpmath.isnan(p[0]):
            return [NAN] * c
        a = _soft_target(t, weight, label_smoothing, c)
        asum = mpmath.fsum(a)
        return [asum * pj - aj for pj, aj in zip(p, a)]


def kl_divergence_row(x, t, dps=None):
    """sum_j t_j (log t_j - log p_j), 0 log 0 = 0."""
    dps = dps or digits_for(x)
    with mpmath.workdps(dps):
        lp = log_softmax_row(x, dps)
        if mpmath.isnan(lp[0]):
            return NAN
        return mpmath.fsum(tj * (mpmath.log(tj) - lj) for tj, lj in zip(_row(t), lp) if tj != 0)


def kl_divergence_grad_row(x, t, dps=None):
    return cross_entropy_probs_grad_row(x, t, dps=dps)


def entropy_row(t, dps=60):
    with mpmath.workdps(dps):
        return mpmath.fsum(-tj * mpmath.log(tj) for tj in _row(t) if tj != 0)


# --------------------------------------------------------------------------------------------
# Softmax focal loss
# --------------------------------------------------------------------------------------------
def _pow(u, gamma):
    """u ** gamma with 0 ** 0 = 1 (torch's pow)."""
    return mpf(1) if gamma == 0 else (mpf(0) if u == 0 else u**gamma)


def softmax_focal_loss_row(x, y, gamma=2.0, weight=None, ignore_index=-100, dps=None):
    """w_y (1 - p_y)^gamma (-log p_y)."""
    dps = dps or digits_for(x)
    c = len(np.ravel(x))
    if y == ignore_index:
        return mpf(0)
    with mpmath.workdps(dps):
        lp = log_softmax_row(x, dps)
        if mpmath.isnan(lp[0]):
            return NAN
        u = 1 - mpmath.exp(lp[y])
        return _weights(weight, c)[y] * _pow(u, mp(gamma)) * -lp[y]


def softmax_focal_loss_grad_row(x, y, gamma=2.0, weight=None, ignore_index=-100, dps=None):
    """With u = 1 - p_y, l = -log p_y: w_y [gamma u^(gamma-1) u'_j l + u^gamma l'_j],
    l'_j = p_j - [j = y], u'_j = -p_y ([j = y] - p_j); the first term is 0 where u = 0."""
    dps = dps or digits_for(x)
    c = len(np.ravel(x))
    if y == ignore_index:
        return [mpf(0)] * c
    with mpmath.workdps(dps):
        p = softmax_row(x, dps)
        if mpmath.isnan(p[0]):
            return [NAN] * c
        g = mp(gamma)
        w = _weights(weight, c)[y]
        ell = -mpmath.log(p[y])
        u = 1 - p[y]
        out = []
        for j in range(c):
            dl = p[j] - (j == y)
            du = -p[y] * ((j == y) - p[j])
            first = mpf(0) if (u == 0 or gamma == 0) else g * u ** (g - 1) * du * ell
            out.append(w * (first + _pow(u, g) * dl))
        return out


# --------------------------------------------------------------------------------------------
# Element-wise sigmoid losses (scalars)
# --------------------------------------------------------------------------------------------
def _sigmoid(x):
    return 1 / (1 + mpmath.exp(-x))


def _softplus(x):
    return mpmath.log(1 + mpmath.exp(x))


def _scalar_digits(*vals):
    return digits_for(np.array(vals, dtype=np.float64)) + int(
        max((abs(float(v)) for v in vals if math.isfinite(float(v))), default=0) / math.log(10)
    )


def binary_cross_entropy_with_logits(x, t, weight=1.0, pos_weight=1.0, dps=None):
    """w [pw t log(1 + e^-x) + (1 - t) log(1 + e^x)]."""
    dps = dps or _scalar_digits(x)
    with mpmath.workdps(dps):
        x, t, w, pw = mp(x), mp(t), mp(weight), mp(pos_weight)
        if mpmath.isnan(x):
            return NAN
        return w * (pw * t * _softplus(-x) + (1 - t) * _softplus(x))


def binary_cross_entropy_with_logits_grad(x, t, weight=1.0, pos_weight=1.0, dps=None):
    """w [(1 - t) sigmoid(x) - pw t sigmoid(-x)]."""
    dps = dps or _scalar_digits(x)
    with mpmath.workdps(dps):
        x, t, w, pw = mp(x), mp(t), mp(weight), mp(pos_weight)
        if mpmath.isnan(x):
            return NAN
        return w * ((1 - t) * _sigmoid(x) - pw * t * _sigmoid(-x))


def binary_cross_entropy_with_logits_grad_scale(x, t, weight=1.0, pos_weight=1.0):
    """The larger of the two terms that the gradient subtracts, |w| max((1 - t) sigmoid(x),
    pw t sigmoid(-x)): the scale a soft-target BCE gradient is accurate relative to."""
    with mpmath.workdps(_scalar_digits(x)):
        x, t, w, pw = mp(x), mp(t), mp(weight), mp(pos_weight)
        return abs(w) * max((1 - t) * _sigmoid(x), pw * t * _sigmoid(-x))


def binary_cross_entropy(p, t, weight=1.0, dps=None):
    """torch's BCELoss: -w [t max(log p, -100) + (1 - t) max(log(1 - p), -100)], 0 * -100 = 0.
    log(1 - p) needs -log10(p) more digits than the result."""
    dps = dps or 60 + (int(-math.log10(p)) if 0 < p < 1 else 0)
    with mpmath.workdps(dps):
        p, t, w = mp(p), mp(t), mp(weight)
        lp = mpf(-100) if p == 0 else max(mpmath.log(p), mpf(-100))
        lq = mpf(-100) if p == 1 else max(mpmath.log(1 - p), mpf(-100))
        return -w * (t * lp + (1 - t) * lq)


def sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0, dps=None):
    """torchvision: alpha_t ce (1 - p_t)^gamma, p_t = p t + (1 - p)(1 - t), p = sigmoid(x),
    alpha_t = alpha t + (1 - alpha)(1 - t) (1 where alpha < 0)."""
    dps = dps or _scalar_digits(x)
    with mpmath.workdps(dps):
        x, t, a, g = mp(x), mp(t), mp(alpha), mp(gamma)
        p = _sigmoid(x)
        ce = t * _softplus(-x) + (1 - t) * _softplus(x)
        b = 1 - (p * t + (1 - p) * (1 - t))
        at = a * t + (1 - a) * (1 - t) if alpha >= 0 else mpf(1)
        return at * ce * _pow(b, g)


def sigmoid_focal_loss_grad(x, t, alpha=0.25, gamma=2.0, dps=None):
    """alpha_t [(p - t) b^gamma + gamma ce b^(gamma-1) p (1 - p) (1 - 2 t)], b = 1 - p_t."""
    dps = dps or _scalar_digits(x)
    with mpmath.workdps(dps):
        x, t, a, g = mp(x), mp(t), mp(alpha), mp(gamma)
        p = _sigmoid(x)
        ce = t * _softplus(-x) + (1 - t) * _softplus(x)
        b = 1 - (p * t + (1 - p) * (1 - t))
        at = a * t + (1 - a) * (1 - t) if alpha >= 0 else mpf(1)
        second = (
            mpf(0) if (b == 0 or gamma == 0) else g * ce * b ** (g - 1) * p * (1 - p) * (1 - 2 * t)
        )
        return at * ((p - t) * _pow(b, g) + second)


def sigmoid_focal_loss_grad_scale(x, t, alpha=0.25, gamma=2.0):
    """The sum of the magnitudes of the terms the sigmoid-focal gradient adds, the scale a
    soft-target gradient is accurate relative to:
    |alpha_t| [max(p (1 - t), (1 - p) t) b^gamma + gamma ce b^(gamma-1) p (1 - p) |1 - 2 t|]."""
    with mpmath.workdps(_scalar_digits(x)):
        x, t, a, g = mp(x), mp(t), mp(alpha), mp(gamma)
        p = _sigmoid(x)
        ce = t * _softplus(-x) + (1 - t) * _softplus(x)
        b = 1 - (p * t + (1 - p) * (1 - t))
        at = a * t + (1 - a) * (1 - t) if alpha >= 0 else mpf(1)
        second = (
            mpf(0)
            if (b == 0 or gamma == 0)
            else g * ce * b ** (g - 1) * p * (1 - p) * abs(1 - 2 * t)
        )
        return abs(at) * (max(p * (1 - t), (1 - p) * t) * _pow(b, g) + second)


# --------------------------------------------------------------------------------------------
# Scales of soft-target softmax gradients
# --------------------------------------------------------------------------------------------
def smoothed_index_target(c, y, weight=None, label_smoothing=0.0):
    """The soft target a that smoothing makes of class index y: a_j = (1 - eps) w_y [j = y]
    + (eps / C) w_j (the gradient is then sum(a) p_j - a_j, as for probability targets)."""
    w = _weights(weight, c)
    eps = mp(label_smoothing)
    return [(1 - eps) * w[y] * (j == y) + eps / c * w[j] for j in range(c)]


def probs_target(t, weight=None, label_smoothing=0.0):
    """a_j = w_j ((1 - eps) t_j + eps / C) for a probability target t."""
    return _soft_target(t, weight, label_smoothing, len(np.ravel(t)))


def soft_grad_scale_row(x, a, dps=None):
    """max(sum(a) p_j, a_j) per element: the larger of the two terms that the gradient
    sum(a) p_j - a_j subtracts, what a soft-target gradient is accurate relative to."""
    dps = dps or digits_for(x)
    with mpmath.workdps(dps):
        p = softmax_row(x, dps)
        asum = mpmath.fsum(a)
        return [max(asum * pj, aj) for pj, aj in zip(p, a)]
