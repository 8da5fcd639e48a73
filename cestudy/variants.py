"""The one registry of loss variants: every other layer enumerates ``VARIANTS``.

This module is declarative and sits at the bottom of the package (it imports nothing from
cestudy): each entry names, as strings, the pieces that the other layers own, and each layer
resolves its own column:

============================  ==================================================================
field                         resolved by
============================  ==================================================================
``function``                  ``cestudy.losses`` (the public function and its ``_with_grad`` twin)
``kernel``                    ``cestudy.kernels.cpu`` / ``cpu_fast`` / ``cuda``:
                              ``<kernel>_fwd`` and ``<kernel>_fwd_grad``
``oracle``                    ``cestudy.reference.oracle``: ``<oracle>`` and ``<oracle>_grad``
``formulations``              ``cestudy.reference.formulations.<name>(form)``
``peers``                     ``cestudy.reference.peers``: ``<peer>_<name>``
============================  ==================================================================

One vocabulary everywhere: a variant's ``name`` is what results, study files, reports and code
call it. It is the public function's name, with ``_probs`` for the probability-target form of
``cross_entropy`` (one function, two target kinds). Names used before the registry existed
(``ce_index``, ``bce_logits``, ...) are migrated on load by :func:`canonical_name`.

Kernel calling convention (shared by the CPU and CUDA kernels, so that dispatch is one function):

    <kernel>_fwd(logits, target, *options, out_loss)
    <kernel>_fwd_grad(logits, target, *options, grad_scale, out_loss, out_grad)

where ``options`` are the variant's ``options`` in the order declared here, each prepared by
``cestudy.dispatch`` (class weights as float64 (C,), element-wise weights as float64 rows, ...).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

TargetKind = Literal["index", "probs", "binary"]
InputKind = Literal["logits", "probs", "log_probs"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Variant:
    """One loss: its public name and everything the other layers need to find for it."""

    name: str
    """The one name of this variant in results, study files, reports and code."""
    function: str = ""
    """The public function in ``cestudy.losses`` (``<function>_with_grad`` is its fused twin);
    defaults to ``name``."""
    target: TargetKind
    """``index``: (N,) class indices; ``probs``: probabilities of the input's shape;
    ``binary``: targets in [0, 1] of the input's shape."""
    description: str
    options: tuple[tuple[str, Any], ...] = ()
    """The keyword options with their defaults, in the kernels' argument order."""
    kernel: str | None = None
    """Stem of the raw kernels (``None``: computed in numpy by the public function)."""
    fast_cpu: bool = False
    """``cestudy.kernels.cpu_fast`` has the vectorised kernel (float32 and float64 inputs)."""
    cuda: bool = True
    """``cestudy.kernels.cuda`` has the kernel."""
    oracle: str = ""
    """Stem of the oracle functions: ``<oracle>(x, t, **options)`` and ``<oracle>_grad``;
    defaults to ``name``."""
    has_grad: bool = True
    """Whether the public API offers the gradient (``<function>_with_grad``)."""
    input: InputKind = "logits"
    """What the first argument holds."""
    elementwise: bool | None = None
    """One loss per input element (any shape) rather than one per row of classes; defaults to
    ``target == "binary"``."""
    reductions: tuple[str, ...] = ("none", "mean", "sum")
    """The ``reduction`` values the public function takes."""
    formulations: tuple[str, ...] = ("naive", "clipped", "lse", "accurate")
    """The numpy baselines of ``cestudy.reference.formulations`` this variant has."""
    peers: tuple[str, ...] = ("torch",)
    """The other libraries' implementations in ``cestudy.reference.peers``."""
    legacy_names: tuple[str, ...] = ()
    """Names this variant had before the registry; results and study files that use them load."""

    def __post_init__(self):
        for field in ("function", "oracle"):
            if not getattr(self, field):
                object.__setattr__(self, field, self.name)
        if self.elementwise is None:
            object.__setattr__(self, "elementwise", self.target == "binary")

    @property
    def defaults(self) -> dict[str, Any]:
        return dict(self.options)

    @functools.cached_property
    def option_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.options)


# One entry per variant, laid out as a table.
# fmt: off
VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant(name="cross_entropy", target="index", kernel="cross_entropy_index", fast_cpu=True,
            description="softmax cross-entropy with class-index targets",
            options=(("weight", None), ("ignore_index", -100), ("label_smoothing", 0.0)),
            peers=("torch", "scipy", "jax", "tensorflow", "sklearn"), legacy_names=("ce_index",)),
    Variant(name="cross_entropy_probs", function="cross_entropy", target="probs",
            kernel="cross_entropy_prob", fast_cpu=True,
            description="softmax cross-entropy with probability targets, H(p, q)",
            options=(("weight", None), ("label_smoothing", 0.0)), legacy_names=("ce_prob",),
            peers=("torch", "jax", "tensorflow")),
    Variant(name="binary_cross_entropy_with_logits", target="binary", kernel="bce_with_logits",
            fast_cpu=True, description="binary cross-entropy with logits",
            options=(("weight", None), ("pos_weight", None)), legacy_names=("bce_logits",),
            peers=("torch", "jax", "tensorflow")),
    Variant(name="binary_cross_entropy", target="binary", input="probs", cuda=False,
            has_grad=False, formulations=("naive", "clipped", "accurate"),
            description="binary cross-entropy on probabilities (sigmoid applied first)",
            options=(("weight", None),), legacy_names=("bce_probs",),
            peers=("torch", "tensorflow", "sklearn")),
    Variant(name="kl_divergence", target="probs", kernel="kl_divergence", fast_cpu=True,
            description="KL(p || softmax(x))", legacy_names=("kl",),
            peers=("torch", "jax", "tensorflow")),
    Variant(name="softmax_focal_loss", target="index", kernel="softmax_focal", fast_cpu=True,
            description="softmax focal loss",
            options=(("weight", None), ("ignore_index", -100), ("gamma", 2.0)),
            legacy_names=("focal_softmax",), peers=("torch", "jax", "tensorflow")),
    Variant(name="sigmoid_focal_loss", target="binary", kernel="sigmoid_focal", fast_cpu=True,
            description="sigmoid focal loss (torchvision)",
            options=(("alpha", 0.25), ("gamma", 2.0)),
            legacy_names=("focal_sigmoid", "sigmoid_focal"), peers=("torch", "jax", "tensorflow")),
    Variant(name="nll_loss", target="index", input="log_probs", kernel="nll", cuda=False,
            formulations=(),
            description="negative log-likelihood of log-probabilities (torch's nll_loss)",
            options=(("weight", None), ("ignore_index", -100))),
    Variant(name="kl_div", target="probs", input="log_probs", elementwise=True,
            kernel="kl_div", cuda=False, formulations=(),
            reductions=("none", "mean", "sum", "batchmean"),
            description="torch's kl_div: pointwise p (log p - input) on log-probabilities",
            options=(("log_target", False),)),
)}
# fmt: on

LEGACY_NAMES: dict[str, str] = {old: v.name for v in VARIANTS.values() for old in v.legacy_names}


def canonical_name(name: str) -> str:
    """The registry name for ``name``, migrating names used before the registry existed."""
    return LEGACY_NAMES.get(name, name)


def get(name: str) -> Variant:
    """The variant called ``name`` (or a legacy name of it); KeyError listing the names."""
    try:
        return VARIANTS[canonical_name(name)]
    except KeyError:
        raise KeyError(f"unknown variant {name!r}; allowed: {', '.join(VARIANTS)}") from None


def for_function(function: str, target: TargetKind) -> Variant:
    """The variant that the public ``function`` computes for targets of kind ``target``."""
    for v in VARIANTS.values():
        if v.function == function and v.target == target:
            return v
    raise KeyError(f"no variant of {function!r} takes {target} targets")
