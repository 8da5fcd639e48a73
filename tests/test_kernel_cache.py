"""numba's on-disk cache and the kernels' sources (``cestudy.kernels.cache``): a cached kernel
whose inlined helper lives in another file must not outlive a change to that file."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from cestudy.kernels import cache, cpu

KERNEL = """
from pathlib import Path
from numba import njit
from cestudy.kernels import cache
import helper

HERE = Path(__file__).resolve().parent

@njit(cache=True)
def kernel(x):
    return helper.value(x)

if USE_GUARD:
    cache.drop_stale(cache.cache_dir_of(kernel), sources=HERE)
print(kernel(1.0))
"""


def _run_kernel(pkg, helper_body, guard):
    (pkg / "helper.py").write_text(
        "from numba import njit\n\n@njit(cache=True)\ndef value(x):\n"
        + textwrap.indent(helper_body, "    ")
        + "\n"
    )
    (pkg / "kernel.py").write_text(KERNEL.replace("USE_GUARD", str(guard)))
    out = subprocess.run(
        [sys.executable, str(pkg / "kernel.py")], capture_output=True, text=True, check=True
    )
    return float(out.stdout.split()[-1])


def test_a_kernel_follows_a_change_to_its_helpers_file(tmp_path):
    """With :func:`cache.drop_stale` at import, the cached kernel returns the new helper's value
    after only the helper's file changed. (numba alone returns the old one, 2.0 here: measured
    with numba 0.68 by the same two runs without the guard.)"""
    assert _run_kernel(tmp_path, "return x + 1.0", guard=True) == 2.0
    assert _run_kernel(tmp_path, "return x + 10.0", guard=True) == 11.0


def test_drop_stale_removes_cached_kernels_only_when_the_sources_change(tmp_path):
    sources = tmp_path / "src"
    cache_dir = tmp_path / "__pycache__"
    sources.mkdir()
    (sources / "a.py").write_text("x = 1\n")
    assert cache.drop_stale(cache_dir, sources)  # no stamp yet
    (cache_dir / "a.f-1.py311.nbi").write_text("index")
    (cache_dir / "a.f-1.py311.1.nbc").write_text("data")
    (cache_dir / "a.cpython-311.pyc").write_text("bytecode")
    assert not cache.drop_stale(cache_dir, sources)  # same sources: kept
    assert len(list(cache_dir.glob("*.nb?"))) == 2
    (sources / "a.py").write_text("x = 2\n")
    assert cache.drop_stale(cache_dir, sources)
    assert not list(cache_dir.glob("*.nb?"))
    assert (cache_dir / "a.cpython-311.pyc").exists()  # only numba's files
    assert (cache_dir / cache.STAMP).read_text() == cache.sources_digest(sources)


def test_cache_dir_of_names_where_numba_writes_the_kernels_cache():
    """The package's guard reads numba's cache directory through :func:`cache.cache_dir_of`: it
    is where this numba writes a cached kernel's index, and a dispatcher without one (another
    numba's layout) gives None, which :func:`cache.drop_stale` takes as nothing to do."""
    where = cache.cache_dir_of(cpu._S.two_sum)
    assert where is not None
    cpu.indices_in_range(np.zeros(3, np.int64), 2)  # a cached kernel of the same module
    assert any(Path(where).glob("cpu.indices_in_range-*.nbi"))
    assert cache.cache_dir_of(object()) is None
    assert not cache.drop_stale(None)
