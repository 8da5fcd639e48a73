"""Per-cell metrics: ULP error statistics, non-finite fractions, vanished gradients, the bias of
epsilon clipping, and the minority share of loss and gradient.

All functions are pure numpy on (value, exact) pairs; ``exact`` comes from ``cestudy.oracle``.
"""

from __future__ import annotations

import numpy as np

from .. import dtypes
from ..reference import oracle


def _round_exact(exact, dtype):
    """The exact value as the dtype can represent it: beyond the largest finite number the
    correctly rounded result is +-inf, so an implementation returning inf there is right."""
    ex = np.asarray(exact, dtype=oracle.LD)
    top = oracle.LD(float(dtypes.finfo(dtype).max))
    with np.errstate(invalid="ignore"):
        return np.where(np.abs(ex) > top, np.sign(ex) * oracle.LD(np.inf), ex)


def _stats(prefix, err):
    err = np.asarray(err, dtype=np.float64).ravel()
    if err.size == 0:
        return {f"{prefix}_median_ulp": None, f"{prefix}_p99_ulp": None, f"{prefix}_max_ulp": None}
    return {
        f"{prefix}_median_ulp": float(np.median(err)),
        f"{prefix}_p99_ulp": float(np.quantile(err, 0.99, method="higher")),
        f"{prefix}_max_ulp": float(np.max(err)),
    }


def forward_metrics(value, exact, dtype) -> dict:
    """ULP error of per-sample losses: median, p99, max over samples whose exact value is not
    NaN; spurious NaN and inf fractions (separately); fraction of samples above 4 ulp."""
    v = np.asarray(value).astype(np.float64).ravel()
    ex = _round_exact(exact, dtype).ravel()
    defined = ~np.isnan(ex)
    err = oracle.ulp_error(v, ex, dtype)
    n = max(int(defined.sum()), 1)
    finite_exact = defined & np.isfinite(ex)
    out = _stats("fwd", err[defined])
    out.update(
        {
            "fwd_frac_nan": float(np.sum(np.isnan(v) & finite_exact) / n),
            "fwd_frac_inf": float(np.sum(np.isinf(v) & finite_exact) / n),
            "fwd_frac_over_4ulp": float(np.sum(err[defined] > 4) / n),
            "fwd_nan_rows_kept": bool(np.all(np.isnan(v[~defined]))) if (~defined).any() else None,
            "n_samples": int(v.size),
        }
    )
    return out


def gradient_metrics(grad, exact, dtype, target=None) -> dict:
    """Gradient error by the contract's measure (relative, or in ulps of the row's largest
    element), the true class's relative error on its own, and wrongly vanished elements."""
    if grad is None:
        return {}
    g = np.asarray(grad).astype(np.float64)
    ex = _round_exact(exact, dtype)
    if g.ndim == 1:
        g, ex = g[None], ex[None]
    rows_ok = ~np.isnan(ex).any(axis=-1)
    g, ex = g[rows_ok], ex[rows_ok]
    out = _stats("grad", oracle.grad_ulp_error(g, ex, dtype))
    # an element vanishes wrongly when it is exactly 0 but its exact value, rounded to the
    # dtype, is not (underflow to 0 is correct rounding, not an error)
    tiny = oracle.LD(float(dtypes.finfo(dtype).smallest_subnormal)) / 2
    nonzero_exact = np.abs(ex) > tiny
    denom = max(int(nonzero_exact.sum()), 1)
    out["grad_frac_vanished"] = float(np.sum((g == 0) & nonzero_exact) / denom)
    if target is not None:
        t = np.asarray(target)[rows_ok]
        keep = (t >= 0) & (t < g.shape[1])
        rows = np.flatnonzero(keep)
        true_err = oracle.ulp_error(g[rows, t[rows]], ex[rows, t[rows]], dtype)
        out.update(_stats("grad_true", true_err))
        nz = nonzero_exact[rows, t[rows]]
        out["grad_true_frac_vanished"] = float(
            np.sum((g[rows, t[rows]] == 0) & nz) / max(int(nz.sum()), 1)
        )
    return out


def clipping_metrics(value, grad, exact, eps) -> dict:
    """Where the clip engages (the exact probability of the scored class is below eps or above
    1 - eps): the mean bias of the loss in nats, and the fraction of rows whose gradient the clip
    zeroes. ``exact`` are exact per-sample losses -log p."""
    v = np.asarray(value).astype(np.float64).ravel()
    ex = np.asarray(exact, dtype=np.float64).ravel()
    engaged = np.isfinite(ex) & ((ex > -np.log(eps)) | (ex < -np.log1p(-eps)))
    out = {"clip_frac_engaged": float(engaged.mean()) if ex.size else 0.0}
    out["clip_bias_nats"] = float(np.mean(v[engaged] - ex[engaged])) if engaged.any() else 0.0
    if grad is not None:
        g = np.asarray(grad).astype(np.float64).reshape(len(ex), -1)  # one row per sample
        zero_rows = np.all(g == 0, axis=1)
        out["clip_frac_grad_zeroed"] = float(np.mean(zero_rows & np.isfinite(ex) & (ex > 0)))
    return out


def imbalance_metrics(loss, grad, target, minority) -> dict:
    """Shares of the minority classes (``minority``: bool per class) in the samples, in the
    total loss, and in the sum of per-sample gradient norms."""
    loss = np.asarray(loss, dtype=np.float64)
    target = np.asarray(target)
    in_min = minority[target]
    gnorm = np.linalg.norm(np.asarray(grad, dtype=np.float64), axis=1)
    return {
        "minority_sample_share": float(in_min.mean()),
        "minority_loss_share": float(loss[in_min].sum() / loss.sum()),
        "minority_grad_share": float(gnorm[in_min].sum() / gnorm.sum()),
        "mean_loss": float(loss.mean()),
    }
