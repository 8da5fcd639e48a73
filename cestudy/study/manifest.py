"""The run manifest stored with every result (asv/pyperf style): versions, CPU, Numba threading,
CUDA, commit and date. ``python -m cestudy info`` prints it for bug reports."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from importlib import metadata


def _version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> str:
    try:
        import llvmlite.binding as llvm
        from numba.misc.numba_sysinfo import get_sysinfo  # noqa: F401

        feats = llvm.get_host_cpu_features().flatten()
        keep = [
            f
            for f in feats.split(",")
            if f.startswith("+") and any(k in f for k in ("avx", "fma", "sse4", "neon", "sve"))
        ]
        return f"{llvm.get_host_cpu_name()}: {' '.join(sorted(k[1:] for k in keep))}"
    except Exception as exc:  # pragma: no cover
        return f"unknown ({exc})"


def git_commit() -> str:
    """HEAD of the checkout (+dirty), or $CESTUDY_GIT_COMMIT where the tree came without .git
    (as on the lent GPU machines)."""
    if os.environ.get("CESTUDY_GIT_COMMIT"):
        return os.environ["CESTUDY_GIT_COMMIT"]
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if out.returncode == 0:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=here,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout
            return out.stdout.strip() + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def manifest() -> dict:
    """The run manifest stored with every result (asv/pyperf style)."""
    import numba

    from .. import __version__, backends
    from ..reference import peers

    cuda_ok, cuda_desc = backends.cuda_status()
    return {
        "cestudy": __version__,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "numba": _version("numba"),
        "llvmlite": _version("llvmlite"),
        "numpy": _version("numpy"),
        "scipy": _version("scipy"),
        "torch": _version("torch"),
        "numba_cuda": _version("numba-cuda"),
        **peers.versions(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_features": cpu_features(),
        "cpu_count": os.cpu_count(),
        "numba_threads": numba.config.NUMBA_NUM_THREADS,
        "threading_layer": _threading_layer(),
        "cuda": cuda_desc if cuda_ok else f"unavailable: {cuda_desc}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _threading_layer() -> str:
    import numba
    import numpy as np

    from ..kernels import cpu

    # the layer is chosen at the first parallel launch
    cpu.logsumexp_rows(np.zeros((2, 2)), np.empty(2))
    try:
        return numba.threading_layer()
    except ValueError:
        return "not initialised"
