"""These tests run the CUDA kernels in numba's CUDA simulator, in their own pytest process:
NUMBA_ENABLE_CUDASIM must be set before numba is imported (tests/test_cuda.py starts it).
Timings taken here are meaningless and never recorded. On a machine with a GPU the same tests
run on the device with CESTUDY_CUDA_GPU_TESTS=1:

    CESTUDY_CUDA_GPU_TESTS=1 python -m pytest -q tests/cudasim

Tests marked ``gpu_only`` (torch CUDA tensors) are deselected in the simulator, tests marked
``simulator_only`` (emulated shuffles) on a GPU, so that neither run reports a skip."""

import os
import sys
from pathlib import Path

import pytest

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
if not SIMULATOR and os.environ.get("CESTUDY_CUDA_GPU_TESTS") != "1":
    pytest.skip(
        "run through tests/test_cuda.py (needs NUMBA_ENABLE_CUDASIM=1 at start-up), or "
        "on a GPU with CESTUDY_CUDA_GPU_TESTS=1",
        allow_module_level=True,
    )

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu_only: needs a GPU (torch CUDA tensors)")
    config.addinivalue_line("markers", "simulator_only: needs the CUDA simulator")


def pytest_collection_modifyitems(config, items):
    away = "gpu_only" if SIMULATOR else "simulator_only"
    keep = [item for item in items if away not in item.keywords]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if away in i.keywords])
        items[:] = keep
