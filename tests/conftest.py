"""pytest configuration: the torch fixture, and the simulator-only folder."""

import os

import pytest

# tests/cudasim runs only in its own process with the CUDA simulator (see tests/test_cuda.py)
_CUDA_TESTS = "1" in (
    os.environ.get("NUMBA_ENABLE_CUDASIM"),
    os.environ.get("CESTUDY_CUDA_GPU_TESTS"),
)
collect_ignore = [] if _CUDA_TESTS else ["cudasim"]


@pytest.fixture(scope="session")
def torch():
    return pytest.importorskip("torch")
