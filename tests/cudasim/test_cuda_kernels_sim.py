"""Every CUDA kernel, run in the simulator on small shapes with few threads per block (so that
several blocks and the whole shared-memory tree run), against the oracle and the CPU kernels."""
import numpy as np
import pytest
from numba import cuda

import cestudy as cs
from cestudy import variants
from cestudy.kernels import cpu, cpu_fast
from cestudy.kernels import cuda as ck
from cestudy.reference import oracle

from helpers import assert_grad_ulp, assert_ulp

DTYPES = [np.float32, np.float64]


def test_backend_reports_the_simulator_or_the_gpu():
    import os

    from cestudy import backends

    ok, desc = backends.cuda_status()
    assert ok
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        assert "simulator" in desc.lower()
        assert ck.kernels()["threads"] == 8  # CESTUDY_CUDA_THREADS from tests/test_cuda.py
    else:
        assert "compute capability" in desc


def rows(dtype, rng):
    x = rng.normal(size=(7, 29)) * 4
    x[0, 3] += 40            # confident-correct (tiny loss)
    x[1] = 1e6               # equal logits at an offset (all ties)
    x[2, ::3] = -np.inf      # masked classes
    x[3, 5] = x[3, 6] = 9.0  # ties at the max
    x[3] = np.minimum(x[3], 9.0)
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1, "weight": True},
                                  {"ignore_index": 4}])
def test_cross_entropy_index(dtype, opts):
    rng = np.random.default_rng(0)
    x = rows(dtype, rng)
    y = np.array([3, 0, 1, 5, 4, 4, 10])
    o = dict(opts)
    w = rng.uniform(0.5, 2, 29) if o.pop("weight", False) else None
    loss, grad = cs.cross_entropy_with_grad(x, y, weight=w, reduction="none", backend="cuda",
                                            **o)
    ref_l, ref_g = cs.cross_entropy_with_grad(x, y, weight=w, reduction="none", **o)
    ls = o.get("label_smoothing", 0.0)
    ign = o.get("ignore_index", -100)
    assert_ulp(loss, oracle.cross_entropy(x, y, w, ign, ls), dtype)
    assert_grad_ulp(grad, oracle.cross_entropy_grad(x, y, w, ign, ls), dtype)
    np.testing.assert_allclose(loss, ref_l, rtol=8 * np.finfo(dtype).eps, atol=0)
    for red in ("mean", "sum"):
        a = cs.cross_entropy(x, y, weight=w, reduction=red, backend="cuda", **o)
        b = cs.cross_entropy(x, y, weight=w, reduction=red, **o)
        assert a == pytest.approx(b, rel=4 * float(np.finfo(dtype).eps))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [2, 5, 200])
def test_rows_packed_several_to_a_block_and_rows_wider_than_the_block(dtype, c):
    """c = 2 and 5 pack several rows into a block (threads_per_row < threads), with idle rows
    in the last block; c = 200 spreads a row over the whole block."""
    rng = np.random.default_rng(c)
    n = 11
    x = (rng.normal(size=(n, c)) * 20).astype(dtype)
    y = np.where(np.arange(n) % 2 == 0, np.argmax(x, 1), rng.integers(0, c, n))
    y[3] = -100
    loss, grad = cs.cross_entropy_with_grad(x, y, reduction="none", backend="cuda",
                                            label_smoothing=0.05)
    assert_ulp(loss, oracle.cross_entropy(x, y, label_smoothing=0.05), dtype)
    assert_grad_ulp(grad, oracle.cross_entropy_grad(x, y, label_smoothing=0.05), dtype)
    p = rng.dirichlet(np.ones(c), n).astype(dtype)
    kl, kg = cs.kl_divergence_with_grad(x, p, reduction="none", backend="cuda")
    # KL sums terms of both signs: in float64 its error follows its conditioning (up to ~6 ulp
    # measured on the CPU kernel too); float32 results are computed far more precisely
    assert_ulp(kl, oracle.kl_divergence(x, p), dtype, tol=4 if dtype == np.float32 else 8)
    fl = cs.softmax_focal_loss(x, y, reduction="none", backend="cuda")
    # (1 - p_y)^2 doubles the error of 1 - p_y = S / (1 + S), and the online rescaling of S adds
    # up to an ulp: float64 focal losses of confident rows reach ~4-5 ulp (float32: < 1)
    assert_ulp(fl, oracle.softmax_focal_loss(x, y), dtype, tol=4 if dtype == np.float32 else 8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_inf_rows(dtype):
    x = np.array([[np.nan, 0, 1], [np.inf, 0, 1], [-np.inf] * 3, [1, 2, 3]], dtype)
    loss, grad = cs.cross_entropy_with_grad(x, np.array([0, 1, 2, 2]), reduction="none",
                                            backend="cuda")
    assert np.isnan(loss[:3]).all() and np.isnan(grad[:3]).all() and np.isfinite(grad[3]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_soft_targets_kl_and_focal(dtype):
    rng = np.random.default_rng(1)
    x = rows(dtype, rng)
    x[2] = rng.normal(size=29)  # soft targets put mass everywhere
    p = rng.dirichlet(np.ones(29), 7).astype(dtype)
    for fn, ref, ref_g in (
        (lambda b: cs.cross_entropy_with_grad(x, p, reduction="none", backend=b),
         oracle.cross_entropy_probs(x, p), oracle.cross_entropy_probs_grad(x, p)),
        (lambda b: cs.kl_divergence_with_grad(x, p, reduction="none", backend=b),
         oracle.kl_divergence(x, p), oracle.kl_divergence_grad(x, p)),
    ):
        loss, grad = fn("cuda")
        assert_ulp(loss, ref, dtype)
        assert_grad_ulp(grad, ref_g, dtype)
    y = np.array([3, 0, 1, 5, 4, 4, 10])
    loss, grad = cs.softmax_focal_loss_with_grad(x, y, reduction="none", backend="cuda")
    assert_ulp(loss, oracle.softmax_focal_loss(x, y), dtype)
    assert_grad_ulp(grad, oracle.softmax_focal_loss_grad(x, y), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_kernels(dtype):
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(5, 9)) * 12).astype(dtype)
    t = np.round(rng.uniform(size=x.shape)).astype(dtype)
    pw = rng.uniform(0.5, 3, 9)
    loss, grad = cs.binary_cross_entropy_with_logits_with_grad(x, t, pos_weight=pw,
                                                               reduction="none", backend="cuda")
    assert_ulp(loss, oracle.binary_cross_entropy_with_logits(x, t, pos_weight=pw), dtype)
    assert_ulp(grad, oracle.binary_cross_entropy_with_logits_grad(x, t, pos_weight=pw), dtype)
    tol = 4.0 if dtype == np.float32 else 8.0
    loss, grad = cs.sigmoid_focal_loss_with_grad(x, t, backend="cuda")
    assert_ulp(loss, oracle.sigmoid_focal_loss(x, t), dtype, tol=tol)
    assert_ulp(grad, oracle.sigmoid_focal_loss_grad(x, t), dtype, tol=tol)


def test_float16_host_input_is_computed_in_float32():
    x = np.array([[4096.0, 4096.0, 4096.0]], np.float16)
    loss = cs.cross_entropy(x, np.array([0]), reduction="none", backend="cuda")
    assert loss.dtype == np.float16
    assert_ulp(loss, oracle.cross_entropy(x, np.array([0])), np.float16, tol=1)


def _inputs(v, rng):
    x = rng.normal(size=(6, 17)).astype(np.float32)
    if v.target == "index":
        t = rng.integers(0, 17, 6)
    elif v.target == "probs":
        t = rng.dirichlet(np.ones(17), 6).astype(np.float32)
    else:
        t = np.round(rng.uniform(size=x.shape)).astype(np.float32)
    return x, t


def _kernel_options(v, n, c):
    """The registry's default options as the raw kernels take them (dispatch's job)."""
    opts = []
    for key, default in v.options:
        if key == "weight" and v.elementwise:
            opts.append(np.ones((n, c)))
        elif key == "pos_weight":
            opts.append(np.ones((n, c)))
        elif key == "weight":
            opts.append(np.ones(c))
        else:
            opts.append(default)
    return opts


CUDA_VARIANTS = [v for v in variants.VARIANTS.values() if v.cuda and v.kernel]


@pytest.mark.parametrize("v", CUDA_VARIANTS, ids=lambda v: v.name)
def test_raw_kernels_take_device_arrays_and_write_the_gradient_in_place(v):
    """Each raw kernel, called as dispatch calls it: device arrays in, device outputs written,
    the gradient optionally into the logits buffer itself."""
    rng = np.random.default_rng(3)
    x, t = _inputs(v, rng)
    n, c = x.shape
    opts = _kernel_options(v, n, c)
    dx, dt = cuda.to_device(x), cuda.to_device(t)
    loss_shape = x.shape if v.elementwise else (n,)
    d_loss = ck.device_array(loss_shape, np.float64)
    d_grad = ck.device_array(x.shape, x.dtype)
    getattr(ck, v.kernel + "_fwd_grad")(dx, dt, *opts, 1.0, d_loss, d_grad)
    ref_l = np.empty(loss_shape)
    ref_g = np.empty_like(x)
    getattr(cpu_fast if v.fast_cpu else cpu, v.kernel + "_fwd_grad")(x, t, *opts, 1.0, ref_l,
                                                                       ref_g)
    np.testing.assert_allclose(d_loss.copy_to_host(), ref_l, rtol=1e-6)
    np.testing.assert_allclose(d_grad.copy_to_host(), ref_g, rtol=1e-6, atol=1e-9)
    d_fwd = ck.device_array(loss_shape, np.float64)
    getattr(ck, v.kernel + "_fwd")(dx, dt, *opts, d_fwd)
    np.testing.assert_array_equal(d_fwd.copy_to_host(), d_loss.copy_to_host())
    buf = cuda.to_device(x)
    getattr(ck, v.kernel + "_fwd_grad")(buf, dt, *opts, 1.0, ck.device_array(loss_shape,
                                                                              np.float64), buf)
    np.testing.assert_allclose(buf.copy_to_host(), ref_g, rtol=1e-6, atol=1e-9)
    if v.elementwise:  # a 1-D out_loss takes row sums, as on the CPU
        sums = ck.device_array(n, np.float64)
        getattr(ck, v.kernel + "_fwd")(dx, dt, *opts, sums)
        np.testing.assert_allclose(sums.copy_to_host(), ref_l.sum(1), rtol=1e-12)


def test_device_helpers():
    y = np.array([0, 3, -100, 7, -1, 2])
    dy = cuda.to_device(y)
    assert ck.count_invalid_targets(dy, 4, -100) == 2  # 7 and -1
    assert ck.count_invalid_targets(dy, 8, -1) == 1  # -100
    assert ck.count_negative(cuda.to_device(np.array([[0.5, -0.0], [-2.0, np.nan]]))) == 1
    w = np.array([1.0, 2.0, 3.0, 4.0])
    assert ck.index_weight_sum(cuda.to_device(np.array([0, 3, -100, 3])), cuda.to_device(w),
                               -100) == 9.0
    assert ck.index_weight_sum(cuda.to_device(np.array([1, 1])), w, -100) == 4.0
    per = cuda.to_device(np.array([1.0, 2.0, 4.0]))
    assert ck.reduce_loss(per, "sum", 3.0, np.float32).copy_to_host()[0] == 7.0
    assert ck.reduce_loss(per, "mean", 2.0, np.float64).copy_to_host()[0] == 3.5
    assert np.isnan(ck.reduce_loss(per, "mean", 0.0, np.float64).copy_to_host()[0])
    none = ck.reduce_loss(per, "none", 3.0, np.float32)
    assert ck.is_device_array(none) and none.dtype == np.float32
    assert ck.is_device_array(ck.as_device(per)) and not ck.is_device_array(np.ones(2))
    with pytest.raises(TypeError):
        ck.as_device(np.ones(2))


def test_public_functions_take_device_arrays_and_return_device_arrays():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4, 9)).astype(np.float32)
    y = rng.integers(0, 9, 4)
    dx, dy = cuda.to_device(x), cuda.to_device(y)
    loss, grad = cs.cross_entropy_with_grad(dx, dy, backend="cuda", label_smoothing=0.1)
    assert ck.is_device_array(loss) and ck.is_device_array(grad)
    ref_l, ref_g = cs.cross_entropy_with_grad(x, y, label_smoothing=0.1)
    np.testing.assert_allclose(loss.copy_to_host()[0], ref_l, rtol=1e-6)
    np.testing.assert_allclose(grad.copy_to_host(), ref_g, rtol=1e-6, atol=1e-9)
    t = np.round(rng.uniform(size=x.shape)).astype(np.float32)
    out = cs.binary_cross_entropy_with_logits(dx, cuda.to_device(t), backend="cuda",
                                              reduction="none")
    assert ck.is_device_array(out)
    np.testing.assert_allclose(out.copy_to_host(),
                               cs.binary_cross_entropy_with_logits(x, t, reduction="none"),
                               rtol=1e-6)
