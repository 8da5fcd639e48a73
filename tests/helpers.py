"""The accuracy contract of cestudy's kernels, and the assertions that hold tests to it.

The contract (exact = the oracle, ``cestudy.reference.oracle``, itself checked against mpmath to
2^-60 under the same measures in ``tests/test_oracle.py``; ulp(v) = the spacing of the working
dtype at |v|, subnormal spacing below the normal range; tol = 4 ulp unless stated):

1. Values, element-wise: |got - exact| <= tol * ulp(exact) for every per-sample loss, logsumexp,
   log_softmax and softmax entry, including losses of 1e-30, equal logits at offsets of 1e8 and
   rows with -inf (masked) classes. NaN, +inf and all -inf rows give NaN (logsumexp: +inf, -inf)
   exactly where the exact value does. Measured exceptions, float64 only (float32 results stay
   within 1 ulp): the focal losses, loss and gradient, within 2 gamma + 4 ulp (``focal_tol``)
   since (1 - p_t)^gamma multiplies the error of 1 - p_t by gamma; KL divergence is held to tol
   in ulps of H(p, q), not of itself (``assert_kl_ulp``: KL of nearly equal distributions is a
   difference of terms of size H(p, q)).
   -> ``assert_ulp``.
2. Hard-target gradients, element-wise, as values: cross_entropy with class indices (weight,
   ignore_index; no label smoothing), softmax_focal_loss, and binary_cross_entropy_with_logits and
   sigmoid_focal_loss with targets in {0, 1} (weight, pos_weight, alpha). Every element is
   within tol * ulp of itself, the true-class gradient -S/(1+S) of a confident row included.
   -> ``assert_ulp``.
3. Soft-target gradients: each element is within tol ulp of the larger of the two terms it
   subtracts (they cancel where the prediction meets the target), not of itself:
   - softmax family (probability targets, label smoothing with any target, kl_divergence):
     g_j = A p_j - a_j with a the effective target (``smoothed_index_target`` /
     ``probs_target``) and A = sum(a); the scale is max(A p_j, a_j) (``soft_grad_scale``);
   - binary_cross_entropy_with_logits, t in (0, 1): g = w ((1 - t) s(x) - pw t s(-x)); the scale
     is |w| max((1 - t) s(x), pw t s(-x)) (``bce_grad_scale``);
   - sigmoid_focal_loss, t in (0, 1): the sum of the magnitudes of its gradient's terms
     (``sigmoid_focal_grad_scale``).
   -> ``assert_ulp_of_scale``. The scale is at least the element's magnitude, so this is weaker
   than (2) for an element that cancels and the same otherwise; for an element far below its
   row's largest it is stronger than "relative to the row's largest entry", which a row that
   cancels throughout (p ~ softmax(x): every entry ~ eps^2, errors ~ eps / C) cannot meet.
4. Reductions: ``mean`` / ``sum`` are within tol ulp of the exact weighted mean / sum of the exact
   per-sample losses (each accumulation is in float64 or compensated).
5. Not covered: ``binary_cross_entropy`` on probabilities reproduces torch's BCELoss, each log
   clamped at -100 (``oracle.binary_cross_entropy`` models the clamp; its input p is already
   rounded, so a probability that rounds to 1 gives 100 where the loss of the logits was tiny).
   It is within tol of that clamped function, not of the loss of the unrounded probability.

float16 and bfloat16 inputs are computed in float32 and rounded once: within 1 ulp of their dtype
on values that the rounding to float32 does not already perturb.

The assertions print the first bad indices and report NaN/inf mismatches separately from finite
errors.
"""

import numpy as np

from cestudy.reference import oracle

# The accuracy contract of the public kernels, in ulps of the working dtype.
CONTRACT_ULP = 4.0
LD = np.longdouble


def focal_tol(gamma, dtype):
    """Focal losses: tol in float32 (and lower), 2 gamma + 4 ulp in float64 (see (1))."""
    return CONTRACT_ULP if np.dtype(dtype) != np.float64 else max(CONTRACT_ULP, 2 * gamma + 4)


def assert_ulp(value, exact, dtype, tol=CONTRACT_ULP, what="value"):
    """(1), (2): every element of ``value`` within ``tol`` ulp of ``exact``, element-wise."""
    err = oracle.ulp_error(value, exact, dtype)
    _report(err, value, exact, tol, what)


def assert_ulp_of_scale(value, exact, scale, dtype, tol=CONTRACT_ULP, what="grad"):
    """(3): |value - exact| <= tol * ulp(scale) element-wise (scale broadcast to exact)."""
    exact = np.asarray(exact, dtype=LD)
    v = np.asarray(np.asarray(value).astype(np.float64), dtype=LD)
    scale = np.broadcast_to(np.asarray(scale, dtype=LD), exact.shape)
    err = oracle.ulp_error(value, exact, dtype)  # inf on NaN/inf mismatches, 0 on matches
    finite = np.isfinite(v) & np.isfinite(exact) & (err > 0)
    with np.errstate(over="ignore", invalid="ignore"):
        err[finite] = (np.abs(v - exact)[finite] / oracle.ulp(scale[finite], dtype)).astype(
            np.float64
        )
    _report(err, value, exact, tol, what)


def assert_kl_ulp(value, exact, cross_entropy, dtype, tol=CONTRACT_ULP, what="KL"):
    """(1): KL divergence within tol ulp of H(p, q) (``cross_entropy``, exact, per row)."""
    assert_ulp_of_scale(
        value,
        exact,
        np.maximum(np.abs(np.asarray(exact, LD)), np.asarray(cross_entropy, LD)),
        dtype,
        tol,
        what,
    )


def assert_grad_ulp(value, exact, dtype, tol=CONTRACT_ULP, what="grad"):
    """The older mixed measure (``oracle.grad_ulp_error``: the smaller of the element's relative
    error and its error in ulps of its row's largest entry). Not the contract: kept for modules
    that have not moved to ``assert_ulp`` / ``assert_ulp_of_scale`` yet."""
    err = oracle.grad_ulp_error(value, exact, dtype)
    _report(err, value, exact, tol, what)


# --------------------------------------------------------------------------------------------
# scales of soft-target gradients (longdouble, from the oracle's softmax)
# --------------------------------------------------------------------------------------------
def smoothed_index_target(target, n_classes, weight=None, label_smoothing=0.0, ignore_index=-100):
    """a[i, j] = (1 - eps) w_y [j = y] + (eps / C) w_j (0 on ignored rows): the soft target whose
    gradient sum(a) p - a is the smoothed index-target gradient."""
    y = np.asarray(target, dtype=np.int64)
    c = n_classes
    w = np.ones(c, LD) if weight is None else np.asarray(weight, np.float64).astype(LD)
    eps = LD(label_smoothing)
    keep = y != ignore_index
    ys = np.where(keep, y, 0)
    a = np.broadcast_to(eps / c * w, (len(y), c)).copy()
    a[np.arange(len(y)), ys] += (1 - eps) * w[ys]
    a[~keep] = 0
    return a


def probs_target(target, weight=None, label_smoothing=0.0):
    """a = w ((1 - eps) t + eps / C) for probability targets t (N, C)."""
    t = np.asarray(target).astype(np.float64).astype(LD)
    c = t.shape[-1]
    w = np.ones(c, LD) if weight is None else np.asarray(weight, np.float64).astype(LD)
    eps = LD(label_smoothing)
    return w * ((1 - eps) * t + eps / c)


def soft_grad_scale(logits, a):
    """max(sum(a) p_j, a_j), p = softmax(logits): the scale of (3), softmax family."""
    p = oracle.softmax(np.asarray(logits))
    return np.maximum(np.asarray(a, LD).sum(axis=-1, keepdims=True) * p, np.asarray(a, LD))


def _sigmoid(x):
    x = np.asarray(x).astype(np.float64).astype(LD)
    with np.errstate(over="ignore"):
        return np.where(x >= 0, 1 / (1 + np.exp(-x)), np.exp(x) / (1 + np.exp(x)))


def bce_grad_scale(x, t, weight=None, pos_weight=None):
    """|w| max((1 - t) s(x), pw t s(-x)): the scale of (3), binary_cross_entropy_with_logits."""
    t = np.asarray(t).astype(np.float64).astype(LD)
    w = LD(1) if weight is None else np.abs(np.asarray(weight, np.float64)).astype(LD)
    pw = LD(1) if pos_weight is None else np.asarray(pos_weight, np.float64).astype(LD)
    return w * np.maximum((1 - t) * _sigmoid(x), pw * t * _sigmoid(-np.asarray(x)))


def sigmoid_focal_grad_scale(x, t, alpha=0.25, gamma=2.0):
    """|alpha_t| [max(p (1 - t), (1 - p) t) b^gamma + gamma ce b^(gamma-1) p (1 - p) |1 - 2 t|],
    b = 1 - p_t: the scale of (3), sigmoid_focal_loss."""
    p, q = _sigmoid(x), _sigmoid(-np.asarray(x))
    t = np.asarray(t).astype(np.float64).astype(LD)
    ce = oracle.binary_cross_entropy_with_logits(x, t)
    b = t * q + (1 - t) * p
    g = LD(gamma)
    with np.errstate(divide="ignore", invalid="ignore"):
        bg = np.where(g == 0, LD(1), b**g)
        second = np.where((b == 0) | (g == 0), LD(0), g * ce * bg / b * p * q * np.abs(1 - 2 * t))
    at = alpha * t + (1 - alpha) * (1 - t) if alpha >= 0 else LD(1)
    return np.abs(at) * (np.maximum(p * (1 - t), q * t) * bg + second)


def _report(err, value, exact, tol, what):
    value = np.asarray(value)
    exact = np.asarray(exact)
    nonfinite = np.isinf(err)
    if nonfinite.any():
        idx = np.argwhere(nonfinite)[:5]
        raise AssertionError(
            f"{what}: NaN/inf mismatch at {idx.tolist()}: got "
            f"{[value[tuple(i)] for i in idx]}, exact "
            f"{[float(exact[tuple(i)]) for i in idx]}"
        )
    bad = err > tol
    if bad.any():
        idx = np.argwhere(bad)[:5]
        raise AssertionError(
            f"{what}: max error {err.max():.3g} ulp > {tol} at {idx.tolist()}: "
            f"got {[value[tuple(i)] for i in idx]}, exact "
            f"{[float(exact[tuple(i)]) for i in idx]}"
        )
