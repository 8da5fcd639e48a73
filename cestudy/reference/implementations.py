"""Every implementation of every variant, as the studies, tests and benchmarks enumerate them.

``for_variant(name)`` lists, for one variant of ``cestudy.variants``, its numpy formulations
(``naive``, ``clipped``, ``lse``, ``accurate``), cestudy's kernels through the public functions
(``numba`` on the CPU, ``cuda``) and the peers (``torch``, ``scipy``). Each is called as
``impl.fn(x, target, **options) -> (loss, grad)``: per-sample loss in the dtype under test and the
gradient of the summed loss (None where the implementation has none); options an implementation
does not take are ignored.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Literal

from .. import backends, variants
from . import formulations, peers

KERNEL_DESCRIPTIONS = {
    "numba": "cestudy's Numba CPU kernels",
    "cuda": "cestudy's numba-cuda kernels",
}
IMPLEMENTATION_NAMES = ("naive", "clipped", "lse", "accurate", "numba", "cuda", *peers.PACKAGES)


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way of computing one variant."""

    name: str
    variant: str
    kind: Literal["formulation", "kernel", "peer"]
    fn: Callable
    description: str

    def availability(self) -> tuple[bool, str]:
        """(available here, the reason and the remedy when not)."""
        if self.kind == "peer":
            return peers.available(self.name)
        if self.name == "cuda":
            ok, why = backends.cuda_status()
            return ok, "" if ok else why
        return True, ""


def _kernel(variant: variants.Variant, backend: str) -> Callable:
    """cestudy's public function for ``variant`` with reduction="none" on ``backend``."""

    def fn(x, target, **options):
        from .. import losses

        kwargs = {k: options[k] for k in variant.option_names if k in options}
        if variant.cuda:  # the functions with a CUDA kernel take backend=
            kwargs["backend"] = backend
        if variant.has_grad:
            f = getattr(losses, variant.function + "_with_grad")
            return f(x, target, reduction="none", **kwargs)
        return getattr(losses, variant.function)(x, target, reduction="none", **kwargs), None

    return fn


@functools.lru_cache(maxsize=None)
def for_variant(name: str) -> dict[str, Implementation]:
    """{implementation name: Implementation} for variant ``name``, in the order of
    ``IMPLEMENTATION_NAMES``."""
    v = variants.get(name)
    impls = {}
    for form in v.formulations:
        factory = getattr(formulations, v.name)
        impls[form] = Implementation(
            form, v.name, "formulation", factory(form), formulations.DESCRIPTIONS[form]
        )
    impls["numba"] = Implementation(
        "numba", v.name, "kernel", _kernel(v, "cpu"), KERNEL_DESCRIPTIONS["numba"]
    )
    if v.cuda:
        impls["cuda"] = Implementation(
            "cuda", v.name, "kernel", _kernel(v, "cuda"), KERNEL_DESCRIPTIONS["cuda"]
        )
    for peer in v.peers:
        impls[peer] = Implementation(
            peer, v.name, "peer", getattr(peers, f"{peer}_{v.name}"), peers.DESCRIPTIONS[peer]
        )
    return impls


def get(variant: str, name: str) -> Implementation:
    """Implementation ``name`` of ``variant``; KeyError listing what is allowed."""
    impls = for_variant(variants.get(variant).name)
    if name not in impls:
        raise KeyError(
            f"variant {variant!r} has no implementation {name!r}; allowed: {', '.join(impls)}"
        )
    return impls[name]
