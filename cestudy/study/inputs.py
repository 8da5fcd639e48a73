"""Input generators for study cells: logits families, class priors and targets.

Everything is deterministic in the cell's seed. Logits are generated in float64 and rounded to the
cell's dtype; the rounded values are the inputs that both the implementation and the oracle see.

Families (``scale`` means what the family says):
- ``gaussian``: x ~ N(0, scale^2); scale sweeps 1e-2 .. 1e4.
- ``equal_offset``: every logit equals ``scale`` (the offset); the exact loss is log C.
- ``dominant``: N(0, 1) noise plus a margin of ``scale`` on one class; the target is that class
  for the first half of the rows (confident-correct) and another class for the rest
  (confident-wrong).
- ``masked``: gaussian at ``scale`` with half of the non-target classes set to -inf.
- ``near_overflow``: logits just below log(finfo(dtype).max), where exp overflows.
- ``nan_inf``: gaussian at scale 1 with NaN, +inf and -inf injected into 5% of the rows each.

Class priors for imbalance follow Cui et al. 2019 ("Class-balanced loss based on effective
number of samples"): ``step`` (half the classes have 1/rho of the others' frequency) and ``exp``
(n_c = n_max rho^(-c / (C - 1))).
"""

from __future__ import annotations

import zlib

import numpy as np

from .. import dtypes, variants


def rng(cell: dict, fields) -> np.random.Generator:
    """Generator seeded by the cell's ``seed`` and the ``fields`` that shape its data (each kind
    declares them: never the implementation or the dtype, so that every implementation and dtype
    sees the same float64 draw)."""
    key = "|".join(_seed_text(f, cell.get(f)) for f in fields)
    return np.random.default_rng([int(cell.get("seed", 0)), zlib.crc32(key.encode())])


def _seed_text(field, value) -> str:
    # A variant seeds its inputs with the first name it had (ce_index, bce_logits, ...): the
    # rename to the registry's names kept every input, so results stay comparable across it.
    if field == "variant" and value is not None:
        v = variants.get(value)
        return v.legacy_names[0] if v.legacy_names else v.name
    return str(value)


def class_prior(classes: int, imbalance: float, profile: str) -> np.ndarray:
    """Class frequencies (sum 1), majority classes first."""
    c = np.arange(classes)
    if imbalance == 1:
        counts = np.ones(classes)
    elif profile == "step":
        counts = np.where(c < (classes + 1) // 2, 1.0, 1.0 / imbalance)
    elif profile == "exp":
        counts = imbalance ** (-c / max(classes - 1, 1))
    else:
        raise ValueError(f"profile must be 'step' or 'exp'; got {profile!r}")
    return counts / counts.sum()


def minority_mask(prior: np.ndarray) -> np.ndarray:
    """The minority classes: the rarer half (by prior; ties broken by index)."""
    order = np.argsort(-prior, kind="stable")
    mask = np.zeros(prior.shape, bool)
    mask[order[(len(prior) + 1) // 2 :]] = True
    return mask


def class_weights(kind: str, prior: np.ndarray, n_samples: int, beta: float = 0.999):
    """Per-class weights normalised to mean 1: none, inverse frequency, or effective number
    (1 - beta) / (1 - beta^n_c) of Cui et al. 2019."""
    if kind == "none":
        return None
    counts = np.maximum(prior * n_samples, 1.0)
    if kind == "inverse":
        w = 1.0 / counts
    elif kind == "effective":
        w = (1.0 - beta) / (1.0 - beta**counts)
    else:
        raise ValueError(f"class_weight must be none, inverse or effective; got {kind!r}")
    return w * (len(w) / w.sum())


def logits(family: str, scale: float, n: int, c: int, dtype, rng) -> tuple[np.ndarray, np.ndarray]:
    """(logits in dtype (n, c), the dominant/target hint per row or -1)."""
    dtype = np.dtype(dtype)
    hint = np.full(n, -1)
    if family == "gaussian":
        x = rng.normal(size=(n, c)) * scale
    elif family == "equal_offset":
        x = np.full((n, c), float(scale))
    elif family == "dominant":
        x = rng.normal(size=(n, c))
        k = rng.integers(0, c, n)
        x[np.arange(n), k] += scale
        hint = k
    elif family == "masked":
        x = rng.normal(size=(n, c)) * scale
        hint = rng.integers(0, c, n)
        mask = rng.uniform(size=(n, c)) < 0.5
        mask[np.arange(n), hint] = False
        x[mask] = -np.inf
    elif family == "near_overflow":
        top = float(np.log(np.float64(dtypes.finfo(dtype).max)))
        x = top - np.abs(rng.normal(size=(n, c))) * 0.01 * top
    elif family == "nan_inf":
        x = rng.normal(size=(n, c))
        rows = rng.permutation(n)
        k = max(1, n // 20)
        cols = rng.integers(0, c, n)
        x[rows[:k], cols[rows[:k]]] = np.nan
        x[rows[k : 2 * k], cols[rows[k : 2 * k]]] = np.inf
        x[rows[2 * k : 3 * k], cols[rows[2 * k : 3 * k]]] = -np.inf
    else:
        raise ValueError(f"unknown family {family!r}")
    with np.errstate(over="ignore"):
        return x.astype(dtype), hint


def index_targets(n, c, prior, hint, rng, ignore_fraction=0.0, ignore_index=-100):
    """Labels drawn from the prior; rows with a hint take it for the first half (confident-
    correct) and another class for the second half (confident-wrong)."""
    y = rng.choice(c, size=n, p=prior)
    has = hint >= 0
    if has.any():
        half = np.arange(n) < n // 2
        wrong = (hint + 1 + rng.integers(0, max(c - 1, 1), n)) % c
        y = np.where(has & half, hint, np.where(has, wrong, y))
    if ignore_fraction > 0:
        y = np.where(rng.uniform(size=n) < ignore_fraction, ignore_index, y)
    return y.astype(np.int64)


def prob_targets(n, c, dtype, rng, concentration=0.5):
    """Soft targets from a Dirichlet(concentration) distribution, rounded to dtype."""
    p = rng.dirichlet(np.full(c, concentration), n)
    return p.astype(np.dtype(dtype))


def binary_targets(shape, prior_pos, rng, dtype):
    """Hard 0/1 targets with per-column positive rates ``prior_pos`` (broadcast to shape)."""
    return (rng.uniform(size=shape) < prior_pos).astype(np.dtype(dtype))
