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
every view of it (a view, a ``memoryview`` or an array Numba holds keeps a reference to it), so
the reuse cannot be seen. This is the scheme of PyTorch's CUDA caching allocator, applied to the
CPU gradient only. :func:`release` drops the calling thread's arrays; the pool is held for
nothing else, so ``out=`` (a buffer the caller owns) remains the way to reuse memory explicitly.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

__all__ = ["gradient_array", "release", "KEEP", "MIN_BYTES", "MAX_BYTES"]

KEEP = 4
"""Arrays a thread keeps at most: two per shape lets ``loss, grad = f(...)`` in a loop alternate
between two arrays (the last step's gradient is still bound while the next call runs)."""

MIN_BYTES = 1 << 20
"""Smaller gradients come straight from numpy: malloc serves them from memory already touched,
and their page faults cost little next to a call's fixed cost."""

MAX_BYTES = 1 << 30
"""The most a thread's pool holds, in bytes; a larger gradient is never pooled."""

_local = threading.local()


def _pool() -> list[np.ndarray]:
    pool = getattr(_local, "arrays", None)
    if pool is None:
        pool = _local.arrays = []
    return pool


def gradient_array(like: np.ndarray) -> np.ndarray:
    """An uninitialised C-contiguous array of ``like``'s shape and dtype for a fused call's
    gradient: an idle pooled array when one matches, else a new one (pooled if at least
    :data:`MIN_BYTES` and at most :data:`MAX_BYTES`)."""
    nbytes = like.size * like.dtype.itemsize
    if nbytes < MIN_BYTES or nbytes > MAX_BYTES:
        return np.empty(like.shape, dtype=like.dtype)
    pool = _pool()
    for i in range(len(pool)):
        # 2: the pool's own reference and getrefcount's argument; anything more is the caller's
        if (
            pool[i].shape == like.shape
            and pool[i].dtype == like.dtype
            and pool[i].flags.writeable
            and sys.getrefcount(pool[i]) == 2
        ):
            arr = pool.pop(i)
            pool.append(arr)  # most recently used last
            return arr
    arr = np.empty(like.shape, dtype=like.dtype)
    pool.append(arr)
    while len(pool) > KEEP or sum(a.nbytes for a in pool) > MAX_BYTES:
        pool.pop(0)  # the caller's reference, if any, keeps the array alive
    return arr


def release() -> None:
    """Drop the calling thread's pooled gradient arrays (those the caller still holds stay
    valid; the others are freed)."""
    _pool().clear()
