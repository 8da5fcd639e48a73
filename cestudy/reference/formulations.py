"""Baseline formulations of each variant, written in numpy in the dtype under test.

For each variant of ``cestudy.variants`` this module has a factory of the same name:
``<variant name>(form) -> fn(x, target, **options) -> (loss, grad)`` for the forms the registry
lists: ``naive`` (softmax or sigmoid, then log), ``clipped`` (probabilities clipped to
[eps, 1 - eps], Keras' eps = 1e-7 by default), ``lse`` (max-shifted log-sum-exp, the form torch
and optax use) and ``accurate`` (the formulation of ``cestudy.kernels.cpu`` written in numpy).

Every formulation does its arithmetic in the dtype of its input (float64, float32, float16 or
bfloat16): that is what the precision study measures. ``x`` has shape (N, C); ``loss`` is
per-sample (N,) (or (N, C) for element-wise variants) and ``grad`` = d(sum of losses)/dx, or None
where the formulation offers none.
"""

from __future__ import annotations

import numpy as np

DESCRIPTIONS = {
    "naive": "softmax (or sigmoid) first, then log, in the working dtype",
    "clipped": "probabilities clipped to [eps, 1 - eps] before the log (Keras, sklearn)",
    "lse": "max-shifted log-sum-exp, (m + log s) - x_y (optax's form)",
    "accurate": "m + log1p(sum_{j != k} e^(x_j - m)) in numpy, the working dtype",
}


# --------------------------------------------------------------------------------------------
# dtype helpers: keep every operation in the array's own dtype
# --------------------------------------------------------------------------------------------
def _c(x, v):
    """A scalar of x's dtype."""
    return np.asarray(v).astype(x.dtype)


def _clip(p, eps):
    lo, hi = _c(p, eps), _c(p, 1) - _c(p, eps)
    return np.minimum(np.maximum(p, lo), hi), (p >= lo) & (p <= hi)


def _pairwise_sum(a):
    """Pairwise (cascade) sum over the last axis in a's dtype: error O(log C u), no stall."""
    a = np.array(a)
    while a.shape[-1] > 1:
        n = a.shape[-1]
        half = n // 2
        head = a[..., :half] + a[..., half : 2 * half]
        a = np.concatenate([head, a[..., 2 * half :]], axis=-1) if n % 2 else head
    return a[..., 0] if a.shape[-1] else np.zeros(a.shape[:-1], a.dtype)


# --------------------------------------------------------------------------------------------
# Softmax family: each formulation gives -log p (nlp), p, and the mask of unclipped entries
# --------------------------------------------------------------------------------------------
def _sm_naive(x, eps=None):
    with np.errstate(all="ignore"):
        ex = np.exp(x)
        p = ex / np.sum(ex, axis=-1, keepdims=True)
        return -np.log(p), p, None, None


def _sm_clipped(x, eps=1e-7):
    with np.errstate(all="ignore"):
        _, p, _, _ = _sm_naive(x)
        pc, unclipped = _clip(p, eps)
        return -np.log(pc), p, unclipped, None


def _sm_lse(x, eps=None):
    with np.errstate(all="ignore"):
        m = np.max(x, axis=-1, keepdims=True)
        lse = m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))
        return lse - x, np.exp(x - lse), None, None


def _sm_accurate(x, eps=None):
    """m + log1p(sum_{j != k} e_j); p = e / (1 + S); also returns (S, k) for p_y - 1."""
    with np.errstate(all="ignore"):
        n = x.shape[0]
        k = np.argmax(x, axis=-1)
        m = x[np.arange(n), k][:, None]
        e = np.exp(x - m)
        e_wo = e.copy()
        e_wo[np.arange(n), k] = 0
        s = _pairwise_sum(e_wo)[:, None]
        nlp = (m - x) + np.log1p(s)
        return nlp, e / (_c(x, 1) + s), None, (s[:, 0], k)


SOFTMAX_FORMS = {
    "naive": _sm_naive,
    "clipped": _sm_clipped,
    "lse": _sm_lse,
    "accurate": _sm_accurate,
}


def _index_coefficients(x, target, weight, ignore_index, label_smoothing):
    """a (N, C) with loss_i = sum_c a_ic nlp_ic: (1 - eps) w_y onehot_y + (eps / C) w."""
    n, c = x.shape
    w = np.ones(c) if weight is None else np.asarray(weight, dtype=np.float64)
    keep = target != ignore_index
    ys = np.where(keep, target, 0)
    a = np.zeros((n, c))
    a[np.arange(n), ys] = (1 - label_smoothing) * w[ys]
    if label_smoothing:
        a += (label_smoothing / c) * w[None, :]
    a[~keep] = 0
    return a.astype(x.dtype), ys, keep


def _softmax_family_loss_grad(x, a, form, eps, index=None):
    """loss = sum_c a_c nlp_c, grad = (sum_c a_c u_c) p - a u (u: unclipped mask)."""
    nlp, p, unclipped, extra = SOFTMAX_FORMS[form](x, eps)
    with np.errstate(all="ignore"):
        terms = np.where(a == 0, _c(x, 0), a * nlp)
        loss = np.sum(terms, axis=-1)
        au = a if unclipped is None else np.where(unclipped, a, _c(x, 0))
        grad = np.sum(au, axis=-1, keepdims=True) * p - au
        if form == "accurate" and index is not None:
            # p_y - 1 = -S / (1 + S) when y is the argmax (no cancellation)
            ys, keep = index
            s, k = extra
            rows = np.arange(x.shape[0])
            a_y = a[rows, ys]
            pm1 = np.where(ys == k, -s / (_c(x, 1) + s), p[rows, ys] - _c(x, 1))
            fixed = a_y * pm1 + (np.sum(a, axis=-1) - a_y) * p[rows, ys]
            grad[rows[keep], ys[keep]] = fixed[keep]
    return loss, grad


def cross_entropy(form):
    def fn(x, target, weight=None, ignore_index=-100, label_smoothing=0.0, eps=1e-7, **_):
        a, ys, keep = _index_coefficients(x, target, weight, ignore_index, label_smoothing)
        return _softmax_family_loss_grad(x, a, form, eps, index=(ys, keep))

    return fn


def cross_entropy_probs(form):
    def fn(x, target, weight=None, label_smoothing=0.0, eps=1e-7, **_):
        c = x.shape[1]
        w = np.ones(c) if weight is None else np.asarray(weight, dtype=np.float64)
        a = (
            w[None, :] * ((1 - label_smoothing) * target.astype(np.float64) + label_smoothing / c)
        ).astype(x.dtype)
        return _softmax_family_loss_grad(x, a, form, eps)

    return fn


def kl_divergence(form):
    def fn(x, target, eps=1e-7, **_):
        nlp, q, unclipped, _ = SOFTMAX_FORMS[form](x, eps)
        p = target
        with np.errstate(all="ignore"):
            logp = np.log(np.where(p == 0, _c(x, 1), p))
            if form == "accurate":
                terms = np.where(p == 0, _c(x, 0), p * (nlp + logp))
                loss = _pairwise_sum(terms)
            else:  # the textbook difference  sum p log p - sum p log q
                loss = np.sum(np.where(p == 0, _c(x, 0), p * logp), axis=-1) + np.sum(
                    np.where(p == 0, _c(x, 0), p * nlp), axis=-1
                )
            pu = p if unclipped is None else np.where(unclipped, p, _c(x, 0))
            grad = np.sum(pu, axis=-1, keepdims=True) * q - pu
        return loss, grad

    return fn


def softmax_focal_loss(form):
    def fn(x, target, gamma=2.0, weight=None, ignore_index=-100, eps=1e-7, **_):
        nlp, p, _, extra = SOFTMAX_FORMS[form](x, eps)
        n, c = x.shape
        keep = target != ignore_index
        ys = np.where(keep, target, 0)
        rows = np.arange(n)
        w = np.ones(c) if weight is None else np.asarray(weight)
        with np.errstate(all="ignore"):
            if form == "clipped":
                p_y, _ = _clip(p[rows, ys], eps)
                ce = -np.log(p_y)
            else:
                p_y, ce = p[rows, ys], nlp[rows, ys]
            if form == "accurate":
                a = _c(x, 1) - p_y
                s, k = extra
                a = np.where(ys == k, s / (_c(x, 1) + s), a)
            else:
                a = _c(x, 1) - p_y
            loss = _c(x, w)[ys] * a ** _c(x, gamma) * ce
        loss[~keep] = 0
        return loss, None

    return fn


# --------------------------------------------------------------------------------------------
# Sigmoid family (element-wise)
# --------------------------------------------------------------------------------------------
def binary_cross_entropy_with_logits(form):
    def fn(x, target, weight=None, pos_weight=None, eps=1e-7, **_):
        t = target
        one, zero = _c(x, 1), _c(x, 0)
        w = one if weight is None else _c(x, weight)
        pw = one if pos_weight is None else _c(x, pos_weight)
        with np.errstate(all="ignore"):
            if form in ("naive", "clipped"):
                p = one / (one + np.exp(-x))
                if form == "clipped":
                    pc, unclipped = _clip(p, eps)
                else:
                    pc, unclipped = p, np.ones(p.shape, bool)
                loss = -w * (pw * t * np.log(pc) + (one - t) * np.log(one - pc))
                grad = np.where(unclipped, w * ((one - t) * p - pw * t * (one - p)), zero)
            elif form == "lse":  # torch's / TensorFlow's max-shifted form
                lw = one + (pw - one) * t
                loss = w * (
                    (one - t) * x + lw * (np.log1p(np.exp(-np.abs(x))) + np.maximum(-x, zero))
                )
                p = one / (one + np.exp(-x))
                grad = w * (lw * p - pw * t)
            else:  # accurate: pw t softplus(-x) + (1 - t) softplus(x), two non-negative terms
                sp_neg = np.log1p(np.exp(-np.abs(x))) + np.maximum(-x, zero)
                sp_pos = np.log1p(np.exp(-np.abs(x))) + np.maximum(x, zero)
                loss = w * (pw * t * sp_neg + (one - t) * sp_pos)
                e = np.exp(-np.abs(x))
                sig = np.where(x >= zero, one / (one + e), e / (one + e))
                sig_neg = np.where(x >= zero, e / (one + e), one / (one + e))
                grad = w * ((one - t) * sig - pw * t * sig_neg)
        return loss, grad

    return fn


def binary_cross_entropy(form):
    def fn(probs, target, eps=1e-7, **_):
        p, t = probs, target
        one = _c(p, 1)
        with np.errstate(all="ignore"):
            if form == "naive":
                loss = -(t * np.log(p) + (one - t) * np.log(one - p))
            elif form == "clipped":
                pc, _ = _clip(p, eps)
                loss = -(t * np.log(pc) + (one - t) * np.log(one - pc))
            else:  # accurate on probabilities: log1p(-p) instead of log(1 - p)
                loss = -(t * np.log(p) + (one - t) * np.log1p(-p))
        return loss, None

    return fn


def sigmoid_focal_loss(form):
    def fn(x, target, alpha=0.25, gamma=2.0, eps=1e-7, **_):
        t = target
        one = _c(x, 1)
        ce, _ = binary_cross_entropy_with_logits(form)(x, t, eps=eps)
        with np.errstate(all="ignore"):
            if form == "accurate":
                e = np.exp(-np.abs(x))
                sig = np.where(x >= 0, one / (one + e), e / (one + e))
                sig_neg = np.where(x >= 0, e / (one + e), one / (one + e))
                b = t * sig_neg + (one - t) * sig
            else:
                p = one / (one + np.exp(-x))
                if form == "clipped":
                    p, _ = _clip(p, eps)
                b = one - (p * t + (one - p) * (one - t))
            loss = ce * b ** _c(x, gamma)
            if alpha >= 0:
                loss = (_c(x, alpha) * t + (one - _c(x, alpha)) * (one - t)) * loss
        return loss, None

    return fn
