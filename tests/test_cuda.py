"""CUDA kernels without a GPU: the simulator run (a separate pytest process, since
NUMBA_ENABLE_CUDASIM must be set before numba is imported) and PTX compilation of every kernel
for compute capabilities 8.0 and 9.0, for every input dtype and both group reductions (warp
shuffles, the GPU's default, and shared-memory trees, the simulator's)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def test_cuda_kernels_in_the_simulator():
    env = dict(
        os.environ, NUMBA_ENABLE_CUDASIM="1", CESTUDY_CUDA_THREADS="8", CESTUDY_CUDA_ELEMENTS="2"
    )
    for key in ("CESTUDY_CUDA_REDUCTION", "CESTUDY_CUDA_CHECKS"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "cudasim")],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
        cwd=HERE.parent,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1]


def _signatures(kind):
    from numba import types

    elem = {
        "float64": types.float64,
        "float32": types.float32,
        "float16": types.float16,
        "bfloat16": types.uint16,
    }[kind]
    x = types.Array(elem, 2, "C")
    loss = types.Array(types.float64 if kind == "float64" else types.float32, 1, "C")
    loss2 = types.Array(loss.dtype, 2, "C")
    f32m = types.Array(types.float32, 2, "C")
    f64v = types.Array(types.float64, 1, "C")
    f64m = types.Array(types.float64, 2, "C")
    i64v = types.Array(types.int64, 1, "C")
    b, d, i = types.boolean, types.float64, types.int64
    tail = (d, b, b, i, i, loss, x, f64v)  # gscale, use_denom, with_grad, tpr, mode, outs, ws
    return {
        "cross_entropy_index": (x, i64v, f64v, i, d) + tail,
        "cross_entropy_prob": (x, f32m, f64v, d) + tail,
        "kl_divergence": (x, f32m) + tail,
        "softmax_focal": (x, i64v, f64v, i, d) + tail,
        "bce_with_logits": (x, f32m, f64m, f64m, d, b, b, i, loss2, x, f64v),
        "sigmoid_focal": (x, f32m, d, d, d, b, b, i, loss2, x, f64v),
        "index_weight_sum": (i64v, f64v, i, f64v),
        "row_sum": (f64m, i, f64v),
        "widen": (x, f32m),
    }


ROW_KERNELS = ("cross_entropy_index", "cross_entropy_prob", "kl_divergence", "softmax_focal")


@pytest.fixture
def compile_ptx(monkeypatch):
    try:
        import numba_cuda  # noqa: F401  (NVIDIA's numba-cuda with its NVVM wheel)
        from numba.cuda import compile_ptx, dispatcher
    except ImportError as exc:
        pytest.fail(
            f"numba-cuda[cu13] is needed for the PTX test (pip install 'cestudy[cuda]'): {exc}"
        )
    import types as pytypes

    def compile_for(fn, sig, cc):
        # compile_ptx itself needs no GPU, but numba-cuda compiles the device functions a
        # kernel calls for "the current device's" compute capability, which asks the driver;
        # without a GPU there is none, so the test names the capability it compiles for.
        monkeypatch.setattr(
            dispatcher, "get_current_device", lambda: pytypes.SimpleNamespace(compute_capability=cc)
        )
        return compile_ptx(fn, sig, cc=cc)[0]

    return compile_for


@pytest.mark.parametrize("cc", [(8, 0), (9, 0)])
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "float16", "float64"])
def test_every_cuda_kernel_compiles_to_ptx_with_warp_shuffles(cc, kind, compile_ptx):
    """The GPU's kernel set (warp shuffles): every kernel compiles; the row kernels reduce with
    shfl.sync butterflies, never call the approximate exp (ex2.approx from __expf) and never
    spill to local memory in PTX."""
    from cestudy.kernels import cuda as ck

    funcs = ck._make_kernels(256, kind, "shuffle")["_pyfuncs"]
    sigs = _signatures(kind)
    assert set(funcs) == set(sigs), "every kernel needs a PTX signature here"
    for name, fn in funcs.items():
        ptx = compile_ptx(fn, sigs[name], cc)
        assert ".entry" in ptx and f".target sm_{cc[0]}{cc[1]}" in ptx, name
        assert "ex2.approx" not in ptx, name
        if name in ROW_KERNELS:
            assert "shfl.sync.bfly" in ptx, name
            assert ".local" not in ptx, name
    assert (
        re.search(
            r"cvt\.rn\.f16\.f32",
            compile_ptx(funcs["cross_entropy_index"], sigs["cross_entropy_index"], cc),
        )
        or kind != "float16"
    )


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "float64"])
def test_the_simulators_shared_memory_trees_compile_to_ptx(kind, compile_ptx):
    """The shared-memory-tree set (what the simulator runs) is a valid GPU kernel set too, with
    no shuffles."""
    from cestudy.kernels import cuda as ck

    funcs = ck._make_kernels(256, kind, "tree")["_pyfuncs"]
    sigs = _signatures(kind)
    for name in ROW_KERNELS + ("index_weight_sum",):
        ptx = compile_ptx(funcs[name], sigs[name], (9, 0))
        assert ".entry" in ptx and "shfl" not in ptx, name


def test_float32_hot_loop_is_float32(compile_ptx):
    """The float32 kernels' per-element work is float32: between the first load of the row and
    the group reduction, float64 appears only in the rescaling of the sum (once per chunk whose
    maximum grows), and exp is the float32 polynomial (its shifter constant 1.5 * 2^23)."""
    from cestudy.kernels import cuda as ck

    funcs = ck._make_kernels(256, "float32", "shuffle")["_pyfuncs"]
    ptx = compile_ptx(
        funcs["cross_entropy_index"], _signatures("float32")["cross_entropy_index"], (9, 0)
    )
    first_load = ptx.index("ld.global.f32")
    reduction = ptx.index("shfl.sync.bfly")
    loop = ptx[first_load:reduction]
    assert "0f4B400000" in loop  # the float32 exp's shifter
    assert "fma.rn.f32" in loop
    assert "ex2" not in loop and "lg2" not in loop
