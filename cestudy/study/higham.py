"""Reproduction of Blanchard, Higham & Higham 2021 on their MNIST pre-softmax data.

P. Blanchard, D. J. Higham, N. J. Higham, "Accurately computing the log-sum-exp and softmax
functions", IMA J. Numer. Anal. 41(4), 2021. Their script rounds each 10-vector to the low
precision, evaluates in simulated fp16 (or bf16) with every operation rounded, and measures the
error against the single-precision evaluation of the rounded vector. Here every operation is a
numpy float16 / ml_dtypes bfloat16 operation (each rounded to the format), the sum is sequential
as in their loop, and the reference is the extended-precision oracle on the rounded vector.

Published counts (the paper and the data's README): fp16 basic log-sum-exp overflows on 475 of
2500 vectors, the shifted form on none; bf16: neither overflows.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .. import dtypes
from ..reference import oracle

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "higham2021"
PUBLISHED_OVERFLOW = {("float16", "basic"): 475, ("float16", "shifted"): 0,
                      ("bfloat16", "basic"): 0, ("bfloat16", "shifted"): 0}


class DataMissing(Exception):
    pass


def data_path(path: str = "") -> Path:
    """The data folder: ``path``, else $CESTUDY_HIGHAM_DATA, else ../shared/data/higham2021."""
    p = Path(path or os.environ.get("CESTUDY_HIGHAM_DATA", "") or DEFAULT_DATA)
    return p / "data_presoftmax.mat" if p.is_dir() or not p.suffix else p


def load_vectors(path: str = "") -> np.ndarray:
    """The 2500 ten-element pre-softmax vectors, shape (2500, 10), float64."""
    f = data_path(path)
    if not f.exists():
        raise DataMissing(f"Blanchard-Higham data not found at {f} (pass data = PATH in the "
                          f"study or set CESTUDY_HIGHAM_DATA)")
    import warnings

    from scipy.io import loadmat

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a harmless MatReadWarning about a duplicate name
        mat = loadmat(str(f))
    return np.asarray(mat["softmat"], dtype=np.float64).T


def lse_basic(x):
    """y = log(sum_i exp(x_i)), sequential sum, every operation rounded to x's dtype."""
    with np.errstate(over="ignore", invalid="ignore"):
        s = np.zeros(x.shape[0], dtype=x.dtype)
        for i in range(x.shape[1]):
            s = s + np.exp(x[:, i])
        return np.log(s)


def lse_shifted(x):
    """y = a + log1p(sum_{i != k} exp(x_i - a)), a = max x: the paper's Algorithm 2."""
    with np.errstate(over="ignore", invalid="ignore"):
        n = x.shape[0]
        k = np.argmax(x, axis=1)
        a = x[np.arange(n), k]
        s = np.zeros(n, dtype=x.dtype)
        for i in range(x.shape[1]):
            term = np.exp(x[:, i] - a)
            s = s + np.where(k == i, np.zeros_like(term), term)
        return a + np.log1p(s)


def error_bounds(x, y, formulation):
    """The paper's leading-order bounds on |error| / (u |y|):
    basic 1 + (n + 1) / |y|, shifted |y + n - min x| / |y|."""
    n = x.shape[1]
    ay = np.abs(y)
    if formulation == "basic":
        return 1 + (n + 1) / ay
    return np.abs(y + n - x.min(axis=1)) / ay


def compute(cell):
    from .compute import Skip

    try:
        data = load_vectors(cell.get("data", ""))
    except DataMissing as exc:
        raise Skip(str(exc)) from None
    dtype = dtypes.dtype_from_name(cell["dtype"])
    x = data.astype(dtype)
    fn = lse_basic if cell["formulation"] == "basic" else lse_shifted
    y = fn(x).astype(np.float64)
    exact = oracle.logsumexp(x.astype(np.float64)).astype(np.float64)
    u = dtypes.unit_roundoff(dtype)
    overflow = np.isinf(y)
    ok = np.isfinite(y)
    rel = np.abs(y[ok] - exact[ok]) / np.abs(exact[ok]) / u
    bound = error_bounds(x.astype(np.float64), exact, cell["formulation"])[ok]
    return {
        "n_vectors": int(len(y)),
        "overflow": int(overflow.sum()),
        "published_overflow": PUBLISHED_OVERFLOW.get((cell["dtype"], cell["formulation"])),
        "err_over_u_median": float(np.median(rel)) if rel.size else None,
        "err_over_u_p99": float(np.quantile(rel, 0.99)) if rel.size else None,
        "err_over_u_max": float(rel.max()) if rel.size else None,
        "bound_median": float(np.median(bound)) if bound.size else None,
        "frac_within_bound": float(np.mean(rel <= bound)) if rel.size else None,
        # the error/u distribution, kept in full for the report's figure (2500 numbers)
        "err_over_u_hist": np.histogram(np.log10(np.maximum(rel, 1e-6)),
                                        bins=np.linspace(-6, 3, 37))[0].tolist(),
    }
