"""Every CUDA kernel, run in the simulator on small shapes with few threads per block (so that
several blocks and the whole group reduction run), against the oracle and the CPU kernels.

tests/test_cuda.py starts this module with 8 threads per block and 2 elements per thread, so a
row of 29 classes spreads over the whole block and one of 200 runs the 8-load chunks. The
simulator reduces with shared-memory trees; ``shuffle`` tests run the warp-shuffle code on
emulated shuffles (a 4-lane warp, so that 8-thread groups take the cross-warp step too)."""

import os

import ml_dtypes
import numpy as np
import pytest
from numba import cuda

import cestudy as cs
from cestudy import dtypes, variants
from cestudy.kernels import cpu, cpu_fast
from cestudy.kernels import cuda as ck
from cestudy.reference import oracle

from helpers import assert_grad_ulp, assert_ulp

DTYPES = [np.float32, np.float64]
BF16 = dtypes.bfloat16
F16 = dtypes.float16
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


@pytest.fixture(params=["tree", "shuffle"])
def method(request, monkeypatch):
    """Both group reductions: shared-memory trees, and warp shuffles (emulated here)."""
    monkeypatch.setenv("CESTUDY_CUDA_REDUCTION", request.param)
    return request.param


def test_backend_reports_the_simulator_or_the_gpu():
    from cestudy import backends

    ok, desc = backends.cuda_status()
    assert ok
    if SIMULATOR:
        assert "simulator" in desc.lower()
        assert ck.kernels()["threads"] == 8  # CESTUDY_CUDA_THREADS from tests/test_cuda.py
        assert ck.reduction_method() == "tree"
    else:
        assert "compute capability" in desc
        assert ck.reduction_method() == "shuffle"


def rows(dtype, rng):
    x = rng.normal(size=(7, 29)) * 4
    x[0, 3] += 40  # confident-correct (tiny loss)
    x[1] = 1e6  # equal logits at an offset (all ties)
    x[2, ::3] = -np.inf  # masked classes
    x[3, 5] = x[3, 6] = 9.0  # ties at the max
    x[3] = np.minimum(x[3], 9.0)
    return x.astype(dtype)


def to_device(a):
    """A device array of any float dtype (bfloat16 as its bits)."""
    if a.dtype == BF16:
        return ck.bfloat16_bits(cuda.to_device(a.view(np.uint16)))
    return cuda.to_device(a)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "opts", [{}, {"label_smoothing": 0.1, "weight": True}, {"ignore_index": 4}]
)
def test_cross_entropy_index(dtype, opts):
    rng = np.random.default_rng(0)
    x = rows(dtype, rng)
    y = np.array([3, 0, 1, 5, 4, 4, 10])
    o = dict(opts)
    w = rng.uniform(0.5, 2, 29) if o.pop("weight", False) else None
    loss, grad = cs.cross_entropy_with_grad(x, y, weight=w, reduction="none", backend="cuda", **o)
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
    """c = 2 and 5 pack several rows into a block (threads per row < threads), with idle rows
    in the last block; c = 200 spreads a row over the whole block."""
    rng = np.random.default_rng(c)
    n = 11
    x = (rng.normal(size=(n, c)) * 20).astype(dtype)
    y = np.where(np.arange(n) % 2 == 0, np.argmax(x, 1), rng.integers(0, c, n))
    y[3] = -100
    loss, grad = cs.cross_entropy_with_grad(
        x, y, reduction="none", backend="cuda", label_smoothing=0.05
    )
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
    loss, grad = cs.cross_entropy_with_grad(
        x, np.array([0, 1, 2, 2]), reduction="none", backend="cuda"
    )
    assert np.isnan(loss[:3]).all() and np.isnan(grad[:3]).all() and np.isfinite(grad[3]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_soft_targets_kl_and_focal(dtype):
    rng = np.random.default_rng(1)
    x = rows(dtype, rng)
    x[2] = rng.normal(size=29)  # soft targets put mass everywhere
    p = rng.dirichlet(np.ones(29), 7).astype(dtype)
    for fn, ref, ref_g in (
        (
            lambda b: cs.cross_entropy_with_grad(x, p, reduction="none", backend=b),
            oracle.cross_entropy_probs(x, p),
            oracle.cross_entropy_probs_grad(x, p),
        ),
        (
            lambda b: cs.kl_divergence_with_grad(x, p, reduction="none", backend=b),
            oracle.kl_divergence(x, p),
            oracle.kl_divergence_grad(x, p),
        ),
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
    loss, grad = cs.binary_cross_entropy_with_logits_with_grad(
        x, t, pos_weight=pw, reduction="none", backend="cuda"
    )
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


# --------------------------------------------------------------------------------------------
# float32 arithmetic: the exp, bfloat16 bits, extreme rows
# --------------------------------------------------------------------------------------------
@pytest.mark.simulator_only
def test_exp32_of_an_exact_difference_is_within_0_65_ulp():
    """exp32_diff(v, m) = exp(v - m) 2^96 from the TwoSum pair, against long double, over
    differences down to -150 (terms that are float32 subnormals unscaled) and large |m|."""
    rng = np.random.default_rng(5)
    m = np.concatenate([rng.uniform(-300, 300, 1500), rng.uniform(-1, 1, 500) * 1e6]).astype(
        np.float32
    )
    d = -np.concatenate([rng.uniform(0, 150, 1000), rng.exponential(3, 1000)])
    v = (m + d).astype(np.float32)
    keep = (v <= m) & (v.astype(np.float64) - m >= -150)
    got = np.array([float(ck.exp32_diff(a, b)) for a, b in zip(v[keep], m[keep])])
    exact = np.exp(v[keep].astype(np.longdouble) - m[keep]) * np.longdouble(2) ** 96
    err = np.abs(got - exact) / np.spacing(exact.astype(np.float32)).astype(np.longdouble)
    assert err.max() <= 0.65, float(err.max())
    assert ck.exp32_diff(np.float32(-np.inf), np.float32(0)) == 0
    assert ck.exp32_diff(np.float32(1), np.float32(np.inf)) == 0
    assert ck.exp32_diff(np.float32(0), np.float32(0)) == ck.BIASED_ONE
    assert np.isnan(ck.exp32_diff(np.float32(np.nan), np.float32(0)))


@pytest.mark.simulator_only
def test_bfloat16_bits_round_to_nearest_even_like_ml_dtypes():
    rng = np.random.default_rng(6)
    f = (rng.standard_normal(20000) * 10.0 ** rng.integers(-44, 38, 20000)).astype(np.float32)
    ties = ((rng.integers(0, 2**16, 2000).astype(np.uint32) << 16) | 0x8000).view(np.float32)
    special = np.array(
        [0.0, -0.0, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-45, 1e-40, np.nan], np.float32
    )
    f = np.concatenate([f, ties, special])
    got = np.array([ck.f32_to_bf16(v) for v in f], np.uint16)
    ref = f.astype(ml_dtypes.bfloat16).view(np.uint16)
    nan = np.isnan(f)
    np.testing.assert_array_equal(got[~nan], ref[~nan])
    assert np.isnan(got[nan].view(ml_dtypes.bfloat16).astype(np.float32)).all()
    back = np.array([ck.bf16_to_f32(b) for b in ref[~nan]], np.float32)
    np.testing.assert_array_equal(back, ref[~nan].view(ml_dtypes.bfloat16).astype(np.float32))


def extreme_rows(c=200):
    """float32 rows that stress the float32 arithmetic, with their targets."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(9, c)).astype(np.float32)
    x[0] = 0
    x[0, 5] = 100  # loss 199 e^-100 = 7e-42: a float32 subnormal
    x[1] = 0
    x[1, 7] = 30  # loss ~1e-11, gradients ~1e-13
    x[2] = np.linspace(0, 1e-3, c)  # ascending: the maximum moves at every chunk
    x[3] = np.linspace(-50, 0, c)  # ascending, wide
    x[4] = 1e8 + np.arange(c) % 3 * 8.0  # large offset, exact differences of 8
    x[5, ::2] = -np.inf  # masked half
    x[6] = rng.normal(size=c) * 40  # gaussian at scale 40
    x[7] = 0.1 + rng.uniform(0, 1e-6, c)  # near-equal logits
    x[8] = -rng.exponential(30, c)  # terms down to underflow
    y = np.array([5, 7, c - 1, 0, 2, 1, 3, c // 2, 0])
    return x.astype(np.float32), y


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("c", [29, 200])
def test_extreme_rows_on_device_arrays_within_the_contract(method, c, dtype):
    """Device arrays: per-row losses and every gradient entry (hard targets) within 4 ulp of
    the oracle (float32) or 1 ulp (bfloat16, computed in float32 and rounded once), confident
    rows with subnormal losses and moving maxima included."""
    x, y = extreme_rows(c)
    x = x.astype(dtype)
    tol = 4 if dtype == np.float32 else 1
    loss, grad = cs.cross_entropy_with_grad(
        to_device(x), cuda.to_device(y), reduction="none", backend="cuda"
    )
    assert loss.dtype == np.float32 and grad.dtype == dtype
    assert_ulp(loss.copy_to_host().astype(dtype), oracle.cross_entropy(x, y), dtype, tol=tol)
    assert_ulp(grad.copy_to_host(), oracle.cross_entropy_grad(x, y), dtype, tol=tol, what="grad")


# --------------------------------------------------------------------------------------------
# 16-bit device logits
# --------------------------------------------------------------------------------------------
def rows16(dtype, c=29):
    rng = np.random.default_rng(8)
    x = rng.normal(size=(6, c)) * 3
    x[0, 3] += 12  # confident (float16 holds e^-12)
    x[1] = 200.0  # ties at an offset
    x[2, ::3] = -np.inf  # masked classes
    x[3, 1] = x[3, 4] = x[3].max() + 1  # tied maxima
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("c", [5, 200])
def test_16bit_device_logits(method, dtype, c):
    """float16 and bfloat16 device logits: losses in float32 and gradients in the input dtype,
    within the contract in the input's precision, for every softmax-family kernel."""
    x = rows16(dtype, c)
    rng = np.random.default_rng(9)
    y = rng.integers(0, c, x.shape[0])
    y[0] = 3 % c
    y[4] = -100
    w = rng.uniform(0.5, 2, c)
    p = rng.dirichlet(np.ones(c), x.shape[0]).astype(np.float32)
    dx, dy, dp = to_device(x), cuda.to_device(y), cuda.to_device(p)
    cases = [
        (
            lambda: cs.cross_entropy_with_grad(dx, dy, weight=w, reduction="none", backend="cuda"),
            oracle.cross_entropy(x, y, w),
            oracle.cross_entropy_grad(x, y, w),
        ),
        (
            lambda: cs.cross_entropy_with_grad(
                dx, dy, label_smoothing=0.1, reduction="none", backend="cuda"
            ),
            oracle.cross_entropy(x, y, label_smoothing=0.1),
            oracle.cross_entropy_grad(x, y, label_smoothing=0.1),
        ),
        (
            lambda: cs.cross_entropy_with_grad(dx, dp, reduction="none", backend="cuda"),
            oracle.cross_entropy_probs(x, p),
            oracle.cross_entropy_probs_grad(x, p),
        ),
        (
            lambda: cs.kl_divergence_with_grad(dx, dp, reduction="none", backend="cuda"),
            oracle.kl_divergence(x, p),
            oracle.kl_divergence_grad(x, p),
        ),
        (
            lambda: cs.softmax_focal_loss_with_grad(dx, dy, reduction="none", backend="cuda"),
            oracle.softmax_focal_loss(x, y),
            oracle.softmax_focal_loss_grad(x, y),
        ),
    ]
    for fn, ref_l, ref_g in cases:
        loss, grad = fn()
        assert loss.dtype == np.float32 and grad.dtype == dtype
        assert_ulp(loss.copy_to_host().astype(dtype), ref_l, dtype, tol=1)
        assert_grad_ulp(grad.copy_to_host(), ref_g, dtype, tol=1)
    mean = cs.cross_entropy(dx, dy, weight=w, backend="cuda").copy_to_host()
    host = cs.cross_entropy(x.astype(np.float32), y, weight=w)
    assert mean.dtype == np.float32 and mean[0] == pytest.approx(host, rel=4e-7, nan_ok=True)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bfloat16", "float16"])
def test_16bit_elementwise_device_logits(dtype):
    rng = np.random.default_rng(10)
    x = (rng.normal(size=(5, 9)) * 6).astype(dtype)
    t = np.round(rng.uniform(size=x.shape)).astype(np.float32)
    dx, dt = to_device(x), cuda.to_device(t)
    loss, grad = cs.binary_cross_entropy_with_logits_with_grad(
        dx, dt, reduction="none", backend="cuda"
    )
    assert loss.dtype == np.float32 and grad.dtype == dtype
    assert_ulp(
        loss.copy_to_host().astype(dtype),
        oracle.binary_cross_entropy_with_logits(x, t),
        dtype,
        tol=1,
    )
    assert_ulp(
        grad.copy_to_host(), oracle.binary_cross_entropy_with_logits_grad(x, t), dtype, tol=1
    )
    loss, grad = cs.sigmoid_focal_loss_with_grad(dx, dt, reduction="sum", backend="cuda")
    assert loss.shape == (1,) and grad.dtype == dtype
    assert_ulp(grad.copy_to_host(), oracle.sigmoid_focal_loss_grad(x, t), dtype, tol=1)
    assert loss.copy_to_host()[0] == pytest.approx(
        float(np.sum(oracle.sigmoid_focal_loss(x, t), dtype=np.float64)), rel=1e-6
    )


@pytest.mark.parametrize("dtype", [np.float32, BF16, F16], ids=["float32", "bfloat16", "float16"])
def test_gradient_written_into_the_logits(dtype):
    """out=logits: the gradient replaces the logits, in their dtype, equal to the gradient
    written elsewhere; the call returns ``out`` itself."""
    x = rows16(dtype, 200)[[0, 3, 5]]
    y = np.array([3, 4, 9])
    dx = to_device(x)
    loss_a, grad = cs.cross_entropy_with_grad(dx, cuda.to_device(y), backend="cuda")
    loss_b, same = cs.cross_entropy_with_grad(dx, cuda.to_device(y), backend="cuda", out=dx)
    assert same is dx
    np.testing.assert_array_equal(dx.copy_to_host(), grad.copy_to_host())
    assert loss_a.copy_to_host()[0] == loss_b.copy_to_host()[0]


# --------------------------------------------------------------------------------------------
# One launch per call, no host round trip, errors on request
# --------------------------------------------------------------------------------------------
class Launches:
    """Counts kernel launches (simulator or GPU)."""

    def __init__(self, monkeypatch):
        self.count = 0
        if SIMULATOR:
            from numba.cuda.simulator.kernel import FakeCUDAKernel

            call = FakeCUDAKernel.__call__

            def counted(kernel, *args):
                if not kernel._device:
                    self.count += 1
                return call(kernel, *args)

            monkeypatch.setattr(FakeCUDAKernel, "__call__", counted)
        else:
            from numba.cuda.dispatcher import _Kernel

            launch = _Kernel.launch

            def counted(kernel, *args, **kwargs):
                self.count += 1
                return launch(kernel, *args, **kwargs)

            monkeypatch.setattr(_Kernel, "launch", counted)


@pytest.mark.parametrize("variant", ["cross_entropy", "kl_divergence", "bce"])
def test_one_launch_per_call_and_no_host_transfer(variant, monkeypatch):
    """Device arrays in: each call is one kernel launch (a fused "mean" over class indices two:
    the weighted count first) and moves nothing between host and device."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(13, 37)).astype(np.float32)
    dx = cuda.to_device(x)
    if variant == "cross_entropy":
        dt = cuda.to_device(rng.integers(0, 37, 13))
        fwd, fused = cs.cross_entropy, cs.cross_entropy_with_grad
    elif variant == "kl_divergence":
        dt = cuda.to_device(rng.dirichlet(np.ones(37), 13).astype(np.float32))
        fwd, fused = cs.kl_divergence, cs.kl_divergence_with_grad
    else:
        dt = cuda.to_device(np.round(rng.uniform(size=x.shape)).astype(np.float32))
        fwd = cs.binary_cross_entropy_with_logits
        fused = cs.binary_cross_entropy_with_logits_with_grad
    grad = cuda.device_array_like(dx)
    expected = []
    for red in ("none", "sum", "mean"):  # warm-up: compiled kernels and cached buffers
        expected.append(
            (
                fwd(dx, dt, reduction=red, backend="cuda").copy_to_host(),
                fused(dx, dt, reduction=red, backend="cuda", out=grad)[0].copy_to_host(),
            )
        )

    def no_transfer(*args, **kwargs):
        raise AssertionError("host <-> device transfer")

    monkeypatch.setattr(cuda, "to_device", no_transfer)
    monkeypatch.setattr(type(dx), "copy_to_host", no_transfer)
    monkeypatch.setattr(type(dx), "copy_to_device", no_transfer)
    launches = Launches(monkeypatch)
    results = []
    for red in ("none", "sum", "mean"):
        before = launches.count
        a = fwd(dx, dt, reduction=red, backend="cuda")
        assert launches.count - before == 1, red
        b = fused(dx, dt, reduction=red, backend="cuda", out=grad)[0]
        twice = variant == "cross_entropy" and red == "mean"
        assert launches.count - before == (3 if twice else 2), red
        results.append((a, b))
    monkeypatch.undo()
    for (a, b), (ea, eb) in zip(results, expected):
        np.testing.assert_array_equal(a.copy_to_host(), ea)
        np.testing.assert_array_equal(b.copy_to_host(), eb)


def test_reductions_match_the_host(method):
    """sum and mean in the launch (block partial sums, the last block adds them) equal the host
    path's, with weights, ignored rows, many blocks, and the all-ignored NaN."""
    rng = np.random.default_rng(12)
    x = rng.normal(size=(41, 3)).astype(np.float32) * 5  # 3 classes: 8 rows a block, 6 blocks
    y = rng.integers(0, 3, 41)
    y[::4] = -100
    w = np.array([0.5, 2.0, 1.5])
    dx, dy, dw = cuda.to_device(x), cuda.to_device(y), cuda.to_device(w)
    for red in ("sum", "mean"):
        loss, grad = cs.cross_entropy_with_grad(dx, dy, weight=dw, reduction=red, backend="cuda")
        ref_l, ref_g = cs.cross_entropy_with_grad(x, y, weight=w, reduction=red)
        assert loss.copy_to_host()[0] == pytest.approx(ref_l, rel=4e-7)
        np.testing.assert_allclose(grad.copy_to_host(), ref_g, rtol=4e-7, atol=1e-12)
    ignored = cuda.to_device(np.full(41, -100))
    loss, grad = cs.cross_entropy_with_grad(dx, ignored, backend="cuda")
    assert np.isnan(loss.copy_to_host()[0]) and not grad.copy_to_host().any()


def test_bad_device_input_gives_nan_rows_and_raises_on_request(monkeypatch):
    x = np.zeros((4, 5), np.float32)
    y = np.array([0, 7, -1, 2])
    dx, dy = cuda.to_device(x), cuda.to_device(y)
    with pytest.raises(ValueError, match="out of range"):  # an earlier call's counts, if any
        cs.cross_entropy(dx, dy, backend="cuda")
        ck.raise_device_errors()
    loss, grad = cs.cross_entropy_with_grad(dx, dy, reduction="none", backend="cuda")
    loss, grad = loss.copy_to_host(), grad.copy_to_host()
    assert np.isnan(loss[1:3]).all() and np.isnan(grad[1:3]).all()
    assert np.isfinite(loss[[0, 3]]).all() and np.isfinite(grad[[0, 3]]).all()
    with pytest.raises(ValueError, match="2 class indices out of range"):
        ck.raise_device_errors()
    ck.raise_device_errors()  # the counts were reset
    p = cuda.to_device(np.array([[0.5, -0.5, 1, 0, 0]] * 4, np.float32))
    monkeypatch.setenv("CESTUDY_CUDA_CHECKS", "sync")
    with pytest.raises(ValueError, match="negative entries"):
        cs.cross_entropy(dx, p, backend="cuda")
    with pytest.raises(ValueError, match="out of range"):
        cs.cross_entropy(dx, dy, backend="cuda")
    cs.cross_entropy(dx, cuda.to_device(np.array([0, 1, 2, 3])), backend="cuda")


# --------------------------------------------------------------------------------------------
# The raw kernels and helpers
# --------------------------------------------------------------------------------------------
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
    getattr(cpu_fast if v.fast_cpu else cpu, v.kernel + "_fwd_grad")(x, t, *opts, 1.0, ref_l, ref_g)
    np.testing.assert_allclose(d_loss.copy_to_host(), ref_l, rtol=1e-6)
    np.testing.assert_allclose(d_grad.copy_to_host(), ref_g, rtol=1e-6, atol=1e-9)
    d_fwd = ck.device_array(loss_shape, np.float64)
    getattr(ck, v.kernel + "_fwd")(dx, dt, *opts, d_fwd)
    np.testing.assert_array_equal(d_fwd.copy_to_host(), d_loss.copy_to_host())
    buf = cuda.to_device(x)
    getattr(ck, v.kernel + "_fwd_grad")(
        buf, dt, *opts, 1.0, ck.device_array(loss_shape, np.float64), buf
    )
    np.testing.assert_allclose(buf.copy_to_host(), ref_g, rtol=1e-6, atol=1e-9)
    if v.elementwise:  # a 1-D out_loss takes row sums, as on the CPU
        sums = ck.device_array(n, np.float64)
        getattr(ck, v.kernel + "_fwd")(dx, dt, *opts, sums)
        np.testing.assert_allclose(sums.copy_to_host(), ref_l.sum(1), rtol=1e-12)


def test_device_helpers():
    w = np.array([1.0, 2.0, 3.0, 4.0])
    k = ck.kernels()
    ws = ck.workspace()
    k["index_weight_sum"][1, k["threads"]](
        cuda.to_device(np.array([0, 3, -100, 3, 9, -1])), cuda.to_device(w), -100, ws
    )
    assert ws[ck.WS_DENOM : ck.WS_DENOM + 1].copy_to_host()[0] == 9.0  # 9 and -1: out of range
    bits = cuda.to_device(np.array([[1.5, -2.0]], ml_dtypes.bfloat16).view(np.int16))
    b = ck.bfloat16_bits(bits)
    assert b.dtype == BF16 and b.shape == (1, 2) and b.bits.dtype == np.uint16
    assert ck.is_device_array(b) and ck.as_device_logits(b) is b and ck.kind_of(b) == "bfloat16"
    np.testing.assert_array_equal(b.copy_to_host().astype(np.float32), [[1.5, -2.0]])
    wide = ck.as_device_values(b)
    assert wide.dtype == np.float32 and (wide.copy_to_host() == [[1.5, -2.0]]).all()
    assert ck.kind_of(cuda.to_device(np.ones(2, np.float16))) == "float16"
    with pytest.raises(TypeError, match="uint16 or int16"):
        ck.bfloat16_bits(cuda.to_device(np.ones(2, np.float32)))
    with pytest.raises(TypeError, match="no CUDA kernels"):
        ck.kind_of(cuda.to_device(np.ones(2, np.int32)))
    assert ck.is_device_array(ck.as_device(cuda.to_device(w))) and not ck.is_device_array(w)
    with pytest.raises(TypeError):
        ck.as_device(np.ones(2))
    assert ck.row_config(200, 8, 2) == (8, 1) and ck.row_config(5, 8, 2) == (4, 2)
    assert ck.row_config(131072, 1024, 32) == (1024, 1)
    assert ck.row_config(1024, 1024, 32) == (32, 32)


def test_dlpack_objects_are_read_through_torch():
    """An object that only speaks DLPack (here a host one) goes through torch.from_dlpack; a
    torch bfloat16 tensor through its int16 view; host memory is refused."""
    torch = pytest.importorskip("torch")

    class OnlyDLPack:
        def __init__(self, t):
            self.t = t

        def __dlpack__(self, **kwargs):
            return self.t.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self.t.__dlpack_device__()

    for t in (torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(2, 3)):
        for obj in (t, OnlyDLPack(t)):
            with pytest.raises(TypeError, match="device array"):
                ck.as_device_logits(obj)


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
    out = cs.binary_cross_entropy_with_logits(
        dx, cuda.to_device(t), backend="cuda", reduction="none"
    )
    assert ck.is_device_array(out)
    np.testing.assert_allclose(
        out.copy_to_host(), cs.binary_cross_entropy_with_logits(x, t, reduction="none"), rtol=1e-6
    )
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        cs.cross_entropy(cuda.to_device(np.ones((2, 3), np.int16)), dy[:2], backend="cuda")


@pytest.mark.gpu_only
def test_torch_cuda_tensors_bfloat16_in_place():
    """torch CUDA tensors: bfloat16 (through its int16 view) and float16, the gradient written
    into the logits tensor itself."""
    torch = pytest.importorskip("torch")
    assert torch.cuda.is_available()
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        x = (torch.randn(64, 1000, device="cuda") * 4).to(dt)
        y = torch.randint(0, 1000, (64,), device="cuda")
        xr = x.detach().float().requires_grad_(True)
        ref = torch.nn.functional.cross_entropy(xr, y)
        ref.backward()
        loss, g = cs.cross_entropy_with_grad(x, y, backend="cuda", out=x)
        assert g is x and x.dtype == dt
        assert float(torch.as_tensor(loss, device="cuda")[0]) == pytest.approx(float(ref), rel=1e-5)
        torch.testing.assert_close(x.float(), xr.grad.to(dt).float(), rtol=0.01, atol=1e-7)


@pytest.mark.simulator_only
def test_gpu_benchmark_checks_run_and_record_no_timing(tmp_path):
    """``bench --backend cuda`` in the simulator: the oracle checks of every row (float32 and
    bfloat16, each block size) run through the public functions; every timing is None."""
    import argparse
    import json

    from cestudy.bench import command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    out = tmp_path / "cuda_bench.json"
    args = parser.parse_args(["--backend", "cuda", "--shapes", "8x300", "--json", str(out)])
    assert command.main(args) == 0
    doc = json.loads(out.read_text())
    assert doc["timed"] is False and doc["read_bandwidth_gbs"] is None
    rows = doc["rows"]
    assert {(r["dtype"], r["kernel"]) for r in rows} == {
        (d, k)
        for d in ("float32", "bfloat16")
        for k in ("cestudy forward", "cestudy forward+grad", "cestudy forward+grad inplace")
    }
    for r in rows:
        assert r["ms"] is None and r["frac_read_bw"] is None and r["vs_torch"] is None
        assert r["ulp"] <= 1 and r["grad_ulp"] <= 1, r
    assert all(r["host_us_per_call"] is None for r in doc["call_overhead"])
