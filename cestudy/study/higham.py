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

from ..backends import Skip

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "data" / "higham2021"  # package data
PUBLISHED_OVERFLOW = {
    ("float16", "basic"): 475,
    ("float16", "shifted"): 0,
    ("bfloat16", "basic"): 0,
    ("bfloat16", "shifted"): 0,
}


def data_path(path: str = "") -> Path:
    """The data file: in ``path``, else in $CESTUDY_HIGHAM_DATA, else the copy shipped in
    ``cestudy/data/higham2021/`` (BSD-2 licensed, ``license.txt`` beside it)."""
    p = Path(path or os.environ.get("CESTUDY_HIGHAM_DATA", "") or DEFAULT_DATA)
    return p / "data_presoftmax.mat" if p.is_dir() or not p.suffix else p


def load_vectors(path: str = "") -> np.ndarray:
    """The 2500 ten-element pre-softmax vectors, shape (2500, 10), float64."""
    f = data_path(path)
    if not f.exists():
        # the message names no local path: it may end up in a report
        where = (
            "the path given as data = ..."
            if path
            else (
                "$CESTUDY_HIGHAM_DATA"
                if os.environ.get("CESTUDY_HIGHAM_DATA")
                else "cestudy/data/higham2021/ of this installation"
            )
        )
        raise Skip(
            f"the Blanchard-Higham data (data_presoftmax.mat) is not in {where} "
            f"(reinstall cestudy, pip install -e ., or set CESTUDY_HIGHAM_DATA)"
        )
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
