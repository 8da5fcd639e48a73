"""CUDA kernels without a GPU: the simulator run (a separate pytest process, since
NUMBA_ENABLE_CUDASIM must be set before numba is imported) and PTX compilation of every kernel
for compute capabilities 8.0 and 9.0."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent


def test_cuda_kernels_in_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", CESTUDY_CUDA_THREADS="8")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(HERE / "cudasim")], env=env, capture_output=True, text=True,
                          timeout=1800, cwd=HERE.parent)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1]


def _signatures(dtype):
    from numba import types

    f = types.float32 if dtype == np.float32 else types.float64
    x = types.Array(f, 2, "C")
    f64v = types.Array(types.float64, 1, "C")
    f64m = types.Array(types.float64, 2, "C")
    i64v = types.Array(types.int64, 1, "C")
    b, d, i = types.boolean, types.float64, types.int64
    return {
        "cross_entropy_index": (x, i64v, f64v, i, d, d, d, b, i, f64v, x),
        "cross_entropy_prob": (x, x, f64v, d, d, b, i, f64v, x),
        "kl_divergence": (x, x, d, b, i, f64v, x),
        "softmax_focal": (x, i64v, f64v, i, d, d, b, i, f64v, x),
        "bce_with_logits": (x, x, f64m, f64m, d, b, f64m, x),
        "sigmoid_focal": (x, x, d, d, d, b, f64m, x),
        "row_sum": (f64m, i, f64v),
        "reduce_sum": (f64v, f64v),
        "index_weight_sum": (i64v, f64v, i, f64v),
        "count_invalid": (i64v, i, i, f64v),
        "count_negative": (f64v, f64v),
        "scale_cast": (f64v, d, types.Array(f, 1, "C")),
    }


@pytest.mark.parametrize("cc", [(8, 0), (9, 0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_cuda_kernel_compiles_to_ptx(cc, dtype, monkeypatch):
    import types as pytypes

    try:
        import numba_cuda  # noqa: F401  (NVIDIA's numba-cuda with its NVVM wheel)
        from numba import cuda
        from numba.cuda import compile_ptx
    except ImportError as exc:
        pytest.fail(f"numba-cuda[cu13] is needed for the PTX test (pip install "
                    f"'cestudy[cuda]'): {exc}")
    from numba.cuda import dispatcher

    from cestudy.kernels import cuda as ck

    # compile_ptx itself needs no GPU, but numba-cuda compiles the device functions a kernel
    # calls for "the current device's" compute capability, which asks the driver; without a GPU
    # there is none, so the test names the capability it compiles for.
    monkeypatch.setattr(dispatcher, "get_current_device",
                        lambda: pytypes.SimpleNamespace(compute_capability=cc))
    # float32 logits take the fast32 set, float64 the exact one; compile the set each dtype uses
    funcs = ck._make_kernels(256, dtype == np.float32)["_pyfuncs"]
    sigs = _signatures(dtype)
    assert set(funcs) == set(sigs), "every kernel needs a PTX signature here"
    for name, fn in funcs.items():
        ptx, _ = compile_ptx(fn, sigs[name], cc=cc)
        assert ".entry" in ptx and f".target sm_{cc[0]}{cc[1]}" in ptx, name
        # the accurate path must not contain fast approximate exp (ex2.approx.ftz from __expf)
        if name in ("cross_entropy_index", "cross_entropy_prob", "kl_divergence",
                    "softmax_focal"):
            assert "ex2.approx.ftz.f32" not in ptx, name
    assert cuda is not None
