"""The machine's memory ceiling, measured in the same run as the kernels it judges.

Two numbers, for the kernels' own dtype, over buffers several times the last-level cache:

- ``read``: a parallel loop over rows whose inner sum is vectorised with several
  partial sums (the ``reassoc`` flag lets LLVM keep one accumulator per SIMD lane and unroll), so
  that it is bound by memory, not by the latency of one dependent add chain (which on a 2-core
  Zen 4 gave 19 GB/s where this read gives 32-34 GB/s);
- ``read_write``: the same loop writing each element, scaled, to a second buffer, counted
  as the bytes read plus the bytes written (what a fused kernel that writes its gradient moves).

Forward kernels are judged against the first, fused forward+gradient kernels against the second.
Both are the median of ``REPEATS`` timed passes after one untimed pass, as the kernels' times
are medians, measured once per process, dtype and size; every pass's rate is kept
(:func:`samples`), and how they were measured (:func:`description`), for the run's manifest;
:func:`measured` gives a timed row its ceiling with the buffer and passes it came from.

The buffer holds increasing values (``arange``), no two pages alike. The best of five passes
over a buffer of ones once gave 68 GB/s for float32 (and 61 read+write) on a 2-core AMD EPYC
Zen 4 whose float64 read in the same second gave 37.6, and float32 reads since 33-38: a ceiling
twice too high halves every fraction judged against it. Whatever made those passes fast (pages
of identical content, or a pass that caught a burst), a median of passes over distinct data
does not take one fast pass for the machine's ceiling.
"""

from __future__ import annotations

import functools
import os
import time

import numpy as np
from numba import njit, prange

_ROWS = 4096
REPEATS = 7  # timed passes per ceiling; the ceiling is their median
# every measurement by (kind, dtype name, requested bytes): its passes' rates in GB/s (the median
# is the ceiling) and the buffer's size
_SAMPLES: dict[tuple[str, str, int], dict] = {}
# which ceiling a kernel of each mode is judged against, and how the reports name it
_KIND_OF_MODE = {"forward": "read", "forward_grad": "read_write"}
LABELS = {"read": "read", "read_write": "read+write"}


@njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc"})
def _read(a, partial):
    for r in prange(a.shape[0]):
        s = a[r, 0] * 0
        for j in range(a.shape[1]):
            s += a[r, j]
        partial[r] = s


@njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc"})
def _read_write(a, b):
    for r in prange(a.shape[0]):
        for j in range(a.shape[1]):
            b[r, j] = a[r, j] * 2


@functools.cache
def last_level_cache_bytes() -> int:
    """The size of the last-level cache from sysfs (32 MiB when it cannot be read); read once
    per process."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in os.listdir(base):
            with open(os.path.join(base, index, "size")) as f:
                text = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
            best = max(best, int(text.rstrip("KM")) * mult)
    except (OSError, ValueError):
        pass
    return best or 32 << 20


LLC_FACTOR = 8
MIN_BUFFER_BYTES = 256 << 20
MAX_BUFFER_BYTES = 1 << 30


def buffer_bytes() -> int:
    """:data:`LLC_FACTOR` times the last-level cache, at least :data:`MIN_BUFFER_BYTES`, at
    most :data:`MAX_BUFFER_BYTES`."""
    return int(min(max(LLC_FACTOR * last_level_cache_bytes(), MIN_BUFFER_BYTES), MAX_BUFFER_BYTES))


def _buffer(dtype, nbytes):
    """A (4096, cols) buffer of ``nbytes`` or less holding increasing values (``arange``; float32
    repeats neighbours past 2^24, but no two pages are alike)."""
    dt = np.dtype(dtype)
    cols = max(1, nbytes // dt.itemsize // _ROWS)
    return np.arange(_ROWS * cols, dtype=dt).reshape(_ROWS, cols)


def _read_pass(a):
    """One read pass over ``a``, and the bytes it moves."""
    partial = np.empty(a.shape[0], dtype=a.dtype)
    return (lambda: _read(a, partial)), a.nbytes


def _read_write_pass(a):
    """One read + write pass from ``a`` to a second buffer, and the bytes it moves (both)."""
    b = np.empty_like(a)
    return (lambda: _read_write(a, b)), 2 * a.nbytes


_PASSES = {"read": _read_pass, "read_write": _read_write_pass}


def measurement(kind_: str, dtype, nbytes: int | None = None, repeats: int = REPEATS) -> dict:
    """The ``kind_`` ("read" or "read_write") ceiling over ``dtype`` data in a buffer of
    ``nbytes`` (:func:`buffer_bytes` when None): ``repeats`` timed passes after one untimed pass
    (compilation, and the pages faulted in). Kept in ``_SAMPLES``, which serves later calls for
    the same kind, dtype and size as measured (the buffer is built only for the first):
    ``{"rates": GB/s per pass, "buffer_bytes": the buffer's size}``."""
    if kind_ not in _PASSES:
        raise ValueError(f"kind: expected one of {sorted(_PASSES)}, got {kind_!r}")
    nbytes = buffer_bytes() if nbytes is None else nbytes
    key = (kind_, np.dtype(dtype).name, nbytes)
    if key not in _SAMPLES:
        a = _buffer(dtype, nbytes)
        fn, moved = _PASSES[kind_](a)
        fn()
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            rates.append(moved / (time.perf_counter() - t0) / 1e9)
        _SAMPLES[key] = {"rates": rates, "buffer_bytes": a.nbytes}
    return _SAMPLES[key]


def bandwidth(
    kind_: str, dtype="float32", nbytes: int | None = None, repeats: int = REPEATS
) -> float:
    """The median of :func:`measurement`'s passes in GB/s (1e9 bytes/s): "read", a vectorised
    parallel read, or "read_write", bytes read plus bytes written."""
    return float(np.median(measurement(kind_, dtype, nbytes, repeats)["rates"]))


def kind(mode: str) -> str:
    """Which ceiling a kernel of ``mode`` is judged against: "read" for "forward" (it only reads
    the logits), "read_write" for "forward_grad" (it also writes the gradient)."""
    try:
        return _KIND_OF_MODE[mode]
    except KeyError:
        raise ValueError(f"mode: expected one of {sorted(_KIND_OF_MODE)}, got {mode!r}") from None


def measured(mode: str, dtype) -> dict:
    """The ceiling a kernel of ``mode`` is judged against (:func:`kind`), as it was measured:
    ``kind``, ``gbs`` (the median in GB/s), ``buffer_bytes`` (the buffer it was measured over),
    ``passes`` (how many timed passes the median is of; a measurement already made in this
    process is reused as it was) and ``last_level_cache_bytes`` (what the buffer was sized
    from)."""
    k = kind(mode)
    m = measurement(k, dtype)
    return {
        "kind": k,
        "gbs": float(np.median(m["rates"])),
        "buffer_bytes": int(m["buffer_bytes"]),
        "passes": len(m["rates"]),
        "last_level_cache_bytes": last_level_cache_bytes(),
    }


def ceiling(mode: str, dtype) -> float:
    """The ceiling a kernel of ``mode`` is judged against (:func:`kind`), in GB/s."""
    return measured(mode, dtype)["gbs"]


def label(mode: str) -> str:
    """How the reports name the ceiling of ``mode``: "read" or "read+write"."""
    return LABELS[kind(mode)]


def description() -> dict:
    """How the ceilings are measured, for a run's manifest: the buffer's size, the last-level
    cache (of cpu0) it is sized from, and the number of timed passes."""
    return {
        "buffer_bytes": buffer_bytes(),
        "last_level_cache_bytes": last_level_cache_bytes(),
        "repeats": REPEATS,
    }


def samples() -> dict[str, list[float]]:
    """Every pass's rate in GB/s of the ceilings measured in this process, by
    ``"read float32 256 MiB"``-style names (the manifest records them beside the medians)."""
    return {
        f"{k} {dtype} {m['buffer_bytes'] / (1 << 20):g} MiB": [round(v, 3) for v in m["rates"]]
        for (k, dtype, _), m in _SAMPLES.items()
    }
