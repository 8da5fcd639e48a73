"""These tests run the CUDA kernels in numba's CUDA simulator, in their own pytest process:
NUMBA_ENABLE_CUDASIM must be set before numba is imported (tests/test_cuda.py starts it).
Timings taken here are meaningless and never recorded. On a machine with a GPU the same tests
run on the device with CESTUDY_CUDA_GPU_TESTS=1."""
import os
import sys
from pathlib import Path

import pytest

if "1" not in (os.environ.get("NUMBA_ENABLE_CUDASIM"), os.environ.get("CESTUDY_CUDA_GPU_TESTS")):
    pytest.skip("run through tests/test_cuda.py (needs NUMBA_ENABLE_CUDASIM=1 at start-up), or "
                "on a GPU with CESTUDY_CUDA_GPU_TESTS=1", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
