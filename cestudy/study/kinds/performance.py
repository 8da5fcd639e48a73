"""Performance cells: one implementation of one variant timed at one shape, by
``cestudy.bench.cpu.performance_cell`` (the same machinery as ``python -m cestudy bench``):
cestudy's kernels interleaved with torch in the same cell, every other implementation alone."""

from __future__ import annotations

from ... import variants
from ...bench import cpu as bench_cpu
from ...reference import implementations, peers
from ..keys import SEED, choice, integer

NAME = "performance"
MODES = ("forward", "forward_grad")
# the variants the CPU benchmark times: every variant of logits with a gradient
VARIANTS = bench_cpu.VARIANTS
KEYS = {
    "variant": choice("cross_entropy", VARIANTS, migrate=variants.canonical_name),
    "implementation": choice("numba", implementations.IMPLEMENTATION_NAMES),
    "dtype": choice("float32", ("float32", "float64")),
    "mode": choice("forward", MODES),
    "batch": integer(256),
    "classes": integer(1000, 2),
    "repeats": integer(5),
    **SEED,
}
SEED_FIELDS = ("variant", "batch", "classes")  # bench.cpu.make_inputs seeds with these


def normalise(cell: dict) -> dict | None:
    cell["variant"] = variants.canonical_name(cell["variant"])
    impl = implementations.for_variant(cell["variant"]).get(cell["implementation"])
    if impl is None:
        return None
    if cell["mode"] == "forward_grad" and impl.name in peers.WITHOUT_GRADIENT:
        return None  # e.g. scikit-learn's log_loss: no gradient to time
    return cell


def estimate_seconds(cell: dict) -> float:
    # a cell paired with torch times torch as well
    timed = 2 if cell["implementation"] in bench_cpu.PAIRED_WITH_TORCH else 1
    return 0.3 + 2.5e-9 * cell["batch"] * cell["classes"] * (cell["repeats"] + 3) * 3 * timed


def compute(cell: dict) -> dict:
    return bench_cpu.performance_cell(cell)
