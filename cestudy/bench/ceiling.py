"""The machine's memory ceiling, measured in the same run as the kernels it judges.

Two numbers, for the kernels' own dtype, over buffers several times the last-level cache:

- ``read_bandwidth``: a parallel loop over rows whose inner sum is vectorised with several
  partial sums (the ``reassoc`` flag lets LLVM keep one accumulator per SIMD lane and unroll), so
  that it is bound by memory, not by the latency of one dependent add chain (which on a 2-core
  Zen 4 gave 19 GB/s where this read gives 32-34 GB/s);
- ``read_write_bandwidth``: the same loop writing each element, scaled, to a second buffer, counted
  as the bytes read plus the bytes written (what a fused kernel that writes its gradient moves).

Forward kernels are judged against the first, fused forward+gradient kernels against the second.
Both are the median of ``REPEATS`` timed passes after one untimed pass, as the kernels' times
are medians, measured once per process, dtype and size; every pass's rate is kept
(:func:`samples`), and how they were measured (:func:`description`), for the run's manifest.

The buffer holds distinct values (``arange``), no two pages alike. The best of five passes over
a buffer of ones once gave 68 GB/s for float32 (and 61 read+write) on a 2-core AMD EPYC Zen 4
whose float64 read in the same second, and every float32 read since, gave 37-38: a ceiling
twice too high halves every fraction judged against it. Whatever made those passes fast (pages
of identical content, or a pass that caught a burst), a median of passes over distinct data
does not take one fast pass for the machine's ceiling.
"""

from __future__ import annotations

import os
import time

import numpy as np
from numba import njit, prange

_ROWS = 4096
REPEATS = 7  # timed passes per ceiling; the ceiling is their median
# every pass's rate in GB/s by (kind, dtype name, buffer bytes); the medians are the ceilings
_SAMPLES: dict[tuple[str, str, int], list[float]] = {}
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


def last_level_cache_bytes() -> int:
    """The size of the last-level cache from sysfs (32 MiB when it cannot be read)."""
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


def buffer_bytes() -> int:
    """Eight times the last-level cache, at least 256 MiB, at most 1 GiB."""
    return int(min(max(8 * last_level_cache_bytes(), 256 << 20), 1 << 30))


def _median_rate(key, make, repeats):
    """The median rate in GB/s of ``repeats`` timed calls of ``fn``, each moving ``nbytes``,
    where ``fn, nbytes = make()``, after one untimed call (compilation, and the pages faulted
    in). The rates go to ``_SAMPLES``, which serves later calls for the same key (the buffer is
    built only for the first)."""
    if key not in _SAMPLES:
        fn, nbytes = make()
        fn()
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            rates.append(nbytes / (time.perf_counter() - t0) / 1e9)
        _SAMPLES[key] = rates
    return float(np.median(_SAMPLES[key]))


def _buffer(dtype, nbytes):
    """A (4096, cols) buffer of ``nbytes`` or less holding 0, 1, 2, ...: no two pages alike."""
    dt = np.dtype(dtype)
    cols = max(1, nbytes // dt.itemsize // _ROWS)
    return np.arange(_ROWS * cols, dtype=dt).reshape(_ROWS, cols)


def read_bandwidth(dtype="float32", nbytes: int | None = None, repeats: int = REPEATS) -> float:
    """Vectorised parallel read bandwidth in GB/s (1e9 bytes/s) over ``dtype`` data."""
    nbytes = buffer_bytes() if nbytes is None else nbytes

    def make():
        a = _buffer(dtype, nbytes)
        partial = np.empty(a.shape[0], dtype=a.dtype)
        return (lambda: _read(a, partial)), a.nbytes

    return _median_rate(("read", np.dtype(dtype).name, nbytes), make, repeats)


def read_write_bandwidth(
    dtype="float32", nbytes: int | None = None, repeats: int = REPEATS
) -> float:
    """Vectorised parallel read + write bandwidth in GB/s: bytes read plus bytes written."""
    nbytes = buffer_bytes() if nbytes is None else nbytes

    def make():
        a = _buffer(dtype, nbytes)
        b = np.empty_like(a)
        return (lambda: _read_write(a, b)), 2 * a.nbytes

    return _median_rate(("read_write", np.dtype(dtype).name, nbytes), make, repeats)


def kind(mode: str) -> str:
    """Which ceiling a kernel of ``mode`` is judged against: "read" for "forward" (it only reads
    the logits), "read_write" for "forward_grad" (it also writes the gradient)."""
    try:
        return _KIND_OF_MODE[mode]
    except KeyError:
        raise ValueError(f"mode: expected one of {sorted(_KIND_OF_MODE)}, got {mode!r}") from None


def ceiling(mode: str, dtype) -> float:
    """The ceiling a kernel of ``mode`` is judged against (:func:`kind`), in GB/s."""
    return read_bandwidth(dtype) if kind(mode) == "read" else read_write_bandwidth(dtype)


def description() -> dict:
    """How the ceilings are measured, for a run's manifest and its report: the buffer's size,
    the last-level cache it is sized from, and the number of timed passes."""
    return {
        "buffer_bytes": buffer_bytes(),
        "last_level_cache_bytes": last_level_cache_bytes(),
        "repeats": REPEATS,
    }


def samples() -> dict[str, list[float]]:
    """Every pass's rate in GB/s of the ceilings measured in this process, by
    ``"read float32"``-style names (the manifest records them beside the medians)."""
    return {
        f"{kind} {dtype}": [round(v, 3) for v in rates]
        for (kind, dtype, _), rates in _SAMPLES.items()
    }
