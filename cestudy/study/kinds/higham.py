"""Higham cells: the basic or shifted log-sum-exp of Blanchard, Higham & Higham 2021 on their 2500
MNIST vectors in simulated float16 or bfloat16 (the algorithms: ``cestudy.study.higham``)."""

from __future__ import annotations

import numpy as np

from ... import dtypes
from ...reference import oracle
from .. import higham
from ..keys import SEED, Key, choice

NAME = "higham"
FORMULATIONS = ("basic", "shifted")
KEYS = {
    "dtype": choice("float16", ("float16", "bfloat16")),
    "formulation": choice("basic", FORMULATIONS),
    "data": Key(str, "", None),
    **SEED,
}
SEED_FIELDS = ()  # no random input: the published vectors


def normalise(cell: dict) -> dict | None:
    return cell


def estimate_seconds(cell: dict) -> float:
    return 0.5


def compute(cell: dict) -> dict:
    data = higham.load_vectors(cell.get("data", ""))  # Skip when the data is not there
    dtype = dtypes.dtype_from_name(cell["dtype"])
    x = data.astype(dtype)
    fn = higham.lse_basic if cell["formulation"] == "basic" else higham.lse_shifted
    y = fn(x).astype(np.float64)
    exact = oracle.logsumexp(x.astype(np.float64)).astype(np.float64)
    u = dtypes.unit_roundoff(dtype)
    overflow = np.isinf(y)
    ok = np.isfinite(y)
    rel = np.abs(y[ok] - exact[ok]) / np.abs(exact[ok]) / u
    bound = higham.error_bounds(x.astype(np.float64), exact, cell["formulation"])[ok]
    return {
        "n_vectors": int(len(y)),
        "overflow": int(overflow.sum()),
        "published_overflow": higham.PUBLISHED_OVERFLOW.get((cell["dtype"], cell["formulation"])),
        "err_over_u_median": float(np.median(rel)) if rel.size else None,
        "err_over_u_p99": float(np.quantile(rel, 0.99)) if rel.size else None,
        "err_over_u_max": float(rel.max()) if rel.size else None,
        "bound_median": float(np.median(bound)) if bound.size else None,
        "frac_within_bound": float(np.mean(rel <= bound)) if rel.size else None,
        # the error/u distribution, kept in full for the report's figure (2500 numbers)
        "err_over_u_hist": np.histogram(
            np.log10(np.maximum(rel, 1e-6)), bins=np.linspace(-6, 3, 37)
        )[0].tolist(),
    }
