"""Accuracy cells: one implementation of one variant on one family of logits, scored in ulps
against the extended-precision oracle.

Every variant of ``cestudy.variants.VARIANTS`` and every implementation of
``cestudy.reference.implementations`` can be a cell; nothing here names a variant. What a cell
does follows the registry entry:

- ``target`` picks the targets: class indices drawn from the class prior (``index``),
  Dirichlet soft targets (``probs``) or 0/1 element-wise targets (``binary``);
- ``input`` picks what the implementation is handed: the logits themselves, their probabilities
  (``probs``: sigmoid(x) correctly rounded to the dtype, scored against the exact loss of the
  logits under the variant's ``<function>_with_logits`` twin, as a model that hands over
  probabilities would be judged) or their log-probabilities (``log_probs``: log_softmax(x)
  rounded to the dtype, scored exactly on what was handed over);
- ``option_names`` says which of the study's option keys apply: a key whose option the variant
  does not take is reset to its default (and the duplicate cells dropped).
"""

from __future__ import annotations

import numpy as np

from ... import dtypes, variants
from ...backends import Skip
from ...reference import implementations, oracle, peers
from .. import inputs, metrics
from ..keys import SEED, choice, integer, number

NAME = "accuracy"
FAMILIES = ("gaussian", "equal_offset", "dominant", "masked", "near_overflow", "nan_inf")
PROFILES = ("step", "exp")
CLASS_WEIGHTS = ("none", "inverse", "effective")
IGNORE_INDEX = -100

KEYS = {
    "variant": choice("cross_entropy", variants.VARIANTS, migrate=variants.canonical_name),
    "implementation": choice("numba", implementations.IMPLEMENTATION_NAMES),
    "dtype": choice("float32", dtypes.DTYPE_NAMES),
    "family": choice("gaussian", FAMILIES),
    "scale": number(1.0, 0.0),
    "classes": integer(10, 2),
    "batch": integer(64),
    "label_smoothing": number(0.0, 0.0),
    "class_weight": choice("none", CLASS_WEIGHTS),
    "clip_eps": number(1e-7, 0.0),
    "gamma": number(2.0, 0.0),
    "imbalance": number(1.0, 1.0),
    "profile": choice("step", PROFILES),
    "ignore_fraction": number(0.0, 0.0),
    **SEED,
}
SEED_FIELDS = (
    "variant",
    "family",
    "scale",
    "classes",
    "batch",
    "imbalance",
    "profile",
    "ignore_fraction",
)

# study keys that set a variant's option, and the option they set
OPTION_KEYS = {
    "label_smoothing": "label_smoothing",
    "gamma": "gamma",
    "class_weight": "weight",
    "ignore_fraction": "ignore_index",
}


def _takes(v: variants.Variant, key: str) -> bool:
    """Whether variant ``v`` uses study key ``key``."""
    if key in OPTION_KEYS:
        if OPTION_KEYS[key] not in v.option_names:
            return False
        # element-wise losses weight elements, not classes: class weights are for row losses
        return not (key == "class_weight" and v.elementwise)
    if key in ("imbalance", "profile"):  # they shape targets drawn from the class prior
        return v.target != "probs"
    return True


def normalise(cell: dict) -> dict | None:
    """None where the registry has no such implementation; options the variant does not take
    reset to their default; the scale of families that ignore it reset."""
    v = variants.get(cell["variant"])
    cell["variant"] = v.name
    if cell["implementation"] not in implementations.for_variant(v.name):
        return None
    if cell["implementation"] in peers.PACKAGES and _peer_cannot(v, cell):
        return None  # a permanent limitation of the library, not something missing here
    for key in (*OPTION_KEYS, "imbalance", "profile"):
        if not _takes(v, key):
            cell[key] = KEYS[key].default
    if cell["implementation"] != "clipped":
        cell["clip_eps"] = KEYS["clip_eps"].default
    if cell["family"] in ("near_overflow", "nan_inf"):
        cell["scale"] = 1.0
    return cell


def _peer_cannot(v, cell) -> bool:
    """Whether the peer lacks an option this cell sets (e.g. optax has no class weights)."""
    options = {}
    if _takes(v, "class_weight") and cell["class_weight"] != "none":
        options["weight"] = cell["class_weight"]
    if _takes(v, "label_smoothing"):
        options["label_smoothing"] = cell["label_smoothing"]
    return bool(peers.limitation(cell["implementation"], v.name, **options))


def estimate_seconds(cell: dict) -> float:
    heavy = cell["implementation"] in ("naive", "clipped", "lse", "accurate")
    return 0.004 + 2.5e-7 * cell["batch"] * cell["classes"] * (4 if heavy else 2)


def _targets(v, cell, x, hint, prior, dtype, rng):
    n, c = x.shape
    if v.target == "index":
        return inputs.index_targets(n, c, prior, hint, rng, cell["ignore_fraction"], IGNORE_INDEX)
    if v.target == "probs":
        return inputs.prob_targets(n, c, dtype, rng)
    pos_rate = 0.5 * prior / prior.max()
    t = inputs.binary_targets(x.shape, pos_rate[None, :], rng, dtype)
    if (hint >= 0).any():  # dominant family: the large logit is right, then wrong
        rows = np.arange(n)
        t[rows, hint] = (rows < n // 2).astype(dtype)
    return t


def _argument(v, x, dtype):
    """(what the implementation is handed, the variant and input its exact loss is taken of)."""
    if v.input == "logits":
        return x, v.name, x
    if v.input == "probs":
        if v.target != "binary":
            raise ValueError(f"{v.name}: probability inputs are defined for binary targets only")
        # the probabilities a model would hand over: sigmoid(x) correctly rounded to the dtype,
        # judged by the exact loss of the logits themselves
        twin = variants.for_function(v.function + "_with_logits", v.target)
        return oracle._sigmoid(oracle._ld(x)).astype(np.float64).astype(dtype), twin.name, x
    if v.input == "log_probs":
        with np.errstate(invalid="ignore"):
            lp = oracle.log_softmax(x.astype(np.float64)).astype(np.float64).astype(dtype)
        return lp, v.name, lp
    raise ValueError(f"{v.name}: unknown input kind {v.input!r}")


def compute(cell: dict) -> dict:
    v = variants.get(cell["variant"])
    impl = implementations.get(v.name, cell["implementation"])
    ok, why = impl.availability()
    if not ok:
        raise Skip(why)
    dtype = dtypes.dtype_from_name(cell["dtype"])
    n, c = cell["batch"], cell["classes"]
    rng = inputs.rng(cell, SEED_FIELDS)
    x, hint = inputs.logits(cell["family"], cell["scale"], n, c, dtype, rng)
    prior = inputs.class_prior(c, cell["imbalance"], cell["profile"])
    t = _targets(v, cell, x, hint, prior, dtype, rng)

    options = v.defaults
    if _takes(v, "class_weight"):
        options["weight"] = inputs.class_weights(cell["class_weight"], prior, n)
    for key in ("label_smoothing", "gamma"):
        if _takes(v, key):
            options[key] = cell[key]
    arg, ref, ref_input = _argument(v, x, dtype)
    exact = oracle.loss(ref, ref_input, t, **options)
    exact_grad = oracle.grad(ref, ref_input, t, **options) if v.has_grad else None

    try:
        loss, grad = impl.fn(arg, t, eps=cell["clip_eps"], **options)
    except ImportError as exc:
        raise Skip(str(exc)) from None
    out = metrics.forward_metrics(loss, exact, dtype)
    if exact_grad is not None:
        target_for_grad = np.where(t == IGNORE_INDEX, -1, t) if v.target == "index" else None
        out.update(metrics.gradient_metrics(grad, exact_grad, dtype, target_for_grad))
    # the bias of clipping, where the loss is a plain negative log-likelihood of hard targets
    if cell["implementation"] == "clipped" and v.target != "probs" and "gamma" not in options:
        plain = all(
            options[k] is None or options[k] == d
            for k, d in v.options
            if k in ("weight", "label_smoothing")
        )
        ex_nll = exact if plain else oracle.loss(ref, ref_input, t)
        out.update(metrics.clipping_metrics(loss, grad, ex_nll, cell["clip_eps"]))
    return out
