"""Imbalance cells: how much of the loss and of the gradient the minority classes get.

A classifier that has learned the prior (logits log prior + N(0, 1) noise + a margin of 2 on the
true class) is scored under a plain, class-weighted or focal loss: every row-loss variant of the
registry with class-index targets and a fused gradient can be the loss.

Every class, the rarest included, has at least one sample in the batch: where the draw from the
prior gives a class none, one row of the most frequent class is relabelled to it (no further
random draw, so cells whose draw covered every class are unchanged) and the cell says how many
rows were relabelled (``forced_samples``). Without that, a 10^4 imbalance with a batch of 4096
draws no minority sample and every minority share reads 0.
"""

from __future__ import annotations

import numpy as np

from ... import variants
from .. import inputs, metrics
from ..keys import SEED, choice, integer, number
from .accuracy import CLASS_WEIGHTS, PROFILES

NAME = "imbalance"
VARIANTS = tuple(
    name
    for name, v in variants.VARIANTS.items()
    if v.target == "index" and v.input == "logits" and v.has_grad and not v.elementwise
)
KEYS = {
    "variant": choice("cross_entropy", VARIANTS, migrate=variants.canonical_name),
    "class_weight": choice("none", CLASS_WEIGHTS),
    "classes": integer(10, 2),
    "imbalance": number(1.0, 1.0),
    "profile": choice("step", PROFILES),
    "gamma": number(2.0, 0.0),
    "beta": number(0.999, 0.0),
    "batch": integer(4096),
    **SEED,
}
SEED_FIELDS = ("classes", "batch", "imbalance", "profile")


def normalise(cell: dict) -> dict | None:
    cell["variant"] = variants.canonical_name(cell["variant"])
    if cell["imbalance"] == 1.0:
        cell["profile"] = "step"  # with no imbalance the profiles coincide
    if cell["batch"] < 2 * cell["classes"]:
        return None  # too few rows to give every class a sample
    return cell


def estimate_seconds(cell: dict) -> float:
    return 0.01 + 2e-7 * cell["batch"] * cell["classes"]


def every_class_sampled(y: np.ndarray, classes: int) -> tuple[np.ndarray, int]:
    """``y`` with one row of the most frequent class relabelled to each class that has none
    (the last such rows, deterministically), and the number of rows relabelled."""
    counts = np.bincount(y, minlength=classes)
    missing = np.flatnonzero(counts == 0)
    if missing.size == 0:
        return y, 0
    y = y.copy()
    donors = np.flatnonzero(y == np.argmax(counts))[::-1][: missing.size]
    y[donors] = missing
    return y, int(missing.size)


def compute(cell: dict) -> dict:
    from ... import losses

    v = variants.get(cell["variant"])
    n, c = cell["batch"], cell["classes"]
    rng = inputs.rng(cell, SEED_FIELDS)
    prior = inputs.class_prior(c, cell["imbalance"], cell["profile"])
    y, forced = every_class_sampled(rng.choice(c, size=n, p=prior), c)
    x = np.log(prior)[None, :] + rng.normal(size=(n, c))
    x[np.arange(n), y] += 2.0
    options = {"weight": inputs.class_weights(cell["class_weight"], prior, n, cell["beta"])}
    if "gamma" in v.option_names:
        options["gamma"] = cell["gamma"]
    fn = getattr(losses, v.function + "_with_grad")
    loss, grad = fn(x, y, reduction="none", **options)
    out = metrics.imbalance_metrics(loss, grad, y, inputs.minority_mask(prior))
    out["accuracy"] = float(np.mean(np.argmax(x, 1) == y))
    out["forced_samples"] = forced
    return out
