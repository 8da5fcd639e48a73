"""pytest configuration: the torch fixture, and the simulator-only folder."""
import os

import pytest

# tests/cudasim runs only in its own process with the CUDA simulator (see tests/test_cuda.py)
collect_ignore = [] if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" else ["cudasim"]


@pytest.fixture(scope="session")
def torch():
    return pytest.importorskip("torch")
