"""Keeps numba's on-disk cache of the kernels in step with all of their sources.

numba checks a cached kernel against its own source file only ("cache invalidation fails to
recognize changes in functions defined in a different file", numba's caching notes): a kernel of
``cpu_fast.py`` that inlines a function of ``scalar.py`` or ``cpu.py`` keeps its old machine code
after only those files change, and runs the old formula. :func:`drop_stale` removes the cached
kernels whenever any source of this package changes; a stamp file beside them holds the hash of
the sources they were compiled from.
"""

import hashlib
import os
from pathlib import Path

STAMP = "cestudy-kernel-sources.sha256"
SOURCES = Path(__file__).resolve().parent


def sources_digest(sources: Path = SOURCES) -> str:
    """The SHA-256 of every ``*.py`` file in ``sources`` (names and contents, in name order)."""
    digest = hashlib.sha256()
    for path in sorted(sources.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_dir_of(dispatcher) -> str | None:
    """The directory where numba caches ``dispatcher``'s compilations (numba's locator picks it:
    ``__pycache__`` beside the source, or a user cache directory), or None if this numba keeps
    it elsewhere than the private attribute read here: :func:`drop_stale` then does nothing."""
    try:
        return dispatcher._cache._cache_path
    except AttributeError:
        return None


def drop_stale(cache_dir: str | os.PathLike | None, sources: Path = SOURCES) -> bool:
    """Remove numba's index (``*.nbi``) and data (``*.nbc``) files from ``cache_dir`` unless its
    stamp matches :func:`sources_digest`, then write the stamp; returns whether it removed them.

    Safe against concurrent imports: numba treats a data file removed under its index as a
    cache miss, and the stamp is replaced atomically. Errors (a read-only install) are ignored:
    the cache then stays as numba left it, as it does for ``cache_dir`` None."""
    if cache_dir is None:
        return False
    cache_dir = Path(cache_dir)
    digest = sources_digest(sources)
    stamp = cache_dir / STAMP
    try:
        if stamp.read_text() == digest:
            return False
    except OSError:
        pass
    for cached in [*cache_dir.glob("*.nbi"), *cache_dir.glob("*.nbc")]:
        try:
            cached.unlink()
        except OSError:
            pass
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = cache_dir / f"{STAMP}.{os.getpid()}"
        partial.write_text(digest)
        os.replace(partial, stamp)
    except OSError:
        pass
    return True
