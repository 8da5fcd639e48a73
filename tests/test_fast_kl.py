"""The vectorised KL divergence kernels (``cpu_fast.kl_divergence_fwd`` / ``_fwd_grad``) and
their float64 log (``cpu_fast.log_f64``): against math.log, the oracle and the reference
kernels of ``cestudy.kernels.cpu`` (accuracy no worse, the same NaN / inf)."""

import math

import numpy as np
import pytest
from numba import njit

import cestudy
from cestudy.kernels import cpu, cpu_fast
from cestudy.reference import oracle

from helpers import CONTRACT_ULP, probs_target, soft_grad_scale

LD = np.longdouble
BLOCK = cpu_fast.BLOCK
SEVERAL_BLOCKS = [3 * BLOCK + 17, cpu_fast.PREMAX_CLASSES + BLOCK + 17]


# --------------------------------------------------------------------------------------------
# log_f64
# --------------------------------------------------------------------------------------------
@njit(fastmath={"contract"})
def _log_many(x, out):
    """log_f64 as the kernels run it: inlined into a loop with FMA contraction."""
    for i in range(x.shape[0]):
        out[i] = cpu_fast.log_f64(x[i])


@njit
def _log_many_no_fma(x, out):
    for i in range(x.shape[0]):
        out[i] = cpu_fast.log_f64(x[i])


def _log_inputs():
    rng = np.random.default_rng(0)
    sub = 2.0 ** rng.uniform(-1074, -1022, 20000)
    return np.concatenate(
        [
            np.exp(rng.uniform(-744, 709.7, 200000)),  # the whole normal range
            sub,
            np.array([5e-324, 1e-323, 2.2250738585072009e-308, 2.2250738585072014e-308]),
            1.0 + rng.uniform(-1e-6, 1e-6, 20000),  # log near 0: relative accuracy
            1.0 + np.ldexp(1.0, -np.arange(1, 53)),
            1.0 - np.ldexp(1.0, -np.arange(1, 54)),
            np.ldexp(1.0, np.arange(-1074, 1024)),  # powers of 2
            rng.uniform(0.5, 2.0, 100000),
            math.sqrt(2.0) * (1.0 + rng.uniform(-1e-3, 1e-3, 20000)),  # fdlibm's reduction edge
            math.sqrt(0.5) * (1.0 + rng.uniform(-1e-3, 1e-3, 20000)),
            np.array([np.finfo(np.float64).max, np.nextafter(1.0, 2.0), np.nextafter(1.0, 0.0)]),
        ]
    )


@pytest.mark.parametrize("run", [_log_many, _log_many_no_fma])
def test_log_f64_within_one_ulp_of_the_exact_log_over_the_whole_range(run):
    x = _log_inputs()
    got = np.empty_like(x)
    run(x, got)
    libm = np.array([math.log(v) for v in x])
    exact = np.log(x.astype(LD))
    ulp = np.spacing(np.abs(libm)).astype(LD)
    exact_zero = libm == 0.0  # log(1) = 0 exactly
    assert np.all(got[exact_zero] == 0.0)
    err = (np.abs(got.astype(LD) - exact)[~exact_zero] / ulp[~exact_zero]).astype(np.float64)
    assert err.max() < 1.0, (err.max(), x[~exact_zero][err.argmax()])
    # and it is math.log to the bit on most inputs
    assert np.mean(got == libm) > 0.9


@pytest.mark.parametrize("v", [0.0, -0.0, np.inf, -np.inf, np.nan, -1.0, -5e-324, -np.nan])
def test_log_f64_special_values_as_math_log(v):
    got = np.empty(1)
    _log_many(np.array([v]), got)
    if v == 0.0:
        expected = -np.inf
    elif v < 0 or math.isnan(v):
        expected = np.nan
    else:
        expected = math.log(v)
    np.testing.assert_array_equal(got, [expected])


# --------------------------------------------------------------------------------------------
# The kernels: every path agrees with itself (forward = fused, in place, serial)
# --------------------------------------------------------------------------------------------
def _run(module, x, p, scale=0.5):
    n = x.shape[0]
    loss = np.empty(n)
    fused = np.empty(n)
    grad = np.empty_like(x)
    module.kl_divergence_fwd(x, p, loss)
    module.kl_divergence_fwd_grad(x, p, scale, fused, grad)
    np.testing.assert_array_equal(loss, fused)
    return loss, grad


def run_fast(x, p, scale=0.5):
    """The fast kernels' loss and gradient; checks on the way that the fused loss is the forward
    loss, that in place equals out of place and that the serial twins equal the kernels."""
    loss, grad = _run(cpu_fast, x, p, scale)
    xi = x.copy()
    loss_in = np.empty(x.shape[0])
    cpu_fast.kl_divergence_fwd_grad(xi, p, scale, loss_in, xi)
    np.testing.assert_array_equal(loss_in, loss)
    np.testing.assert_array_equal(xi, grad)
    loss_s = np.empty(x.shape[0])
    grad_s = np.empty_like(x)
    cpu_fast.kl_divergence_fwd_serial(x, p, loss_s)
    np.testing.assert_array_equal(loss_s, loss)
    cpu_fast.kl_divergence_fwd_grad_serial(x, p, scale, loss_s, grad_s)
    np.testing.assert_array_equal(loss_s, loss)
    np.testing.assert_array_equal(grad_s, grad)
    return loss, grad


def _kl_err(loss, x, p, dtype):
    """Per-row error of KL in ulps (of ``dtype``) of max(|KL|, H(p, q)), the contract's scale;
    0 where value and exact are the same non-finite value, inf on a NaN / inf mismatch."""
    exact = oracle.kl_divergence(x, p)
    scale = np.maximum(np.abs(exact), oracle.cross_entropy_probs(x, p))
    v = loss.astype(dtype).astype(np.float64)
    return _err_of_scale(v, exact, scale, dtype)


def _grad_err(grad, x, p, scale, dtype):
    exact = oracle.kl_divergence_grad(x, p) * LD(scale)
    ref_scale = soft_grad_scale(x, probs_target(p)) * LD(scale)
    return _err_of_scale(grad, exact, ref_scale, dtype)


def _err_of_scale(value, exact, scale, dtype):
    err = oracle.ulp_error(value, exact, dtype)  # inf on mismatches, 0 on equal values
    v = np.asarray(np.asarray(value).astype(np.float64), LD)
    scale = np.broadcast_to(np.asarray(scale, LD), exact.shape)
    fin = np.isfinite(v) & np.isfinite(exact) & (err > 0)
    with np.errstate(over="ignore", invalid="ignore"):
        err[fin] = (np.abs(v - exact)[fin] / oracle.ulp(scale[fin], dtype)).astype(np.float64)
    return err


def check_against_oracle_and_reference(x, p, scale=0.5, tol=CONTRACT_ULP, slack=0.5):
    """The fast kernels within ``tol`` ulp (the contract's scales) of the oracle, and no worse
    than the reference kernels on the same rows (their worst error plus ``slack`` ulp: the two
    round differently); NaN and inf where the reference kernels have them."""
    dtype = x.dtype.type
    loss, grad = run_fast(x, p, scale)
    ref_loss, ref_grad = _run(cpu, x, p, scale)
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(ref_loss))
    np.testing.assert_array_equal(np.isinf(loss), np.isinf(ref_loss))
    np.testing.assert_array_equal(np.isnan(grad), np.isnan(ref_grad))
    np.testing.assert_array_equal(np.isinf(grad), np.isinf(ref_grad))
    e_fast = _kl_err(loss, x, p, dtype)
    e_ref = _kl_err(ref_loss, x, p, dtype)
    g_fast = _grad_err(grad, x, p, scale, dtype)
    g_ref = _grad_err(ref_grad, x, p, scale, dtype)
    assert e_fast.max() <= max(tol, e_ref.max() + slack), (e_fast.max(), e_ref.max())
    assert g_fast.max() <= max(tol, g_ref.max() + slack), (g_fast.max(), g_ref.max())
    assert e_fast.max() <= e_ref.max() + slack, (e_fast.max(), e_ref.max())
    assert g_fast.max() <= g_ref.max() + slack, (g_fast.max(), g_ref.max())
    return loss, grad, (e_fast.max(), e_ref.max(), g_fast.max(), g_ref.max())


DTYPES = [np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [1, 2, 7, 1000, BLOCK])
def test_random_rows_match_the_oracle_and_the_reference(dtype, c):
    rng = np.random.default_rng(c)
    n = 24
    x = (rng.normal(size=(n, c)) * 10.0 ** rng.uniform(-2, 2, (n, 1))).astype(dtype)
    p = rng.dirichlet(np.full(c, 0.5), n).astype(dtype)
    p[::5] *= 3.0  # rows need not sum to 1
    check_against_oracle_and_reference(x, p)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [3, 10, cpu_fast.SHORT_CLASSES])
def test_short_rows_in_lanes_match_the_oracle_and_the_reference(dtype, c):
    """Rows of at most SHORT_CLASSES classes run LANES at a time, forward and fused (run_fast
    checks the same bits): named extreme rows in the first group of lanes and in the last
    rows."""
    x, p = _short_rows(c)
    check_against_oracle_and_reference(x.astype(dtype), p.astype(dtype))


def _short_rows(c):
    """Rows of c classes, three groups of lanes and five rows more, the named extreme rows in
    the first group and in the last five rows (the row path)."""
    rng = np.random.default_rng(c)
    n = 3 * cpu_fast.LANES + 5
    x = rng.normal(size=(n, c)) * 10.0 ** rng.uniform(-2, 2, (n, 1))
    p = rng.dirichlet(np.full(c, 0.5), n)
    for base in (0, n - 5):
        p[base] = np.exp(x[base] - x[base].max())  # target_equals_softmax: KL ~ 0
        p[base] /= p[base].sum()
        x[base + 1, 0] = -np.inf  # zero_target_on_masked_class
        p[base + 1, 0] = 0.0
        x[base + 2, 0] = -np.inf  # mass_on_masked_class: +inf
        x[base + 3, c - 1] = np.nan  # nan_row
        x[base + 4] = 1e8  # equal_logits_offset_1e8
    p[7] *= 1e300  # target_sum_overflows (float32: inf targets): P q_j - p_j with P = inf
    return x, p


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [1, 3, 10, cpu_fast.SHORT_CLASSES])
def test_fused_short_rows_in_lanes_give_the_row_paths_bits(dtype, c):
    """The fused kernel's lanes (rows of at most SHORT_CLASSES classes) give the row path's
    loss and gradient bit for bit, in place too (the row path: ``_kl_chunk``)."""
    x, p = _short_rows(c)
    x, p = x.astype(dtype), p.astype(dtype)
    n = x.shape[0]
    loss, grad = np.empty(n), np.empty_like(x)
    cpu_fast.kl_divergence_fwd_grad(x, p, 0.5, loss, grad)
    row_loss, row_grad = np.empty(n), np.empty_like(x)
    cpu_fast._kl_chunk(0, 1, x, p, 0.5, True, False, row_loss, row_grad)
    np.testing.assert_array_equal(loss, row_loss)
    np.testing.assert_array_equal(grad, row_grad)
    inplace = x.copy()
    cpu_fast.kl_divergence_fwd_grad(inplace, p, 0.5, loss, inplace)
    np.testing.assert_array_equal(inplace, row_grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_targets_on_masked_classes_are_not_nan(dtype):
    """Guards 0 * inf = NaN: p_c = 0 with x_c = -inf contributes 0 (0 log 0 = 0), also to the
    gradient; TwoSum's error term of m - (-inf) is NaN and must not leak."""
    rng = np.random.default_rng(2)
    c = 300
    x = rng.normal(size=(8, c)).astype(dtype) * 4
    p = rng.dirichlet(np.full(c, 0.3), 8).astype(dtype)
    x[:, ::3] = -np.inf
    p[:, ::3] = 0.0
    p[1, 1::3] = 0.0  # zeros on finite logits too
    p[2] = 0.0  # an all-zero target: KL 0, gradient 0
    loss, grad, _ = check_against_oracle_and_reference(x, p)
    assert np.isfinite(loss).all() and np.isfinite(grad).all()
    assert loss[2] == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_mass_on_a_masked_class_gives_inf_as_the_reference(dtype):
    """Guards the NaN of TwoSum at m - (-inf): p_c > 0 on x_c = -inf is KL = +inf (the reference
    kernel and the oracle), not NaN."""
    x = np.array([[0.0, 1.0, -np.inf, 2.0]], dtype)
    p = np.array([[0.25, 0.25, 0.25, 0.25]], dtype)
    loss, grad, _ = check_against_oracle_and_reference(x, p)
    assert loss[0] == np.inf
    assert np.isfinite(grad).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rel", [1e-3, 1e-5])
def test_target_close_to_softmax_does_not_cancel(dtype, rel):
    """Guards the H(p, q) - H(p) formulation: p = softmax(x) (1 + small), KL ~ rel^2 (1e-10 for
    rel = 1e-5); each term keeps log(p/q) = (m - x_c) + L + log p_c summed per class, as the
    reference kernel does."""
    rng = np.random.default_rng(3)
    c = 1000
    x = (rng.normal(size=(16, c)) * 2).astype(dtype)
    q = oracle.softmax(x).astype(np.float64)
    p = q * (1 + rel * rng.normal(size=q.shape))
    p = (p / p.sum(axis=1, keepdims=True)).astype(dtype)
    loss, _, _ = check_against_oracle_and_reference(x, p)
    exact = oracle.kl_divergence(x, p).astype(np.float64)
    # KL ~ rel^2 / 2 (plus, in float32, the first-order term of sum p - 1 = O(1e-8)), against
    # H(p, q) ~ 6: a relative cancellation of 1e-7 .. 1e-12
    assert np.all(np.abs(exact) < 10 * rel**2 + (1e-7 if dtype == np.float32 else 0.0))
    assert np.all(np.isfinite(loss))


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_logit_gaps_keep_the_exact_difference(dtype):
    """Guards a rounded m - x_c (|x| up to 1e3: the difference carries u |m - x_c| of error into
    each term) and an overflowing exp: logits of either sign up to 1e3, confident rows whose
    softmax is exactly one class in float64."""
    rng = np.random.default_rng(4)
    c = 500
    x = rng.uniform(-1e3, 1e3, (12, c)).astype(dtype)
    x[3] = rng.uniform(-1e3, -999, c).astype(dtype)  # near-ties at a large negative offset
    x[4, 7] = 1e3  # one dominant class: q_7 = 1 in float64
    x[4, :7] = -1e3
    p = rng.dirichlet(np.full(c, 0.5), 12).astype(dtype)
    p[5] = 0.0
    p[5, int(np.argmax(x[5]))] = 1.0  # KL tiny (a confident, correct row)
    check_against_oracle_and_reference(x, p)


@pytest.mark.parametrize("dtype", DTYPES)
def test_subnormal_targets_take_the_scaled_log(dtype):
    """Guards log_f64's subnormal path (exponent read after scaling by 2^54)."""
    tiny = np.finfo(dtype).smallest_subnormal
    x = np.zeros((3, 8), dtype)
    x[:, 1] = 3.0
    p = np.full((3, 8), 0.1, dtype)
    p[0, 2] = tiny
    p[1, :4] = tiny * 7
    p[2, 5] = np.finfo(dtype).tiny / 3
    check_against_oracle_and_reference(x, p)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_rows_as_the_reference_kernel(dtype):
    """NaN logit, +inf logit, all -inf: NaN loss and NaN gradient row; a NaN or inf target: the
    reference kernel's NaN / inf, entry by entry."""
    c = 6
    x = np.tile(np.arange(c, dtype=dtype), (7, 1))
    p = np.full((7, c), 1.0 / c, dtype)
    x[0, 2] = np.nan
    x[1, 3] = np.inf
    x[2] = -np.inf
    x[3, 0] = -np.inf
    p[3, 0] = 0.0  # a masked class without mass: finite
    p[4, 1] = np.nan  # a NaN target
    p[5, 2] = np.inf  # an infinite target
    x[6, 4] = np.nan
    p[6, 4] = 0.0  # a NaN logit is a NaN row even where p = 0
    loss, grad = run_fast(x, p)
    ref_loss, ref_grad = _run(cpu, x, p)
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(ref_loss))
    np.testing.assert_array_equal(np.isinf(loss), np.isinf(ref_loss))
    np.testing.assert_allclose(loss[3], ref_loss[3], rtol=1e-7)
    np.testing.assert_array_equal(np.isnan(grad), np.isnan(ref_grad))
    np.testing.assert_array_equal(np.isinf(grad), np.isinf(ref_grad))
    assert np.isnan(loss[[0, 1, 2, 4, 6]]).all() and loss[5] == np.inf
    assert np.isnan(grad[[0, 1, 2, 4, 6]]).all()
    assert np.isfinite(loss[3]) and np.isfinite(grad[3]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", SEVERAL_BLOCKS)
def test_rows_of_several_blocks(dtype, c):
    """C > BLOCK: the terms summed block by block (split sums, compensated across blocks); for
    float32 beyond PREMAX_CLASSES the first pass is the online (max, sum) with rescaling."""
    rng = np.random.default_rng(7)
    n = 4
    x = (rng.normal(size=(n, c)) * 3).astype(dtype)
    x[1, c - 5] = 40.0  # the maximum in the last block: the online pass rescales
    x[2, : c // 3] = -np.inf
    p = rng.dirichlet(np.full(c, 0.5), n).astype(dtype)
    p[2, : c // 3] = 0.0
    q = oracle.softmax(x[3:4]).astype(np.float64)
    p[3] = (q * (1 + 1e-4 * rng.normal(size=q.shape))).astype(dtype)  # p close to q
    check_against_oracle_and_reference(x, p)


def test_dispatch_runs_the_fast_kernels():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(64, 700))
    p = rng.dirichlet(np.full(700, 0.5), 64)
    loss = np.empty(64)
    cpu_fast.kl_divergence_fwd(x, p, loss)
    got = cestudy.kl_divergence(x, p, reduction="none")
    np.testing.assert_array_equal(got, loss)
    got_loss, got_grad = cestudy.kl_divergence_with_grad(x, p, reduction="sum")
    grad = np.empty_like(x)
    cpu_fast.kl_divergence_fwd_grad(x, p, 1.0, loss, grad)
    np.testing.assert_array_equal(got_grad, grad)
