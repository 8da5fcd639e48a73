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
are medians, on all of numba's threads (``NUMBA_NUM_THREADS``: the machine's ceiling, whatever
number of threads the caller has set for a scaling run). A measurement is reused for at most
``MAX_AGE_S`` seconds: the VM the reports come from once read float32 at 29.9 GB/s (passes 26.3
to 32.7) and, moments later, float64 at 54.2 and float32 read+write at 55.8, where the run
before had measured 37.4, 37.0 and 35.9; a ceiling measured once at the start of a 45-minute
bench would judge every row against whatever the memory did in those seconds. Every
measurement's passes are kept (:func:`samples`, :func:`spread`), and how they were measured
(:func:`description`), for the run's manifest; :func:`measured` gives a timed row the latest
ceiling when its timing ends, measured again then when older than ``MAX_AGE_S``, with the buffer
and passes it came from.

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

import numba
import numpy as np
from numba import njit, prange

_ROWS = 4096
REPEATS = 7  # timed passes per ceiling; the ceiling is their median
MAX_AGE_S = 60.0  # a ceiling older than this is measured again before a row is judged against it
# the latest measurement by (kind, dtype name, requested bytes): its passes' rates in GB/s (the
# median is the ceiling), the buffer's size and when it was taken (time.monotonic())
_SAMPLES: dict[tuple[str, str, int], dict] = {}
# every measurement of this process in order, as (key, measurement)
_HISTORY: list[tuple[tuple[str, str, int], dict]] = []
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


def fmt_bytes(nbytes: int) -> str:
    """``nbytes`` in MiB, or in GiB from 1 GiB up: "4 MiB", "256 MiB", "1 GiB"."""
    if nbytes >= 1 << 30:
        return f"{nbytes / (1 << 30):g} GiB"
    return f"{nbytes / (1 << 20):g} MiB"


def measurement(
    kind_: str,
    dtype,
    nbytes: int | None = None,
    repeats: int = REPEATS,
    max_age_s: float | None = None,
) -> dict:
    """The ``kind_`` ("read" or "read_write") ceiling over ``dtype`` data in a buffer of
    ``nbytes`` (:func:`buffer_bytes` when None): ``repeats`` timed passes after one untimed pass
    (compilation, and the pages faulted in), on all of numba's threads. The latest one of the
    same kind, dtype and size is served as it was unless it is older than ``max_age_s`` seconds
    (never, when None); a new one builds its buffer afresh (keeping 256 MiB or more alive
    between measurements would take it from the kernels): ``{"rates": GB/s per pass,
    "buffer_bytes": the buffer's size, "at": time.monotonic() when taken}``."""
    if kind_ not in _PASSES:
        raise ValueError(f"kind: expected one of {sorted(_PASSES)}, got {kind_!r}")
    nbytes = buffer_bytes() if nbytes is None else nbytes
    key = (kind_, np.dtype(dtype).name, nbytes)
    last = _SAMPLES.get(key)
    if last is not None and (max_age_s is None or time.monotonic() - last["at"] <= max_age_s):
        return last
    a = _buffer(dtype, nbytes)
    fn, moved = _PASSES[kind_](a)
    threads = numba.get_num_threads()  # a scaling run may have set fewer: restored below
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    try:
        fn()
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            rates.append(moved / (time.perf_counter() - t0) / 1e9)
    finally:
        numba.set_num_threads(threads)
    _SAMPLES[key] = m = {"rates": rates, "buffer_bytes": a.nbytes, "at": time.monotonic()}
    _HISTORY.append((key, m))
    return m


def kind(mode: str) -> str:
    """Which ceiling a kernel of ``mode`` is judged against: "read" for "forward" (it only reads
    the logits), "read_write" for "forward_grad" (it also writes the gradient)."""
    try:
        return _KIND_OF_MODE[mode]
    except KeyError:
        raise ValueError(f"mode: expected one of {sorted(_KIND_OF_MODE)}, got {mode!r}") from None


def measured(mode: str, dtype, max_age_s: float | None = None) -> dict:
    """The ceiling a kernel of ``mode`` is judged against (:func:`kind`), as it was measured
    (:func:`measurement`, again when the latest is older than ``max_age_s``): ``kind``, ``gbs``
    (the median in GB/s), ``buffer_bytes`` (the buffer it was measured over), ``passes`` (how
    many timed passes the median is of), ``last_level_cache_bytes`` (what the buffer was
    sized from), ``age_s`` (how long ago it was measured) and ``max_age_s``."""
    k = kind(mode)
    m = measurement(k, dtype, max_age_s=max_age_s)
    return {
        "kind": k,
        "gbs": float(np.median(m["rates"])),
        "buffer_bytes": int(m["buffer_bytes"]),
        "passes": len(m["rates"]),
        "last_level_cache_bytes": last_level_cache_bytes(),
        "age_s": time.monotonic() - m["at"],
        "max_age_s": max_age_s,
    }


def label(mode: str) -> str:
    """How the reports name the ceiling of ``mode``: "read" or "read+write"."""
    return LABELS[kind(mode)]


def description() -> dict:
    """How the ceilings are measured, for a run's manifest: the buffer's size, the last-level
    cache (of cpu0) it is sized from, the number of timed passes, the threads they run on and
    how old a measurement may be before a row is judged against a new one."""
    return {
        "buffer_bytes": buffer_bytes(),
        "last_level_cache_bytes": last_level_cache_bytes(),
        "repeats": REPEATS,
        "threads": numba.config.NUMBA_NUM_THREADS,
        "max_age_s": MAX_AGE_S,
    }


def _name(key, m) -> str:
    kind_, dtype, _ = key
    return f"{kind_} {dtype} {fmt_bytes(m['buffer_bytes'])}"


def samples() -> dict[str, list[float]]:
    """Every pass's rate in GB/s of each ceiling measured in this process, by
    ``"read float32 256 MiB"``-style names, ``#2``, ``#3``, ... for the second and later
    measurements of the same one (the manifest records them beside the medians)."""
    out, seen = {}, {}
    for key, m in _HISTORY:
        name = _name(key, m)
        seen[name] = seen.get(name, 0) + 1
        out[name if seen[name] == 1 else f"{name} #{seen[name]}"] = [
            round(v, 3) for v in m["rates"]
        ]
    return out


def spread() -> dict[str, list[float]]:
    """The median in GB/s of each measurement of this process, in order, by ``"read float32
    256 MiB"``-style names: how far the machine's memory speed moved during a run."""
    out: dict[str, list[float]] = {}
    for key, m in _HISTORY:
        out.setdefault(_name(key, m), []).append(float(np.median(m["rates"])))
    return out
