"""Gradient arrays the fused calls hand out again once the caller has let go of them.

A fused call made without ``out=`` returns a new N x C gradient. A new array costs more than
its malloc: the operating system zeroes each page the first time the kernel writes it. On the
2-core Zen 4 VM the reports come from, filling a fresh 256 MiB float64 array took 27.8 ms
against 10.4 ms for the same array reused (32 MiB: 3.6 against 0.9 ms), and glibc's reuse of
freed 1 to 32 MiB blocks depends on what else the process allocated, so a fused call's time
varied by up to 2.6x between runs at those sizes. A training loop drops the last step's
gradient before or while it asks for the next one, so the fresh pages buy nothing.

So each thread keeps the last :data:`KEEP` gradient arrays of at least :data:`MIN_BYTES` it
handed out (at most :data:`MAX_BYTES` in all) and hands one of the same shape and dtype out
again only when the pool holds the only reference to it: the caller has dropped the array and
every view of it (a view, a ``memoryview``, ``torch.from_numpy``, ``ctypes`` ``data_as`` or an
array a Numba function holds keeps a reference to it), so only a raw address kept past the
array's life, already a use-after-free without the pool, can see the reuse. A call that finds
no idle array of its shape and dtype first drops the idle ones (so a caller whose shapes vary
holds no dead arrays beyond the one it just got); :func:`release` drops the calling thread's
arrays. The idea is that of PyTorch's CUDA caching allocator (freed memory kept for the next
request), here for the CPU gradient only, judged free by reference count; ``out=`` (a buffer the
caller owns) remains the way to reuse memory explicitly.

The reference count is checked with ``sys.getrefcount`` on the pool's own list entry, which
reads 2 for an idle array (the list and the call's argument). :data:`POOLING` is False, and
every call gets a new array, on an interpreter where a probe at import finds that an array held
elsewhere does not read more than that.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

__all__ = ["gradient_array", "release", "KEEP", "MIN_BYTES", "MAX_BYTES", "POOLING"]

KEEP = 4
"""Arrays a thread keeps at most: two per shape lets ``loss, grad = f(...)`` in a loop alternate
between two arrays (the last step's gradient is still bound while the next call runs)."""

MIN_BYTES = 1 << 20
"""Smaller gradients come straight from numpy: malloc serves them from memory already touched,
and their page faults cost little next to a call's fixed cost."""

MAX_BYTES = 1 << 30
"""The most a thread's pool holds, in bytes; a larger gradient is never pooled."""

_local = threading.local()


def _idle(pool: list[np.ndarray], i: int) -> bool:
    # 2: the pool's own reference and getrefcount's argument; anything more is somebody else's
    return sys.getrefcount(pool[i]) == 2


def _refcount_tells_held_from_idle() -> bool:
    """Whether :func:`_idle` holds for an array only ``pool`` holds and not for one also held
    elsewhere, as :func:`gradient_array` relies on."""
    pool = [np.empty(1)]
    idle = _idle(pool, 0)
    held = pool[0]
    busy = not _idle(pool, 0)
    del held
    return idle and busy


POOLING = _refcount_tells_held_from_idle()


def _pool() -> list[np.ndarray]:
    pool = getattr(_local, "arrays", None)
    if pool is None:
        pool = _local.arrays = []
    return pool


def gradient_array(like: np.ndarray) -> np.ndarray:
    """An uninitialised C-contiguous array of ``like``'s shape and dtype for a fused call's
    gradient: an idle pooled array of that shape and dtype when there is one, else a new one
    (pooled if at least :data:`MIN_BYTES` and at most :data:`MAX_BYTES`)."""
    nbytes = like.size * like.dtype.itemsize
    if not POOLING or nbytes < MIN_BYTES or nbytes > MAX_BYTES:
        return np.empty(like.shape, dtype=like.dtype)
    pool = _pool()
    held = []  # the arrays somebody else still holds, in pool order
    for i in range(len(pool)):
        if not _idle(pool, i):
            held.append(pool[i])
            continue
        a = pool[i]
        fits = a.shape == like.shape and a.dtype == like.dtype and a.flags.writeable
        del a
        if fits:
            arr = pool.pop(i)
            pool.append(arr)  # most recently used last
            return arr
    # no idle array fits: the idle ones are dead weight (the caller's shapes have moved on)
    pool[:] = held
    del held
    arr = np.empty(like.shape, dtype=like.dtype)
    pool.append(arr)
    while len(pool) > KEEP or sum(a.nbytes for a in pool) > MAX_BYTES:
        pool.pop(0)  # the oldest; the caller's reference, if any, keeps the array alive
    return arr


def release() -> None:
    """Drop the calling thread's pooled gradient arrays (those the caller still holds stay
    valid; the others are freed)."""
    _pool().clear()
