"""Computing one cell: generate its inputs, run the implementation, score against the oracle.

``compute_cell(cell) -> dict`` is a top-level, picklable function: the serial runner, the local
process pool and Dask workers all call it. It never touches the results store.
"""
from __future__ import annotations

import time
import zlib

import numpy as np

from .. import dtypes
from ..reference import formulations, implementations, oracle
from . import higham, inputs, metrics


class Skip(Exception):
    """The cell cannot run here (a missing peer, no GPU); recorded with its reason."""


def _rng(cell, *fields):
    """Generator seeded by the seed and the fields that shape the data (not the implementation
    or dtype), so every implementation and dtype sees the same float64 draw."""
    key = "|".join(str(cell.get(f)) for f in fields)
    return np.random.default_rng([int(cell.get("seed", 0)), zlib.crc32(key.encode())])


def compute_cell(cell: dict) -> dict:
    kind = cell["kind"]
    t0 = time.perf_counter()
    if kind == "accuracy":
        out = _accuracy(cell)
    elif kind == "imbalance":
        out = _imbalance(cell)
    elif kind == "performance":
        from ..bench import cpu as bench

        out = bench.performance_cell(cell)
    elif kind == "higham":
        out = higham.compute(cell)
    elif kind == "training":
        from . import training

        try:
            out = training.train_cell(cell)
        except training.SkipTraining as exc:
            raise Skip(str(exc)) from None
    else:
        raise ValueError(f"unknown cell kind {kind!r}")
    out["cell_seconds"] = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------------------------
# Accuracy cells
# --------------------------------------------------------------------------------------------
def _accuracy(cell):
    impl = implementations.get(cell["variant"], cell["implementation"])
    ok, why = impl.availability()
    if not ok:
        raise Skip(why)
    variant = cell["variant"]
    dtype = dtypes.dtype_from_name(cell["dtype"])
    n, c = cell["batch"], cell["classes"]
    rng = _rng(cell, "variant", "family", "scale", "classes", "batch", "imbalance", "profile",
               "ignore_fraction")
    x, hint = inputs.logits(cell["family"], cell["scale"], n, c, dtype, rng)
    prior = inputs.class_prior(c, cell["imbalance"], cell["profile"])
    weight = inputs.class_weights(cell["class_weight"], prior, n)
    opts = {"eps": cell["clip_eps"]}
    target_for_grad = None

    if variant in ("ce_index", "focal_softmax"):
        t = inputs.index_targets(n, c, prior, hint, rng, cell["ignore_fraction"])
        opts.update(weight=weight, ignore_index=-100)
        if variant == "ce_index":
            opts["label_smoothing"] = cell["label_smoothing"]
            exact = oracle.cross_entropy(x, t, weight, -100, cell["label_smoothing"])
            exact_grad = oracle.cross_entropy_grad(x, t, weight, -100, cell["label_smoothing"])
        else:
            opts["gamma"] = cell["gamma"]
            exact = oracle.softmax_focal_loss(x, t, cell["gamma"], weight, -100)
            exact_grad = oracle.softmax_focal_loss_grad(x, t, cell["gamma"], weight, -100)
        target_for_grad = np.where(t == -100, -1, t)
    elif variant in ("ce_prob", "kl"):
        t = inputs.prob_targets(n, c, dtype, rng)
        if variant == "ce_prob":
            opts.update(weight=weight, label_smoothing=cell["label_smoothing"])
            exact = oracle.cross_entropy_probs(x, t, weight, cell["label_smoothing"])
            exact_grad = oracle.cross_entropy_probs_grad(x, t, weight, cell["label_smoothing"])
        else:
            exact = oracle.kl_divergence(x, t)
            exact_grad = oracle.kl_divergence_grad(x, t)
    else:  # element-wise sigmoid losses
        pos_rate = 0.5 * prior / prior.max()
        t = inputs.binary_targets(x.shape, pos_rate[None, :], rng, dtype)
        if (hint >= 0).any():  # dominant family: the large logit is right, then wrong
            rows = np.arange(n)
            t[rows, hint] = (rows < n // 2).astype(dtype)
        if variant == "focal_sigmoid":
            opts.update(gamma=cell["gamma"], alpha=0.25)
            exact = oracle.sigmoid_focal_loss(x, t, 0.25, cell["gamma"])
            exact_grad = oracle.sigmoid_focal_loss_grad(x, t, 0.25, cell["gamma"])
        else:
            exact = oracle.binary_cross_entropy_with_logits(x, t)
            exact_grad = oracle.binary_cross_entropy_with_logits_grad(x, t) if variant == "bce_logits" else None

    arg = x
    if variant == "bce_probs":
        # the probabilities a model would hand over: sigmoid(x) correctly rounded to the dtype
        arg = oracle._sigmoid(oracle._ld(x)).astype(np.float64).astype(dtype)
    try:
        loss, grad = impl.fn(arg, t, **opts)
    except ImportError as exc:
        raise Skip(str(exc)) from None
    out = metrics.forward_metrics(loss, exact, dtype)
    out.update(metrics.gradient_metrics(grad, exact_grad, dtype, target_for_grad))
    if cell["implementation"] == "clipped" and variant in ("ce_index", "bce_logits",
                                                           "bce_probs"):
        ex_nll = exact if variant != "ce_index" or weight is None else \
            oracle.cross_entropy(x, t, None, -100, 0.0)
        out.update(metrics.clipping_metrics(loss, grad, ex_nll, cell["clip_eps"]))
    return out


# --------------------------------------------------------------------------------------------
# Imbalance cells
# --------------------------------------------------------------------------------------------
def _imbalance(cell):
    """A classifier that has learned the prior (logits log prior + noise + a margin of 2 on the
    true class) scored under plain, weighted and focal losses: how much of the loss and of the
    gradient the minority classes get."""
    import cestudy as cs

    n, c = cell["batch"], cell["classes"]
    rng = _rng(cell, "classes", "batch", "imbalance", "profile")
    prior = inputs.class_prior(c, cell["imbalance"], cell["profile"])
    y = rng.choice(c, size=n, p=prior)
    x = np.log(prior)[None, :] + rng.normal(size=(n, c))
    x[np.arange(n), y] += 2.0
    w = inputs.class_weights(cell["class_weight"], prior, n, cell["beta"])
    if cell["variant"] == "ce_index":
        loss, grad = cs.cross_entropy_with_grad(x, y, weight=w, reduction="none")
    else:
        loss, grad = cs.softmax_focal_loss_with_grad(x, y, gamma=cell["gamma"], weight=w,
                                                     reduction="none")
    out = metrics.imbalance_metrics(loss, grad, y, inputs.minority_mask(prior))
    out["accuracy"] = float(np.mean(np.argmax(x, 1) == y))
    return out
