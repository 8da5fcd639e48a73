"""Backend discovery: which compute backends are usable here, and why not when they are not.

The CPU backend (Numba) is always there. The CUDA backend needs the optional ``numba-cuda``
package (``pip install cestudy[cuda]``) and either an NVIDIA GPU or the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1`` set before numba is imported). Nothing here imports numba-cuda at
package import time.
"""

from __future__ import annotations

import functools
import os


class Skip(Exception):
    """A computation cannot run here: a missing package, no GPU, no data.

    The one "skip" exception of the package: study cells and benchmarks raise it with a message
    that says what is missing and the command that would provide it. A skipped study cell is not
    a result; the runner records it apart and retries it on a later run.
    """


def simulator_enabled() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def cuda_status() -> tuple[bool, str]:
    """(usable, description): whether backend="cuda" can run, and the GPU name or the reason."""
    try:
        from numba import cuda
    except ImportError as exc:  # pragma: no cover - numba always has the cuda name
        return False, f"numba.cuda cannot be imported ({exc})"
    if not simulator_enabled():
        try:
            import numba_cuda  # noqa: F401  (NVIDIA's package; numba's own target is deprecated)
        except ImportError:
            return False, ("the numba-cuda package is not installed (pip install 'cestudy[cuda]')")
    try:
        if not cuda.is_available():
            return False, (
                "no CUDA GPU is available here (cuda.is_available() is False): run "
                "on a machine with an NVIDIA GPU and pip install 'cestudy[cuda]'"
            )
        if simulator_enabled():
            return True, "CUDA simulator (NUMBA_ENABLE_CUDASIM=1; timings are meaningless)"
        dev = cuda.get_current_device()
        name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
        major, minor = dev.compute_capability
        return True, f"{name} (compute capability {major}.{minor})"
    except Exception as exc:  # driver errors surface as various exception types
        return False, f"CUDA is not usable: {exc}"


def require_cuda():
    """Return the CUDA kernel module, or raise RuntimeError saying what is missing."""
    ok, why = cuda_status()
    if not ok:
        raise RuntimeError(f"backend='cuda' is not available: {why}")
    from .kernels import cuda as cuda_kernels

    return cuda_kernels
