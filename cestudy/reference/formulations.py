"""Baseline formulations and the one registry of implementations that everything enumerates.

The runner, the tests and the benchmarks all read ``REGISTRY``: for each variant, the numpy
formulations ``naive`` (softmax or sigmoid, then log), ``clipped`` (probabilities clipped to
[eps, 1 - eps], Keras' eps = 1e-7 by default), ``lse`` (max-shifted log-sum-exp, the form torch and
optax use), ``accurate`` (the formulation of ``cestudy.kernels.cpu`` written in numpy), cestudy's
``numba`` and ``cuda`` kernels, and the peers ``torch`` and ``scipy`` when installed.

Every numpy formulation does its arithmetic in the dtype of its input (float64, float32, float16
or bfloat16): that is what the precision study measures. Each implementation is called as
``fn(x, target, **options) -> (loss, grad)`` with ``x`` of shape (N, C) in the dtype under test,
per-sample ``loss`` (N,) (or (N, C) for element-wise variants) and ``grad`` = d(sum of losses)/dx
or None where the implementation offers none.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from typing import Callable

import numpy as np

from .. import dtypes

VARIANTS = {
    "ce_index": "softmax cross-entropy with class-index targets",
    "ce_prob": "softmax cross-entropy with probability targets, H(p, q)",
    "bce_logits": "binary cross-entropy with logits",
    "bce_probs": "binary cross-entropy on probabilities (sigmoid applied first)",
    "kl": "KL(p || softmax(x))",
    "focal_softmax": "softmax focal loss",
    "focal_sigmoid": "sigmoid focal loss (torchvision)",
}
ELEMENTWISE = ("bce_logits", "bce_probs", "focal_sigmoid")
INDEX_TARGET = ("ce_index", "focal_softmax")


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
        head = a[..., :half] + a[..., half:2 * half]
        a = np.concatenate([head, a[..., 2 * half:]], axis=-1) if n % 2 else head
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


SOFTMAX_FORMS = {"naive": _sm_naive, "clipped": _sm_clipped, "lse": _sm_lse,
                 "accurate": _sm_accurate}


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


def _ce_index(form):
    def fn(x, target, weight=None, ignore_index=-100, label_smoothing=0.0, eps=1e-7, **_):
        a, ys, keep = _index_coefficients(x, target, weight, ignore_index, label_smoothing)
        return _softmax_family_loss_grad(x, a, form, eps, index=(ys, keep))
    return fn


def _ce_prob(form):
    def fn(x, target, weight=None, label_smoothing=0.0, eps=1e-7, **_):
        c = x.shape[1]
        w = np.ones(c) if weight is None else np.asarray(weight, dtype=np.float64)
        a = (w[None, :] * ((1 - label_smoothing) * target.astype(np.float64)
                           + label_smoothing / c)).astype(x.dtype)
        return _softmax_family_loss_grad(x, a, form, eps)
    return fn


def _kl(form):
    def fn(x, target, eps=1e-7, **_):
        nlp, q, unclipped, _ = SOFTMAX_FORMS[form](x, eps)
        p = target
        with np.errstate(all="ignore"):
            logp = np.log(np.where(p == 0, _c(x, 1), p))
            if form == "accurate":
                terms = np.where(p == 0, _c(x, 0), p * (nlp + logp))
                loss = _pairwise_sum(terms)
            else:  # the textbook difference  sum p log p - sum p log q
                loss = (np.sum(np.where(p == 0, _c(x, 0), p * logp), axis=-1)
                        + np.sum(np.where(p == 0, _c(x, 0), p * nlp), axis=-1))
            pu = p if unclipped is None else np.where(unclipped, p, _c(x, 0))
            grad = np.sum(pu, axis=-1, keepdims=True) * q - pu
        return loss, grad
    return fn


def _focal_softmax(form):
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
def _bce_logits(form):
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
                loss = w * ((one - t) * x + lw * (np.log1p(np.exp(-np.abs(x)))
                                                   + np.maximum(-x, zero)))
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


def _bce_probs(form):
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


def _focal_sigmoid(form):
    def fn(x, target, alpha=0.25, gamma=2.0, eps=1e-7, **_):
        t = target
        one = _c(x, 1)
        ce, _ = _bce_logits("lse" if form == "lse" else form)(x, t, eps=eps)
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


FORMULATION_FACTORIES = {
    "ce_index": _ce_index, "ce_prob": _ce_prob, "kl": _kl, "focal_softmax": _focal_softmax,
    "bce_logits": _bce_logits, "bce_probs": _bce_probs, "focal_sigmoid": _focal_sigmoid,
}


# --------------------------------------------------------------------------------------------
# cestudy's kernels through the public API
# --------------------------------------------------------------------------------------------
def _cestudy_impl(variant, backend):
    import cestudy as cs

    def fn(x, target, **opt):
        if variant == "ce_index":
            return cs.cross_entropy_with_grad(
                x, target, weight=opt.get("weight"), ignore_index=opt.get("ignore_index", -100),
                label_smoothing=opt.get("label_smoothing", 0.0), reduction="none", backend=backend)
        if variant == "ce_prob":
            return cs.cross_entropy_with_grad(
                x, target, weight=opt.get("weight"),
                label_smoothing=opt.get("label_smoothing", 0.0), reduction="none", backend=backend)
        if variant == "kl":
            return cs.kl_divergence_with_grad(x, target, reduction="none", backend=backend)
        if variant == "focal_softmax":
            return cs.softmax_focal_loss_with_grad(
                x, target, gamma=opt.get("gamma", 2.0), weight=opt.get("weight"),
                ignore_index=opt.get("ignore_index", -100), reduction="none", backend=backend)
        if variant == "bce_logits":
            return cs.binary_cross_entropy_with_logits_with_grad(
                x, target, weight=opt.get("weight"), pos_weight=opt.get("pos_weight"),
                reduction="none", backend=backend)
        if variant == "focal_sigmoid":
            return cs.sigmoid_focal_loss_with_grad(x, target, alpha=opt.get("alpha", 0.25),
                                                   gamma=opt.get("gamma", 2.0), reduction="none",
                                                   backend=backend)
        if variant == "bce_probs":
            return cs.binary_cross_entropy(x, target, reduction="none"), None
        raise KeyError(variant)
    return fn


# --------------------------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------------------------
def _to_torch(a):
    import torch

    a = np.asarray(a)
    if a.dtype == dtypes.bfloat16:
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def _from_torch(t, dtype):
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.to(torch.float32).numpy().astype(dtype)
    return t.numpy().astype(dtype, copy=False)


def _torch_impl(variant):
    def fn(x, target, **opt):
        import torch
        import torch.nn.functional as F

        xt = _to_torch(x).requires_grad_(variant != "bce_probs")
        w = opt.get("weight")
        wt = None if w is None else torch.as_tensor(np.asarray(w, dtype=np.float64)).to(xt.dtype)
        if variant in INDEX_TARGET:
            tt = torch.from_numpy(np.asarray(target, dtype=np.int64))
        else:
            tt = _to_torch(target)
        if variant == "ce_index":
            loss = F.cross_entropy(xt, tt, weight=wt, ignore_index=opt.get("ignore_index", -100),
                                   label_smoothing=opt.get("label_smoothing", 0.0),
                                   reduction="none")
        elif variant == "ce_prob":
            loss = F.cross_entropy(xt, tt, weight=wt,
                                   label_smoothing=opt.get("label_smoothing", 0.0),
                                   reduction="none")
        elif variant == "kl":
            loss = F.kl_div(F.log_softmax(xt, dim=-1), tt, reduction="none").sum(-1)
        elif variant == "focal_softmax":
            logp = F.log_softmax(xt, dim=-1)
            ign = opt.get("ignore_index", -100)
            keep = tt != ign
            ys = torch.where(keep, tt, torch.zeros_like(tt))
            lp = logp.gather(1, ys[:, None])[:, 0]
            wy = torch.ones_like(lp) if wt is None else wt[ys]
            loss = torch.where(keep, -wy * (1 - lp.exp()) ** opt.get("gamma", 2.0) * lp,
                               torch.zeros_like(lp))
        elif variant == "bce_logits":
            pw = opt.get("pos_weight")
            pwt = None if pw is None else torch.as_tensor(np.asarray(pw)).to(xt.dtype)
            loss = F.binary_cross_entropy_with_logits(xt, tt, weight=wt, pos_weight=pwt,
                                                      reduction="none")
        elif variant == "focal_sigmoid":  # torchvision.ops.sigmoid_focal_loss, verbatim
            p = torch.sigmoid(xt)
            ce = F.binary_cross_entropy_with_logits(xt, tt, reduction="none")
            p_t = p * tt + (1 - p) * (1 - tt)
            loss = ce * ((1 - p_t) ** opt.get("gamma", 2.0))
            alpha = opt.get("alpha", 0.25)
            if alpha >= 0:
                loss = (alpha * tt + (1 - alpha) * (1 - tt)) * loss
        elif variant == "bce_probs":
            loss = F.binary_cross_entropy(xt, tt, reduction="none")
        else:
            raise KeyError(variant)
        grad = None
        if variant != "bce_probs":
            loss.sum().backward()
            grad = _from_torch(xt.grad, x.dtype)
        return _from_torch(loss, x.dtype), grad
    return fn


def _scipy_impl(variant):
    def fn(x, target, **opt):
        from scipy import special

        if variant != "ce_index":
            raise KeyError(variant)
        with np.errstate(all="ignore"):
            logp = special.log_softmax(x, axis=-1)
            n = x.shape[0]
            loss = -logp[np.arange(n), target]
            grad = special.softmax(x, axis=-1)
            grad[np.arange(n), target] -= 1
        return np.asarray(loss), np.asarray(grad)
    return fn


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way of computing one variant."""

    name: str          # "naive", "clipped", "lse", "accurate", "numba", "cuda", "torch", "scipy"
    variant: str
    kind: str          # "formulation" (numpy), "kernel" (cestudy), "peer"
    fn: Callable
    description: str

    def availability(self) -> tuple[bool, str]:
        """(available, reason when not)."""
        if self.name == "torch" and importlib.util.find_spec("torch") is None:
            return False, "torch is not installed"
        if self.name == "scipy" and importlib.util.find_spec("scipy") is None:
            return False, "scipy is not installed"
        if self.name == "cuda":
            from .. import backends

            ok, why = backends.cuda_status()
            return ok, "" if ok else why
        return True, ""


DESCRIPTIONS = {
    "naive": "softmax (or sigmoid) first, then log, in the working dtype",
    "clipped": "probabilities clipped to [eps, 1 - eps] before the log (Keras, sklearn)",
    "lse": "max-shifted log-sum-exp, lse - x_y (torch, optax, TensorFlow)",
    "accurate": "m + log1p(sum_{j != k} e^(x_j - m)) in numpy, the working dtype",
    "numba": "cestudy's Numba CPU kernels (float64 arithmetic, exact differences)",
    "cuda": "cestudy's numba-cuda kernels",
    "torch": "torch.nn.functional (CPU) and autograd",
    "scipy": "scipy.special.log_softmax / softmax",
}


def _build_registry():
    reg = {}
    for variant, factory in FORMULATION_FACTORIES.items():
        impls = {}
        forms = ("naive", "clipped", "accurate") if variant == "bce_probs" else \
            ("naive", "clipped", "lse", "accurate")
        for form in forms:
            impls[form] = Implementation(form, variant, "formulation", factory(form),
                                         DESCRIPTIONS[form])
        impls["numba"] = Implementation("numba", variant, "kernel",
                                        _cestudy_impl(variant, "cpu"), DESCRIPTIONS["numba"])
        if variant != "bce_probs":
            impls["cuda"] = Implementation("cuda", variant, "kernel",
                                           _cestudy_impl(variant, "cuda"), DESCRIPTIONS["cuda"])
        impls["torch"] = Implementation("torch", variant, "peer", _torch_impl(variant),
                                        DESCRIPTIONS["torch"])
        if variant == "ce_index":
            impls["scipy"] = Implementation("scipy", variant, "peer", _scipy_impl(variant),
                                            DESCRIPTIONS["scipy"])
        reg[variant] = impls
    return reg


REGISTRY: dict[str, dict[str, Implementation]] = _build_registry()
IMPLEMENTATION_NAMES = ("naive", "clipped", "lse", "accurate", "numba", "cuda", "torch", "scipy")


def get(variant: str, name: str) -> Implementation:
    if variant not in REGISTRY:
        raise KeyError(f"unknown variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    if name not in REGISTRY[variant]:
        raise KeyError(f"variant {variant!r} has no implementation {name!r}; allowed: "
                       f"{', '.join(REGISTRY[variant])}")
    return REGISTRY[variant][name]
