"""The vectorised float32 kernels (cestudy.kernels.cpu_fast) and what every CPU kernel promises
beyond its values: their exp and maximum over the whole input range, the same extreme cases and
contract as the reference kernels (rows of one block and of several), gradients written over the
logits (in place) equal to gradients written elsewhere, and serial twins equal to the parallel
kernels."""

import ctypes
import math
import mmap
import sys

import numpy as np
import pytest
from numba import njit

import cestudy
from cestudy import variants
from cestudy.kernels import cpu, cpu_fast
from cestudy.reference import oracle

from helpers import (
    assert_ulp,
    assert_ulp_of_scale,
    focal_tol,
    probs_target,
    smoothed_index_target,
    soft_grad_scale,
)

LD = np.longdouble
BLOCK = cpu_fast.BLOCK


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
@njit
def _exp_many(d, out):
    for i in range(d.shape[0]):
        out[i] = cpu_fast.exp_neg(d[i])


def test_exp_neg_relative_error_over_its_whole_input_range():
    d = np.concatenate(
        [
            -np.logspace(-300, np.log10(708), 200000),
            np.linspace(-708, 0, 200001),
            [0.0, -0.0, -708.0],
        ]
    )
    out = np.empty_like(d)
    _exp_many(d, out)
    exact = np.exp(d.astype(np.longdouble))
    rel = np.abs(out - exact) / exact
    assert rel.max() < 1e-11  # 7e-12 truncation bound of the degree-9 polynomial, 2e-4 f32 ulp
    special = np.array([-709.0, -1e4, -np.inf, np.nan])
    out = np.empty_like(special)
    _exp_many(special, out)
    assert out[0] == 0 and out[1] == 0 and out[2] == 0 and math.isnan(out[3])


@njit
def _exp_f32_of_differences(x, m, out):
    for i in range(x.shape[0]):
        hi, lo = cpu_fast.two_diff_f32(x[i], m[i])
        out[i] = cpu_fast.exp_f32_biased(hi, lo)


def test_float32_exp_of_an_exact_difference_within_0_87_ulp_down_to_the_flush():
    """exp(x - m) 2^96 from the two-sum pair, against long double: <= 0.87 ulp wherever
    x - m >= -150 (every term that can matter to a float32 loss), 0 below, exactly 2^96 at 0.
    (Measured up to 0.863 on 16 million differences; the worst case of each rounding adds up to
    1.02: the last addition 0.5, that of r1 + small, which stands for 1 + r1's, 0.25, the rest
    0.27.)"""
    rng = np.random.default_rng(0)
    k = 1_000_000
    m = np.concatenate([rng.normal(size=k) * 10.0 ** rng.uniform(-3, 8, k), np.zeros(5)])
    d = np.concatenate(
        [
            -rng.uniform(0, 155, k // 2),
            -np.abs(rng.normal(size=k // 2)) * 3,
            [0.0, -1e-30, -150.0, -149.99, -150.01],
        ]
    )
    m = m.astype(np.float32)
    x = (m.astype(np.float64) + d).astype(np.float32)
    out = np.empty_like(x)
    _exp_f32_of_differences(x, m, out)
    exact_d = x.astype(LD) - m.astype(LD)  # what the kernel sees: the rounded x, exactly
    exact = np.exp(exact_d) * LD(2.0) ** cpu_fast.EXP_BIAS
    live = exact_d >= -150
    err = oracle.ulp_error(out[live], exact[live], np.float32)
    assert err.max() <= 0.87, err.max()
    assert np.all(out[~live] == 0)
    assert out[exact_d == 0].tolist() == [np.float32(2.0**96)] * int(np.sum(exact_d == 0))
    special = np.array([-np.inf, -np.inf, 1e30], np.float32)
    out = np.empty_like(special)
    _exp_f32_of_differences(special, np.array([0, 5, np.inf], np.float32), out)
    assert np.all(out == 0)


@njit
def _exp_f32_pairs_of_differences(x, m, out, out_lo):
    for i in range(x.shape[0]):
        hi, lo = cpu_fast.two_diff_f32(x[i], m[i])
        out[i], out_lo[i] = cpu_fast._exp_biased_pair(hi, lo, cpu_fast._EXP32)


def test_float32_exp_pair_within_a_fifth_of_an_ulp_and_its_high_part_within_0_65():
    """The softmax focal loss's float32 terms: the pair (p, p_lo) of exp(x - m) 2^96 is within
    0.2 float32 ulp of the exact value (measured 0.16), and p alone within 0.65 ulp (the
    rounded exp, whose error the focal loss's a^gamma would multiply by gamma: the pair keeps
    it apart) and at most one float32 step from exp_f32_biased's result (a cheaper scheme)."""
    rng = np.random.default_rng(1)
    k = 1_000_000
    m = (rng.normal(size=k) * 10.0 ** rng.uniform(-3, 6, k)).astype(np.float32)
    d = np.concatenate([-rng.uniform(0, 150, k // 2), -np.abs(rng.normal(size=k // 2)) * 3])
    x = (m.astype(np.float64) + d).astype(np.float32)
    hi, lo, single = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    _exp_f32_pairs_of_differences(x, m, hi, lo)
    _exp_f32_of_differences(x, m, single)
    exact_d = x.astype(LD) - m.astype(LD)
    exact = np.exp(exact_d) * LD(2.0) ** cpu_fast.EXP_BIAS
    live = exact_d >= -150
    pair = hi[live].astype(LD) + lo[live].astype(LD)
    err = np.abs(pair - exact[live]) / oracle.ulp(exact[live], np.float32)
    assert err.max() <= 0.2, err.max()
    assert oracle.ulp_error(hi[live], exact[live], np.float32).max() <= 0.65
    steps = np.abs(hi.view(np.int32).astype(np.int64) - single.view(np.int32))
    assert steps.max() <= 1
    assert np.all(hi[~live] == 0) and np.all(lo[~live] == 0)


@pytest.mark.parametrize(
    "row, expected",
    [
        ([1.0, 2.0, np.inf], (np.inf, False)),
        ([np.nan, 1.0], (np.nan, True)),
        ([-np.nan, 3.0], (3.0, True)),  # x86's default NaN has the sign bit set
        ([-np.inf, -np.inf], (-np.inf, False)),
        ([-1.0, -5.0, -0.0], (0.0, False)),
        ([-3e38, -1e-45], (-1e-45, False)),
        ([7.0], (7.0, False)),
    ],
)
def test_row_max_f32_orders_like_floats_and_flags_nan_of_either_sign(row, expected):
    m, bad = cpu_fast.row_max_f32(np.array(row, np.float32))
    assert bad == expected[1]
    if not bad:
        assert m == np.float64(np.float32(expected[0]))


@njit
def _exp_f64_of_differences(x, m, out):
    for i in range(x.shape[0]):
        hi, lo = cpu_fast.two_diff_f64(x[i], m[i])
        out[i] = cpu_fast.exp_f64_biased(hi, lo)


def test_float64_exp_of_an_exact_difference_within_0_65_ulp_down_to_the_flush():
    """exp(x - m) 2^96 from the float64 two-sum pair against mpmath at 40 digits (long double's
    exp is itself off by a quarter of a float64 ulp at -500): <= 0.65 ulp down to -770."""
    import mpmath

    rng = np.random.default_rng(1)
    k = 4000
    m = rng.normal(size=k) * 10.0 ** rng.uniform(-3, 12, k)
    d = np.concatenate([-rng.uniform(0, 780, k // 2), -np.abs(rng.normal(size=k // 2)) * 3])
    x = m + d
    out = np.empty(k)
    _exp_f64_of_differences(x, m, out)
    worst = 0.0
    with mpmath.workdps(40):
        for xi, mi, got in zip(x.tolist(), m.tolist(), out.tolist()):
            di = mpmath.mpf(xi) - mpmath.mpf(mi)  # exact: both are float64
            if di < -770:
                assert got == 0.0
                continue
            exact = mpmath.exp(di) * mpmath.mpf(2) ** cpu_fast.EXP_BIAS
            worst = max(worst, float(abs(mpmath.mpf(got) - exact)) / np.spacing(float(exact)))
    assert worst <= 0.65, worst


@pytest.mark.parametrize("scale", [1.0, 1e-30, 1e-300])
def test_float64_block_sum_is_compensated(scale):
    """The split sum of a block (high parts exact, low parts tiny) is within an ulp of the exact
    sum for terms spanning 30 binades, where a plain sum in lanes loses several."""
    rng = np.random.default_rng(2)
    e = np.exp(rng.uniform(-70, 0, cpu_fast.BLOCK)) * scale * 2.0**96
    e[::97] = 2.0**96  # ties are left out of the sum
    top = int(np.max(e[e < 2.0**96]).view(np.int64))
    got = cpu_fast._sum_below_f64(e, top)
    import math

    exact = math.fsum(e[e < 2.0**96].tolist())
    assert abs(got - exact) <= 0.5 * np.spacing(exact)


def test_row_max_f64_orders_like_floats_and_flags_nan():
    for row, m, bad in (
        ([1.0, np.inf], np.inf, False),
        ([-np.nan, 2.0], None, True),
        ([np.nan], None, True),
        ([-0.0, -1e-300], -0.0, False),
        ([-np.inf, -np.inf], -np.inf, False),
    ):
        got, got_bad = cpu_fast.row_max_f64(np.array(row))
        assert got_bad == bad and (bad or got == m)


def test_first_index_of_finds_the_first_match_beyond_the_first_chunk():
    x = np.zeros(1000, np.float32)
    x[[700, 900]] = 5.0
    assert cpu_fast.first_index_of(x, np.float32(5.0)) == 700
    assert cpu_fast.first_index_of(x, np.float32(0.0)) == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_first_index_of_agrees_with_a_scan_at_chunk_edges_and_without_a_match(dtype):
    rng = np.random.default_rng(5)
    for n in (1, 255, 256, 257, 1000, 4097):
        x = rng.standard_normal(n).astype(dtype)
        for at in sorted({0, n // 2, n - 1, min(255, n - 1), min(256, n - 1)}):
            row = x.copy()
            row[at] = 9.0
            row[-1] = 9.0  # a later tie: the first one is wanted
            assert cpu_fast.first_index_of(row, dtype(9.0)) == at
        assert cpu_fast.first_index_of(x, dtype(42.0)) == -1
        assert cpu_fast.first_index_of(x, dtype(np.nan)) == -1  # NaN equals nothing
    signed = np.array([1.0, -0.0, 0.0], dtype)
    assert cpu_fast.first_index_of(signed, dtype(0.0)) == 1  # -0 == +0, as the maximum's ties


# --------------------------------------------------------------------------------------------
# Class-index cross-entropy against the oracle
# --------------------------------------------------------------------------------------------
def run_fast(x, y, w=None, eps=0.0, scale=1.0):
    n, c = x.shape
    w = np.ones(c) if w is None else w
    loss = np.empty(n)
    fused = np.empty(n)
    grad = np.empty_like(x)
    cpu_fast.cross_entropy_index_fwd(x, y, w, -100, eps, loss)
    cpu_fast.cross_entropy_index_fwd_grad(x, y, w, -100, eps, scale, fused, grad)
    np.testing.assert_array_equal(loss, fused)
    return loss, grad


EXTREMES = {
    "confident_correct_tiny_loss": (
        np.array([[20.0, 0, 0], [60.0, 1, 2], [87.0, 0, -3]]),
        [0, 0, 0],
    ),
    "subnormal_float32_loss": (np.array([[95.0, 0, 0, 0], [101.0, 0, -1, 0]]), [0, 0]),
    "equal_logits_offset_1e8": (np.full((2, 3), 1e8), [0, 2]),
    "ties_at_the_max": (np.array([[5.0, 5.0, 1.0], [5.0, 5.0, 5.0]]), [1, 2]),
    "masked_minus_inf": (np.array([[2.0, -np.inf, 0.5, -np.inf]]), [0]),
    "logits_104_0": (np.array([[104.0, 0.0], [104.0, 0.0]]), [0, 1]),
    "huge_spread": (np.array([[3e38, -3e38, 0.0]]), [1]),
    "subnormal_logits": (np.array([[1e-45, 0.0, -1e-40]]), [2]),
}


@pytest.mark.parametrize("case", sorted(EXTREMES))
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_extreme_cases_match_the_oracle(case, eps):
    x, y = EXTREMES[case]
    x = np.asarray(x, np.float32)
    y = np.asarray(y)
    loss, grad = run_fast(x, y, eps=eps)
    # the float64 loss (huge_spread's exceeds the float32 range; rounding adds <= 0.5 ulp)
    assert_ulp(loss, oracle.cross_entropy(x, y, label_smoothing=eps), np.float32)
    exact_g = oracle.cross_entropy_grad(x, y, label_smoothing=eps)
    finite = np.isfinite(exact_g).all(axis=1)
    if eps == 0.0:
        assert_ulp(grad[finite], exact_g[finite], np.float32)
    else:
        a = smoothed_index_target(y, x.shape[1], None, eps)
        assert_ulp_of_scale(
            grad[finite], exact_g[finite], soft_grad_scale(x, a)[finite], np.float32
        )


def test_nan_plus_inf_and_all_minus_inf_rows_are_nan():
    x = np.array(
        [[np.nan, 0, 1], [np.inf, 0, 1], [-np.inf, -np.inf, -np.inf], [1, 2, 3]], np.float32
    )
    loss, grad = run_fast(x, np.array([0, 1, 2, 2]))
    assert np.isnan(loss[:3]).all() and np.isnan(grad[:3]).all() and np.isfinite(loss[3])


@pytest.mark.parametrize("c", [2, 31, 1000, 262144])
def test_random_rows_agree_with_the_oracle(c):
    """Within 1.2 ulp (loss) and 2 ulp (gradient) measured; the contract allows 4."""
    rng = np.random.default_rng(c)
    n = 6 if c > 1000 else 40
    x = (rng.normal(size=(n, c)) * 10.0 ** rng.uniform(-2, 2.5, (n, 1))).astype(np.float32)
    y = np.where(np.arange(n) % 2 == 0, np.argmax(x, 1), rng.integers(0, c, n))
    w = rng.uniform(0.1, 3, c)
    for eps in (0.0, 0.2):
        loss, grad = run_fast(x, y, w, eps, 1.0 / n)
        assert_ulp(
            loss.astype(np.float32),
            oracle.cross_entropy(x, y, w, label_smoothing=eps),
            np.float32,
            tol=1.2,
        )
        exact_g = oracle.cross_entropy_grad(x, y, w, label_smoothing=eps) / n
        if eps == 0.0:
            assert_ulp(grad, exact_g, np.float32, tol=2)
        else:
            a = smoothed_index_target(y, c, w, eps) / n
            assert_ulp_of_scale(grad, exact_g, soft_grad_scale(x, a), np.float32, tol=2)


def _short_rows(c, dtype):
    """Rows of c classes, three groups of lanes and five rows more: random rows at scales
    1e-2..1e4, and the named extreme rows twice, in the first group (the lanes) and in the
    last five rows (the row path)."""
    rng = np.random.default_rng(c)
    n = 3 * cpu_fast.LANES + 5
    x = rng.normal(size=(n, c)) * 10.0 ** rng.uniform(-2, 4, (n, 1))
    y = np.where(np.arange(n) % 2 == 0, np.argmax(x, 1), rng.integers(0, c, n))
    for base in (0, n - 5):
        x[base] = 0.0
        x[base, 0] = 90.0  # confident_correct_tiny_loss: S = (C - 1) e^-90
        y[base] = 0
        x[base + 1] = 1e8  # equal_logits_offset_1e8
        x[base + 2, c - 1] = np.nan  # nan_row
        x[base + 3] = -np.inf  # all_classes_masked
        x[base + 4, 0] = np.inf  # plus_inf_logit
    x[8, ::2] = -np.inf  # masked_minus_inf, the target the largest class left
    y[8] = np.argmax(x[8])
    y[9] = -100  # ignored_row
    return x.astype(dtype), y, rng.uniform(0.3, 3, c)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("c", [1, 5, 10, 16, cpu_fast.SHORT_CLASSES])
def test_short_rows_in_lanes_match_the_oracle_and_the_fused_kernel(dtype, c):
    """The class-index forward of rows of at most SHORT_CLASSES classes runs LANES rows at a
    time, one per SIMD lane: within 4 ulp of the oracle, NaN for the rows torch makes NaN, 0
    for ignored rows, and the same bits as the fused kernel."""
    x, y, w = _short_rows(c, dtype)
    n = x.shape[0]
    loss, fused, grad = np.empty(n), np.empty(n), np.empty_like(x)
    cpu_fast.cross_entropy_index_fwd(x, y, w, -100, 0.0, loss)
    cpu_fast.cross_entropy_index_fwd_grad(x, y, w, -100, 0.0, 1.0, fused, grad)
    np.testing.assert_array_equal(loss, fused)
    serial = np.empty(n)
    cpu_fast.cross_entropy_index_fwd_serial(x, y, w, -100, 0.0, serial)
    np.testing.assert_array_equal(loss, serial)
    assert loss[9] == 0.0
    kept = y != -100
    exact = oracle.cross_entropy(x[kept], y[kept], w)
    bad = ~np.isfinite(exact)
    assert np.isnan(loss[kept][bad]).all() and np.isfinite(loss[kept][~bad]).all()
    assert_ulp(loss[kept][~bad].astype(dtype), exact[~bad], dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("c", [1, 5, 10, 16, cpu_fast.SHORT_CLASSES])
def test_fused_short_rows_in_lanes_give_the_row_paths_bits(dtype, c):
    """The fused class-index kernel runs rows of at most SHORT_CLASSES classes LANES at a time
    (the forward's lanes, then each row's gradient from the kept terms): the loss and gradient
    are the row path's bit for bit (ignored, NaN, +inf and all-masked rows included, which the
    lanes hand to the row path), in place too, and the gradient is within 4 ulp of the oracle."""
    x, y, w = _short_rows(c, dtype)
    n = x.shape[0]
    scale = 1.0 / n
    loss, grad = np.empty(n), np.empty_like(x)
    cpu_fast.cross_entropy_index_fwd_grad(x, y, w, -100, 0.0, scale, loss, grad)
    row_loss, row_grad = np.empty(n), np.empty_like(x)
    params = (w, cpu.compensated_sum(w), -100, 0.0, scale)
    cpu_fast._softmax_chunk(0, 1, x, y, params, True, False, row_loss, row_grad)
    np.testing.assert_array_equal(loss, row_loss)
    np.testing.assert_array_equal(grad, row_grad)
    inplace = x.copy()
    cpu_fast.cross_entropy_index_fwd_grad(inplace, y, w, -100, 0.0, scale, loss, inplace)
    np.testing.assert_array_equal(loss, row_loss)
    np.testing.assert_array_equal(inplace, row_grad)
    assert (grad[9] == 0.0).all()  # ignored_row
    ok = (y != -100) & np.isfinite(row_loss)
    exact_g = oracle.cross_entropy_grad(x[ok], y[ok], w) * scale
    assert_ulp(grad[ok], exact_g, dtype)
    assert np.isnan(grad[~ok & (y != -100)]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("c", [1, 5, 10, cpu_fast.SHORT_CLASSES])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_fused_short_soft_target_rows_in_lanes_give_the_row_paths_bits(dtype, c, eps):
    """The fused soft-target kernel on rows of at most SHORT_CLASSES classes runs LANES rows at
    a time: loss and gradient are the row path's bit for bit (mass on a -inf class, no mass on
    one, NaN, +inf and all-masked rows included), in place too."""
    x, _, w = _short_rows(c, dtype)
    n = x.shape[0]
    p = np.random.default_rng(c).dirichlet(np.full(c, 0.5), n)
    x[10, 0] = -np.inf  # mass_on_minus_inf_class
    x[11, 0] = -np.inf  # no_mass_on_minus_inf_class
    p[11, 0] = 0.0
    p = p.astype(dtype)
    scale = 1.0 / n
    loss, grad = np.empty(n), np.empty_like(x)
    cpu_fast.cross_entropy_prob_fwd_grad(x, p, w, eps, scale, loss, grad)
    row_loss, row_grad = np.empty(n), np.empty_like(x)
    cpu_fast._softmax_chunk(0, 1, x, p, (w, eps, scale), True, False, row_loss, row_grad)
    np.testing.assert_array_equal(loss, row_loss)
    np.testing.assert_array_equal(grad, row_grad)
    inplace = x.copy()
    cpu_fast.cross_entropy_prob_fwd_grad(inplace, p, w, eps, scale, loss, inplace)
    np.testing.assert_array_equal(loss, row_loss)
    np.testing.assert_array_equal(inplace, row_grad)
    if c > 1:  # (one class at -inf is a row of all classes masked: NaN)
        assert np.isinf(loss[10])
        assert np.isfinite(loss[11]) == (eps == 0.0)  # smoothing puts mass on every class


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("c", [1, 5, 10, cpu_fast.SHORT_CLASSES])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_short_soft_target_rows_in_lanes_match_the_oracle_and_the_fused_kernel(dtype, c, eps):
    """The soft-target forward of short rows in lanes: within 4 ulp of the oracle, the same
    NaN and inf rows (mass on a -inf class: +inf), the same bits as the fused kernel."""
    x, _, w = _short_rows(c, dtype)
    n = x.shape[0]
    p = np.random.default_rng(c).dirichlet(np.full(c, 0.5), n)
    x[10, 0] = -np.inf  # mass_on_minus_inf_class: an infinite loss
    x[11, 0] = -np.inf  # no_mass_on_minus_inf_class: a finite loss
    p[11, 0] = 0.0
    p[11] /= p[11].sum() if p[11].sum() > 0 else 1.0
    p = p.astype(dtype)
    loss, fused, grad = np.empty(n), np.empty(n), np.empty_like(x)
    cpu_fast.cross_entropy_prob_fwd(x, p, w, eps, loss)
    cpu_fast.cross_entropy_prob_fwd_grad(x, p, w, eps, 1.0, fused, grad)
    np.testing.assert_array_equal(loss, fused)
    exact = oracle.cross_entropy_probs(x, p, w, eps)
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(exact))
    np.testing.assert_array_equal(np.isinf(loss), np.isinf(exact))
    ok = np.isfinite(exact)
    assert_ulp(loss[ok].astype(dtype), exact[ok], dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("c", [1, 2, 10, cpu_fast.SHORT_CLASSES])
@pytest.mark.parametrize("gamma", [0.0, 2.0, 5.0])
def test_short_focal_rows_in_lanes_match_the_oracle_and_the_fused_kernel(dtype, c, gamma):
    """The softmax focal forward of short rows in lanes (float32: S from float32 pairs in
    each lane): within the focal contract of the oracle, NaN where torch gives NaN, 0 for the
    ignored row, and the same bits as the fused kernel and the serial twin (the row path). Rows
    whose maximum is tied (equal_logits_offset_1e8, tied_max_target_not_first) take a = S / (1
    + S) only when y is the first maximum, as the row path does."""
    x, y, w = _short_rows(c, dtype)
    if c > 1:
        x[12] = 1.0
        x[12, 0] = 0.5
        y[12] = c - 1  # tied_max_target_not_first: k = 1 != y
    n = x.shape[0]
    loss, fused, grad, serial = np.empty(n), np.empty(n), np.empty_like(x), np.empty(n)
    cpu_fast.softmax_focal_fwd(x, y, w, -100, gamma, loss)
    cpu_fast.softmax_focal_fwd_grad(x, y, w, -100, gamma, 1.0, fused, grad)
    cpu_fast.softmax_focal_fwd_serial(x, y, w, -100, gamma, serial)
    np.testing.assert_array_equal(loss, fused)
    np.testing.assert_array_equal(loss, serial)
    assert loss[9] == 0.0
    kept = y != -100
    exact = oracle.softmax_focal_loss(x[kept], y[kept], gamma, w)
    bad = ~np.isfinite(exact)
    assert np.isnan(loss[kept][bad]).all() and np.isfinite(loss[kept][~bad]).all()
    assert_ulp(loss[kept][~bad].astype(dtype), exact[~bad], dtype, focal_tol(gamma, dtype))


# rows of several blocks: up to PREMAX_CLASSES the maximum is taken first, above it the row is
# read once with an online (max, sum) state
SEVERAL_BLOCKS = [3 * BLOCK + 17, cpu_fast.PREMAX_CLASSES + BLOCK + 17]


def _multi_block_rows(c=SEVERAL_BLOCKS[0]):
    """Rows of several blocks: the maximum in a late block (the online sum is rescaled), a
    block of -inf first, ties in different blocks, a confident row, and NaN / +inf in a late
    block."""
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(8, c)) * 4).astype(np.float32)
    x[0, -5] = 30.0  # the maximum in the last, partial block
    x[1, : BLOCK + 3] = -np.inf  # a first block of -inf only
    x[2, [10, BLOCK + 10, 3 * BLOCK]] = 9.0  # ties in three blocks
    x[3] = 0.0
    x[3, 2 * BLOCK + 1] = 120.0  # confident: S = (C - 1) e^-120, a subnormal loss
    x[4, :] = np.float32(1e8)  # all equal at an offset
    x[5, ::BLOCK] = -np.inf
    x[6, 2 * BLOCK + 3] = np.nan
    x[7, 3 * BLOCK + 2] = np.inf
    y = np.array([c - 5, BLOCK + 7, BLOCK + 10, 2 * BLOCK + 1, 3, 5, 0, 0])
    return x, y


@pytest.mark.parametrize("c", SEVERAL_BLOCKS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_rows_of_several_blocks_match_the_oracle(eps, c):
    x, y = _multi_block_rows(c)
    w = np.random.default_rng(4).uniform(0.5, 2, x.shape[1])
    loss, grad = run_fast(x, y, w, eps)
    exact = oracle.cross_entropy(x, y, w, label_smoothing=eps)
    assert_ulp(loss.astype(np.float32), exact, np.float32)
    exact_g = oracle.cross_entropy_grad(x, y, w, label_smoothing=eps)
    ok = np.isfinite(exact)
    if eps == 0.0:
        assert_ulp(grad, exact_g, np.float32)
    else:
        a = smoothed_index_target(y, x.shape[1], w, eps)
        assert_ulp_of_scale(grad[ok], exact_g[ok], soft_grad_scale(x, a)[ok], np.float32)
    assert np.isnan(loss[6:]).all() and np.isnan(grad[6:]).all()


@pytest.mark.parametrize("c", [3, 1000, 3 * BLOCK + 17])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_float64_rows_match_the_oracle(c, eps):
    """The float64 kernels of cpu_fast (double-double differences, the float64 exp, split block
    sums): within the contract's 4 ulp on mixed rows (scales 1e-2..1e4, confident rows, -inf
    classes, equal logits at 1e15), one block and several."""
    rng = np.random.default_rng(c)
    n = 24
    x = rng.normal(size=(n, c)) * 10.0 ** rng.uniform(-2, 4, (n, 1))
    x[3] = 0.0
    x[3, c // 2] = 700.0  # S = (C - 1) e^-700
    x[4, ::3] = -np.inf
    x[5] = 1e15
    y = np.where(np.arange(n) % 2 == 0, np.argmax(x, 1), rng.integers(0, c, n))
    y[4] = np.argmax(x[4])
    w = rng.uniform(0.3, 3, c)
    loss = np.empty(n)
    fused = np.empty(n)
    grad = np.empty_like(x)
    cpu_fast.cross_entropy_index_fwd(x, y, w, -100, eps, loss)
    cpu_fast.cross_entropy_index_fwd_grad(x, y, w, -100, eps, 1.0, fused, grad)
    np.testing.assert_array_equal(loss, fused)
    exact = oracle.cross_entropy(x, y, w, label_smoothing=eps)
    assert_ulp(loss, exact, np.float64)
    exact_g = oracle.cross_entropy_grad(x, y, w, label_smoothing=eps)
    ok = np.isfinite(exact)
    if eps == 0.0:
        assert_ulp(grad, exact_g, np.float64)
    else:
        a = smoothed_index_target(y, c, w, eps)
        assert_ulp_of_scale(grad[ok], exact_g[ok], soft_grad_scale(x, a)[ok], np.float64)
    p = rng.dirichlet(np.full(c, 0.3), n)
    p[np.isinf(x)] = 0.0
    p /= p.sum(axis=1, keepdims=True)
    cpu_fast.cross_entropy_prob_fwd(x, p, w, eps, loss)
    cpu_fast.cross_entropy_prob_fwd_grad(x, p, w, eps, 1.0, fused, grad)
    np.testing.assert_array_equal(loss, fused)
    exact = oracle.cross_entropy_probs(x, p, w, eps)
    assert_ulp(loss, exact, np.float64)
    assert_ulp_of_scale(
        grad,
        oracle.cross_entropy_probs_grad(x, p, w, eps),
        soft_grad_scale(x, probs_target(p, w, eps)),
        np.float64,
    )


# --------------------------------------------------------------------------------------------
# Soft-target cross-entropy and BCE
# --------------------------------------------------------------------------------------------
def _run_prob(x, p, w, eps):
    n = x.shape[0]
    loss = np.empty(n)
    fused = np.empty(n)
    grad = np.empty_like(x)
    cpu_fast.cross_entropy_prob_fwd(x, p, w, eps, loss)
    cpu_fast.cross_entropy_prob_fwd_grad(x, p, w, eps, 1.0, fused, grad)
    np.testing.assert_array_equal(loss, fused)
    return loss, grad


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_fast_soft_target_cross_entropy(eps):
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(30, 40)) * 10.0 ** rng.uniform(-2, 2, (30, 1))).astype(np.float32)
    x[3, ::4] = -np.inf
    p = rng.dirichlet(np.full(40, 0.3), 30).astype(np.float32)
    p[3, ::4] = 0.0
    p[3] /= p[3].sum()
    x[5] = np.float32(1e6)  # all ties
    w = rng.uniform(0.2, 2, 40)
    loss, grad = _run_prob(x, p, w, eps)
    exact = oracle.cross_entropy_probs(x, p, w, eps)
    assert_ulp(loss.astype(np.float32), exact, np.float32, tol=1.2)
    ok = np.isfinite(exact)
    assert_ulp_of_scale(
        grad[ok],
        oracle.cross_entropy_probs_grad(x, p, w, eps)[ok],
        soft_grad_scale(x, probs_target(p, w, eps))[ok],
        np.float32,
        tol=2,
    )


@pytest.mark.parametrize("c", SEVERAL_BLOCKS)
def test_fast_soft_target_rows_of_several_blocks(c):
    x, _ = _multi_block_rows(c)
    x, c = x[:6], x.shape[1]
    rng = np.random.default_rng(6)
    p = rng.dirichlet(np.full(c, 0.5), 6).astype(np.float32)
    p[np.isinf(x)] = 0.0
    p /= p.sum(axis=1, keepdims=True)
    w = rng.uniform(0.5, 2, c)
    loss, grad = _run_prob(x, p, w, 0.0)
    exact = oracle.cross_entropy_probs(x, p, w)
    assert_ulp(loss.astype(np.float32), exact, np.float32)
    assert_ulp_of_scale(
        grad,
        oracle.cross_entropy_probs_grad(x, p, w),
        soft_grad_scale(x, probs_target(p, w)),
        np.float32,
    )


def test_log1p_unit_relative_error_over_its_whole_input_range():
    @njit
    def many(e, out):
        for i in range(e.shape[0]):
            out[i] = cpu_fast.log1p_unit(e[i])

    e = np.concatenate([np.logspace(-300, 0, 200000), np.linspace(0, 1, 100001)])
    out = np.empty_like(e)
    many(e, out)
    exact = np.log1p(e.astype(np.longdouble))
    nz = exact > 0
    assert np.max(np.abs(out[nz] - exact[nz]) / exact[nz]) < 1e-13
    assert out[~nz].max() == 0.0


def test_log1p_f64_within_one_ulp_over_0_1():
    @njit
    def many(e, out):
        for i in range(e.shape[0]):
            out[i] = cpu_fast.log1p_f64(e[i])

    e = np.concatenate(
        [
            np.logspace(-320, 0, 200000),
            np.linspace(0, 1, 200001),
            np.sqrt(2) - 1 + np.linspace(-1e-12, 1e-12, 1001),
        ]
    )
    out = np.empty_like(e)
    many(e, out)
    exact = np.log1p(e.astype(LD))
    assert oracle.ulp_error(out, exact, np.float64).max() < 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bce_with_logits_matches_the_oracle_per_element_and_per_row(dtype):
    """Losses and hard-target gradients element-wise, soft-target gradients in ulps of the
    larger term (the contract's measures), and the row sums of the (N,) mode, over logits from
    1e-3 to 5e2 (float64: the vectorised exp and log1p to 0.55 and 1 ulp; rows of two
    blocks)."""
    from helpers import bce_grad_scale

    rng = np.random.default_rng(8)
    n, c = 12, BLOCK + 100
    x = (rng.normal(size=(n, c)) * 10.0 ** rng.uniform(-3, 2.7, (n, 1))).astype(dtype)
    x[0, :4] = [18.0, -18.0, 700.0, -745.5]
    w = rng.uniform(0.5, 2, (1, c))
    pw = rng.uniform(0.5, 3, (1, c))
    for hard in (True, False):
        t = np.round(rng.uniform(size=x.shape)) if hard else rng.uniform(size=x.shape)
        t = t.astype(dtype)
        loss = np.empty(x.shape)
        grad = np.empty_like(x)
        rows = np.empty(n)
        cpu_fast.bce_with_logits_fwd_grad(x, t, w, pw, 1.0, loss, grad)
        cpu_fast.bce_with_logits_fwd(x, t, w, pw, rows)
        exact = oracle.binary_cross_entropy_with_logits(x, t, w, pw)
        assert_ulp(loss.astype(dtype), exact, dtype)
        assert_ulp(rows.astype(dtype), exact.sum(axis=1), dtype)
        exact_g = oracle.binary_cross_entropy_with_logits_grad(x, t, w, pw)
        if hard:
            assert_ulp(grad, exact_g, dtype)
        else:
            assert_ulp_of_scale(grad, exact_g, bce_grad_scale(x, t, w, pw), dtype)


def test_fast_bce_with_logits_keeps_tiny_losses_and_nan():
    rng = np.random.default_rng(6)
    x = (rng.normal(size=(20, 17)) * 10.0 ** rng.uniform(-2, 2.5, (20, 1))).astype(np.float32)
    x[0, :4] = [18.0, -18.0, 90.0, -104.0]
    x[1, 0] = np.nan
    t = np.round(rng.uniform(size=x.shape)).astype(np.float32)
    t[0, :4] = [1.0, 0.0, 1.0, 0.0]
    pw = np.broadcast_to(rng.uniform(0.5, 3, 17), x.shape)
    w = np.broadcast_to(np.float64(1.5), x.shape)
    loss = np.empty(x.shape)
    fused = np.empty(x.shape)
    grad = np.empty_like(x)
    cpu_fast.bce_with_logits_fwd(x, t, w, pw, loss)
    cpu_fast.bce_with_logits_fwd_grad(x, t, w, pw, 1.0, fused, grad)
    np.testing.assert_array_equal(loss, fused)
    assert np.isnan(loss[1, 0]) and np.isnan(grad[1, 0])
    assert np.all(loss[0, :4] > 0)
    ok = np.isfinite(x)
    assert_ulp(
        loss.astype(np.float32)[ok],
        oracle.binary_cross_entropy_with_logits(x, t, w, pw)[ok],
        np.float32,
        tol=1,
    )
    assert_ulp(
        grad[ok], oracle.binary_cross_entropy_with_logits_grad(x, t, w, pw)[ok], np.float32, tol=1
    )


def test_fast_bce_accepts_one_weight_row_for_all_rows():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(9, 13)).astype(np.float32) * 5
    t = np.round(rng.uniform(size=x.shape)).astype(np.float32)
    w_row = rng.uniform(0.5, 2, (1, 13))
    pw_row = rng.uniform(0.5, 3, (1, 13))
    loss = np.empty(x.shape)
    grad = np.empty_like(x)
    cpu_fast.bce_with_logits_fwd_grad(x, t, w_row, pw_row, 1.0, loss, grad)
    full = np.empty(x.shape)
    cpu_fast.bce_with_logits_fwd(x, t, np.repeat(w_row, 9, 0), np.repeat(pw_row, 9, 0), full)
    np.testing.assert_array_equal(loss, full)
    assert_ulp(
        loss.astype(np.float32),
        oracle.binary_cross_entropy_with_logits(x, t, w_row, pw_row),
        np.float32,
        tol=1,
    )


# --------------------------------------------------------------------------------------------
# Every fused kernel in place, every kernel's serial twin
# --------------------------------------------------------------------------------------------
def _kernel_cases():
    """(module, variant, dtype) for every kernel the registry names: cpu, and cpu_fast where
    the variant has it, in float32 and float64."""
    out = []
    for v in variants.VARIANTS.values():
        if v.kernel is None:
            continue
        for dtype in (np.float32, np.float64):
            out.append(pytest.param(cpu, v.name, dtype, id=f"cpu-{v.name}-{dtype.__name__}"))
        if v.fast_cpu:
            for dtype in (np.float32, np.float64):
                out.append(
                    pytest.param(cpu_fast, v.name, dtype, id=f"cpu_fast-{v.name}-{dtype.__name__}")
                )
    return out


def _kernel_args(name, dtype, n, c, seed=0):
    """Inputs and options, in the kernels' argument order, as dispatch prepares them: mixed
    rows with -inf classes, NaN, confident and ignored rows."""
    v = variants.get(name)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, c)) * 10.0 ** rng.uniform(-1, 2, (n, 1))
    if v.input == "log_probs":
        x = -np.abs(x)
    else:
        x[1, : c // 3] = -np.inf
        x[2, 1] = np.nan
        x[3, 0] += 200.0
    x = x.astype(dtype)
    if v.target == "index":
        t = rng.integers(0, c, n)
        t[1] = c - 1
        t[4] = -100
    elif v.target == "probs":
        t = rng.dirichlet(np.full(c, 0.5), n).astype(dtype)
        t[1, : c // 3] = 0.0
    else:
        t = np.round(rng.uniform(size=(n, c))).astype(dtype)
    opts = []
    for key, default in v.options:
        if key in ("weight", "pos_weight"):
            opts.append(rng.uniform(0.5, 2, (1, c) if v.elementwise else c))
        elif key == "label_smoothing":
            opts.append(0.1)
        else:
            opts.append(default)
    return x, t, opts


@pytest.mark.parametrize("module, name, dtype", _kernel_cases())
@pytest.mark.parametrize("c", [7, BLOCK + 300, cpu_fast.PREMAX_CLASSES + 300])
def test_fused_kernel_in_place_equals_out_of_place(module, name, dtype, c):
    """``out_grad`` = ``logits``: the gradient written over the logits is the gradient written
    elsewhere, bit for bit, and so are the losses (per row, and per element)."""
    v = variants.get(name)
    x, t, opts = _kernel_args(name, dtype, 6, c)
    kernel = getattr(module, v.kernel + "_fwd_grad")
    loss_shapes = [(6,), (6, c)] if v.elementwise else [(6,)]
    for shape in loss_shapes:
        loss, grad = np.empty(shape), np.empty_like(x)
        kernel(x, t, *opts, 0.5, loss, grad)
        loss_in, x_in = np.empty(shape), x.copy()
        kernel(x_in, t, *opts, 0.5, loss_in, x_in)
        np.testing.assert_array_equal(x_in, grad)
        np.testing.assert_array_equal(loss_in, loss)
        assert not np.isnan(grad[0]).any()


@pytest.mark.parametrize("module, name, dtype", _kernel_cases())
def test_serial_twins_equal_the_parallel_kernels(module, name, dtype):
    v = variants.get(name)
    x, t, opts = _kernel_args(name, dtype, 9, 300, seed=1)
    for suffix, extra in (("_fwd", ()), ("_fwd_grad", (0.25,))):
        outs = []
        for kernel in (
            getattr(module, v.kernel + suffix),
            getattr(module, v.kernel + suffix + "_serial"),
        ):
            loss, grad = np.empty(9), np.empty_like(x)
            kernel(x, t, *opts, *extra, loss, *((grad,) if extra else ()))
            outs.append((loss, grad if extra else None))
        np.testing.assert_array_equal(outs[0][0], outs[1][0])
        if extra:
            np.testing.assert_array_equal(outs[0][1], outs[1][1])


def test_kernel_for_picks_the_serial_twin_below_the_threshold():
    small = cpu.kernel_for(cpu_fast, "cross_entropy_index_fwd", cpu.SERIAL_BELOW - 1)
    large = cpu.kernel_for(cpu_fast, "cross_entropy_index_fwd", cpu.SERIAL_BELOW)
    assert small is cpu_fast.cross_entropy_index_fwd_serial
    assert large is cpu_fast.cross_entropy_index_fwd
    for module in (cpu, cpu_fast):
        for name in module.KERNELS:
            assert callable(getattr(module, name + "_serial"))


def test_kernels_free_every_allocation():
    """The row functions run without numba's reference counting (``_nrt=False``): calls of
    every fast kernel, forward, fused and in place, allocate and free in equal numbers."""
    from numba.core.runtime import _nrt_python as nrt
    from numba.core.runtime import rtsys

    rng = np.random.default_rng(9)
    was_enabled = nrt.memsys_stats_enabled()
    nrt.memsys_enable_stats()
    try:
        for dtype in (np.float32, np.float64):
            for c in (10, BLOCK + 10, cpu_fast.PREMAX_CLASSES + 10):
                x = rng.normal(size=(3, c)).astype(dtype)
                y = np.zeros(3, np.int64)
                w = np.ones(c)
                p = np.abs(x)
                loss, per_elem, grad = np.empty(3), np.empty(x.shape), np.empty_like(x)

                def run():
                    cpu_fast.cross_entropy_index_fwd(x, y, w, -100, 0.1, loss)
                    cpu_fast.cross_entropy_index_fwd(x, y, w, -100, 0.0, loss)  # short rows
                    cpu_fast.cross_entropy_index_fwd_grad(x, y, w, -100, 0.1, 1.0, loss, grad)
                    cpu_fast.cross_entropy_prob_fwd(x, p, w, 0.1, loss)
                    x5, p5 = x[:, :5].copy(), p[:, :5].copy()  # short rows in lanes
                    cpu_fast.cross_entropy_prob_fwd(x5, p5, w[:5], 0.0, loss)
                    cpu_fast.kl_divergence_fwd(x5, p5, loss)
                    cpu_fast.cross_entropy_prob_fwd_grad(x, p, w, 0.1, 1.0, loss, grad)
                    cpu_fast.bce_with_logits_fwd(x, p, w[None], w[None], loss)
                    cpu_fast.bce_with_logits_fwd_grad(x, p, w[None], w[None], 1.0, per_elem, grad)
                    cpu_fast.sigmoid_focal_fwd(x, p, 0.25, 2.0, loss)
                    cpu_fast.sigmoid_focal_fwd_grad(x, p, 0.25, 0.5, 1.0, per_elem, grad)
                    cpu_fast.kl_divergence_fwd(x, p, loss)
                    cpu_fast.kl_divergence_fwd_grad(x, p, 1.0, loss, grad)
                    xi = x.copy()
                    cpu_fast.kl_divergence_fwd_grad_serial(xi, p, 1.0, loss, xi)
                    xi = x.copy()
                    cpu_fast.cross_entropy_index_fwd_grad_serial(xi, y, w, -100, 0.0, 1.0, loss, xi)

                run()
                before = rtsys.get_allocation_stats()
                for _ in range(5):
                    run()
                after = rtsys.get_allocation_stats()
                assert after.alloc - before.alloc == after.free - before.free
                assert after.mi_alloc - before.mi_alloc == after.mi_free - before.mi_free
    finally:
        if not was_enabled:
            nrt.memsys_disable_stats()


# --------------------------------------------------------------------------------------------
# Softmax focal loss (the cross-entropy's first pass; float32 rows' terms as float32 pairs)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("c", SEVERAL_BLOCKS)
@pytest.mark.parametrize("gamma", [0.5, 2.0, 5.0])
def test_softmax_focal_rows_of_several_blocks_match_the_oracle(c, gamma):
    """float32 rows of several blocks (maximum in a late block, ties across blocks, a confident
    row with a subnormal loss, NaN and +inf late), loss and gradient, fused and in place."""
    x, y = _multi_block_rows(c)
    w = np.random.default_rng(5).uniform(0.5, 2, c)
    n = x.shape[0]
    loss, fused, grad = np.empty(n), np.empty(n), np.empty_like(x)
    cpu_fast.softmax_focal_fwd(x, y, w, -100, gamma, loss)
    cpu_fast.softmax_focal_fwd_grad(x, y, w, -100, gamma, 1.0, fused, grad)
    np.testing.assert_array_equal(loss, fused)
    over = x.copy()
    cpu_fast.softmax_focal_fwd_grad(over, y, w, -100, gamma, 1.0, fused, over)
    np.testing.assert_array_equal(over, grad)
    exact = oracle.softmax_focal_loss(x, y, gamma, w)
    assert_ulp(loss.astype(np.float32), exact, np.float32, focal_tol(gamma, np.float32))
    exact_g = oracle.softmax_focal_loss_grad(x, y, gamma, w)
    assert_ulp(grad, exact_g, np.float32, focal_tol(gamma, np.float32), "gradient")
    assert np.isnan(loss[6:]).all() and np.isnan(grad[6:]).all()


@pytest.mark.parametrize("c", [3, 1000, 3 * BLOCK + 17])
@pytest.mark.parametrize("gamma", [1.0, 2.0])
def test_softmax_focal_float64_rows_match_the_oracle(c, gamma):
    """float64 rows, one block and several: within the float64 focal exception (2 gamma + 4
    ulp) on mixed scales, confident rows, -inf classes and equal logits at 1e15."""
    rng = np.random.default_rng(c)
    n = 24
    x = rng.normal(size=(n, c)) * 10.0 ** rng.uniform(-2, 4, (n, 1))
    x[3] = 0.0
    x[3, c // 2] = 700.0
    x[4, ::3] = -np.inf
    x[5] = 1e15
    y = np.where(np.arange(n) % 2 == 0, np.argmax(x, 1), rng.integers(0, c, n))
    y[4] = np.argmax(x[4])
    w = rng.uniform(0.3, 3, c)
    loss, grad = np.empty(n), np.empty_like(x)
    cpu_fast.softmax_focal_fwd_grad(x, y, w, -100, gamma, 1.0, loss, grad)
    assert_ulp(
        loss, oracle.softmax_focal_loss(x, y, gamma, w), np.float64, focal_tol(gamma, np.float64)
    )
    exact_g = oracle.softmax_focal_loss_grad(x, y, gamma, w)
    assert_ulp(grad, exact_g, np.float64, focal_tol(gamma, np.float64), "gradient")


@pytest.mark.parametrize("kernels", [cpu, cpu_fast], ids=["cpu", "cpu_fast"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_softmax_focal_masked_true_class_has_a_finite_gradient(kernels, dtype, gamma):
    """x_y = -inf (the true class masked): the loss is +inf, but every gradient entry is finite,
    -w_y at y and w_y p_j elsewhere (gamma ce p_y -> 0 as p_y -> 0; it was 0 * inf = NaN for the
    whole row)."""
    x = np.array([[-np.inf, 2.0, -1.0], [0.5, -np.inf, 3.0]], dtype)
    y = np.array([0, 1])
    w = np.array([2.0, 1.0, 1.0])
    loss, grad = np.empty(2), np.empty_like(x)
    kernels.softmax_focal_fwd_grad(x, y, w, -100, gamma, 1.0, loss, grad)
    assert np.isposinf(loss).all()
    assert np.isfinite(grad).all()
    exact_g = oracle.softmax_focal_loss_grad(x, y, gamma, w)
    assert np.isfinite(exact_g.astype(np.float64)).all()
    assert_ulp(grad, exact_g, dtype, what="gradient")
    assert grad[0, 0] == -w[0] and grad[1, 1] == -w[1]


# --------------------------------------------------------------------------------------------
# Sigmoid focal loss (BCE with logits' rows with the focal element)
# --------------------------------------------------------------------------------------------
SIGMOID_FOCAL_GAMMAS = [0.0, 1.0, 2.0, 0.5, 3.5]  # 0, 1, 2 vectorised; 0.5, 3.5 through pow


def _sigmoid_focal_fast(x, t, alpha, gamma):
    """(per-element losses, the forward's row sums, gradient) of cpu_fast's sigmoid focal
    kernels, after checking that the forward kernel's elements, the fused kernel written over
    the logits (in place) and the serial twins give the same bits as the fused kernel. (Row
    sums of float32 rows are float64 partial sums in lanes: their order, so their last float64
    bits, may differ between loops, far below a float32 ulp.)"""
    n = x.shape[0]
    loss, rows, grad = np.empty(x.shape), np.empty(n), np.empty_like(x)
    cpu_fast.sigmoid_focal_fwd_grad(x, t, alpha, gamma, 1.0, loss, grad)
    cpu_fast.sigmoid_focal_fwd(x, t, alpha, gamma, rows)
    fwd = np.empty(x.shape)
    cpu_fast.sigmoid_focal_fwd(x, t, alpha, gamma, fwd)
    np.testing.assert_array_equal(fwd, loss)
    over, over_loss = x.copy(), np.empty(x.shape)
    cpu_fast.sigmoid_focal_fwd_grad(over, t, alpha, gamma, 1.0, over_loss, over)
    np.testing.assert_array_equal(over, grad)
    np.testing.assert_array_equal(over_loss, loss)
    fused_rows, over_rows, over = np.empty(n), np.empty(n), x.copy()
    cpu_fast.sigmoid_focal_fwd_grad(x, t, alpha, gamma, 1.0, fused_rows, np.empty_like(x))
    cpu_fast.sigmoid_focal_fwd_grad(over, t, alpha, gamma, 1.0, over_rows, over)
    np.testing.assert_array_equal(over_rows, fused_rows)
    s_loss, s_grad, s_rows = np.empty(x.shape), np.empty_like(x), np.empty(n)
    cpu_fast.sigmoid_focal_fwd_grad_serial(x, t, alpha, gamma, 1.0, s_loss, s_grad)
    cpu_fast.sigmoid_focal_fwd_serial(x, t, alpha, gamma, s_rows)
    np.testing.assert_array_equal(s_loss, loss)
    np.testing.assert_array_equal(s_grad, grad)
    np.testing.assert_array_equal(s_rows, rows)
    return loss, rows, grad


def _sigmoid_focal_rows(dtype, c, seed):
    """Rows of mixed logit scales (1e-3 .. 2e2), a row of large magnitudes (|x| = 30 .. 100)
    and hard and soft targets."""
    rng = np.random.default_rng(seed)
    n = 6
    x = rng.normal(size=(n, c)) * 10.0 ** rng.uniform(-3, 2.3, (n, 1))
    x[1] = rng.choice([-1.0, 1.0], c) * rng.uniform(30, 100, c)
    x = x.astype(dtype)
    t_hard = np.round(rng.uniform(size=x.shape)).astype(dtype)
    t_soft = rng.uniform(size=x.shape).astype(dtype)
    t_soft[0, :3] = [0.5, 0.25, 0.75]
    return x, t_hard, t_soft


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("gamma", SIGMOID_FOCAL_GAMMAS)
@pytest.mark.parametrize("alpha", [0.25, -1.0])
def test_sigmoid_focal_rows_of_several_blocks_match_the_oracle(dtype, gamma, alpha):
    """Losses (per element and row sums) and gradients of rows of three blocks against the
    oracle: hard-target gradients element-wise, soft-target ones in ulps of the sum of their
    terms' magnitudes (the contract's measures). float32 within the contract's 4 ulp, float64
    within the focal exception 2 gamma + 4 (``focal_tol``), soft targets included: this guards
    1 - p_t formed as t s(-x) + (1 - t) s(x), two rounded sigmoids whose error b^gamma
    multiplied past the exception (largest float64 loss errors on 2e5 soft-target elements,
    logits 1e-3..2e2: gamma 3.5 13.6 ulp, gamma 5 18.2; with ``one_minus_p_t``'s quotient 8.2
    and 10.3)."""
    from helpers import sigmoid_focal_grad_scale

    x, t_hard, t_soft = _sigmoid_focal_rows(dtype, 2 * BLOCK + 37, seed=int(gamma * 10) + 3)
    tol = focal_tol(gamma, dtype)
    for t in (t_hard, t_soft):
        loss, rows, grad = _sigmoid_focal_fast(x, t, alpha, gamma)
        exact = oracle.sigmoid_focal_loss(x, t, alpha, gamma)
        exact_g = oracle.sigmoid_focal_loss_grad(x, t, alpha, gamma)
        scale = sigmoid_focal_grad_scale(x, t, alpha, gamma)
        assert_ulp(loss.astype(dtype), exact, dtype, tol, "loss")
        assert_ulp(rows.astype(dtype), exact.sum(axis=1), dtype, tol, "row sums")
        if t is t_hard:
            assert_ulp(grad, exact_g, dtype, tol, "gradient")
        else:
            assert_ulp_of_scale(grad, exact_g, scale, dtype, tol, "gradient")


@pytest.mark.parametrize("gamma", SIGMOID_FOCAL_GAMMAS + [5.0])
def test_sigmoid_focal_soft_targets_within_the_focal_exception_in_both_kernels(gamma):
    """float64 soft targets, the case where 1 - p_t as a sum of two rounded sigmoids went past
    the exception 2 gamma + 4 (b^gamma multiplies b's error by gamma): the fast kernel and the
    reference kernel (``scalar.sigmoid_focal``, which the CUDA kernels also compile) share
    ``scalar.one_minus_p_t`` (their exp and log1p differ: the vectorised ones and libm's);
    gradients in ulps of their terms' magnitudes."""
    from helpers import sigmoid_focal_grad_scale

    rng = np.random.default_rng(int(gamma * 10) + 11)
    c = 4 * BLOCK
    x = np.exp(rng.uniform(np.log(1e-3), np.log(2e2), (4, c))) * rng.choice([-1.0, 1.0], (4, c))
    t = rng.uniform(0.0, 1.0, (4, c))
    tol = focal_tol(gamma, np.float64)
    exact = oracle.sigmoid_focal_loss(x, t, 0.25, gamma)
    exact_g = oracle.sigmoid_focal_loss_grad(x, t, 0.25, gamma)
    scale = sigmoid_focal_grad_scale(x, t, 0.25, gamma)
    fast_loss, _, fast_grad = _sigmoid_focal_fast(x, t, 0.25, gamma)
    ref_loss, ref_grad = np.empty(x.shape), np.empty(x.shape)
    cpu.sigmoid_focal_fwd_grad(x, t, 0.25, gamma, 1.0, ref_loss, ref_grad)
    for loss, grad, name in ((fast_loss, fast_grad, "fast"), (ref_loss, ref_grad, "reference")):
        assert_ulp(loss, exact, np.float64, tol, f"{name} loss")
        assert_ulp_of_scale(grad, exact_g, scale, np.float64, tol, f"{name} gradient")


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_sigmoid_focal_soft_target_loss_keeps_4_ulp_with_the_class_weight_as_a_pair(gamma):
    """float64 soft targets at gamma <= 1 within the plain contract (4 ulp) in both kernels.
    Guards alpha_t = alpha t + (1 - alpha)(1 - t) rounded to one float64 before alpha_t ce: its
    ulp went into the loss (largest errors on these 2e5 elements, gamma 0 / 0.5 / 1: 4.03 /
    4.28 / 4.56 ulp; with ``scalar.alpha_t_pair`` and ``times_pair`` 2.65 / 3.58 / 3.92)."""
    rng = np.random.default_rng(5)
    n = 200_000
    x = np.exp(rng.uniform(np.log(1e-3), np.log(2e2), n)) * rng.choice([-1.0, 1.0], n)
    t = rng.random(n)
    x, t = x.reshape(1, n), t.reshape(1, n)
    exact = oracle.sigmoid_focal_loss(x, t, 0.25, gamma)
    fast_loss, _, _ = _sigmoid_focal_fast(x, t, 0.25, gamma)
    ref_loss = np.empty(x.shape)
    cpu.sigmoid_focal_fwd(x, t, 0.25, gamma, ref_loss)
    assert_ulp(fast_loss, exact, np.float64, 4, "fast loss")
    assert_ulp(ref_loss, exact, np.float64, 4, "reference loss")


def test_scalar_fma_rounds_once_in_python():
    """``scalar.fma`` outside numba (the CUDA simulator's FMA, whose a * b + c rounds twice,
    would make the error-free product c1 e = p + p_lo lose p_lo): (1 + u)(1 - u) - 1 = -u^2."""
    from cestudy.kernels import scalar

    u = 2.0**-30
    assert (1.0 + u) * (1.0 - u) - 1.0 == 0.0
    assert scalar.fma(1.0 + u, 1.0 - u, -1.0) == -(u * u)
    assert math.isnan(scalar.fma(math.inf, 0.0, 1.0))
    assert scalar.fma(math.inf, 2.0, 1.0) == math.inf


def test_scalar_two_sum_and_two_diff_are_exact_in_python_and_compiled():
    """TwoSum leaves no error behind: s + err = a + b exactly, for operands of any relative
    magnitude and either order (Fast2Sum, which needs |a| >= |b|, would lose the small operand
    when it comes first), in plain Python (the CUDA simulator) and compiled by numba."""
    from fractions import Fraction

    from cestudy.kernels import scalar

    rng = np.random.default_rng(21)
    a = rng.standard_normal(2000) * 10.0 ** rng.integers(-30, 30, 2000)
    b = rng.standard_normal(2000) * 10.0 ** rng.integers(-30, 30, 2000)
    compiled = njit(lambda a, b: (cpu.two_sum(a, b), cpu.two_diff(a, b)))
    for ai, bi in zip(a.tolist(), b.tolist()):
        python = (scalar.two_sum(ai, bi), scalar.two_diff(ai, bi))
        for (s, e), (d, f) in (python, compiled(ai, bi)):
            assert s == ai + bi and Fraction(s) + Fraction(e) == Fraction(ai) + Fraction(bi)
            assert d == ai - bi and Fraction(d) + Fraction(f) == Fraction(ai) - Fraction(bi)
    assert scalar.two_diff(math.inf, math.inf)[1] == 0.0  # the guarded non-finite case


# x, t, each named after the failure it guards
SIGMOID_FOCAL_EXTREMES = {
    # 1 - p_t formed as 1 - s(x) rounds to 0: the loss of a confident correct logit is lost
    "tiny_loss_of_confident_positive_not_rounded_to_zero": ([17.0, 30.0, 88.0, 100.0], 1.0),
    "tiny_loss_of_confident_negative_not_rounded_to_zero": ([-17.0, -30.0, -88.0, -100.0], 0.0),
    # log(s(x)) with s(x) rounded to 0 gives inf; the loss is |x| (times alpha_t)
    "large_loss_of_confident_wrong_logit_not_inf": ([-100.0, -104.0, -745.5, -1e30], 1.0),
    # exp(-|x|) below the float64 range (the vectorised exp's flush): s(-x) = 0, b = 0, and for
    # gamma < 1 b^(gamma - 1) = inf: the guarded term must give 0, not 0 * inf = NaN
    "exp_underflow_gives_zero_gradient_not_nan": ([745.5, 800.0, 1e30, -800.0], 1.0),
    # a float64 loss in the subnormal range, rounded once
    "subnormal_loss_keeps_its_bits": ([-480.0, -700.0, 480.0, 700.0], 0.0),
    # soft targets: (1 - 2t) = 0 at t = 1/2, b a sum of two positive terms
    "soft_target_half_no_cancellation_in_b": ([-40.0, -1.0, 1.0, 40.0], 0.5),
}


@pytest.mark.parametrize("case", sorted(SIGMOID_FOCAL_EXTREMES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("gamma", SIGMOID_FOCAL_GAMMAS)
def test_sigmoid_focal_extreme_logits_match_the_oracle(case, dtype, gamma):
    """Extreme logits, each case in a row of several blocks (at its start and in the last
    block), loss and gradient against the oracle, alpha 0.25 and none."""
    xs, tv = SIGMOID_FOCAL_EXTREMES[case]
    c = BLOCK + 9
    x = np.zeros((2, c))
    x[:, :4] = xs
    x[:, -4:] = xs
    x = x.astype(dtype)
    t = np.full(x.shape, tv, dtype)
    t[1] = 1.0 - t[1]  # the other side too
    for alpha in (0.25, -1.0):
        loss, rows, grad = _sigmoid_focal_fast(x, t, alpha, gamma)
        tol = focal_tol(gamma, dtype)
        exact = oracle.sigmoid_focal_loss(x, t, alpha, gamma)
        assert_ulp(loss.astype(dtype), exact, dtype, tol, "loss")
        if case.startswith("tiny"):
            assert np.all(loss[0, :4] > 0)
        exact_g = oracle.sigmoid_focal_loss_grad(x, t, alpha, gamma)
        assert np.isfinite(exact_g.astype(np.float64)).all()
        assert_ulp(grad, exact_g, dtype, tol, "gradient")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("gamma", SIGMOID_FOCAL_GAMMAS)
def test_sigmoid_focal_nan_and_inf_logits_as_the_reference_kernel(dtype, gamma):
    """NaN and +-inf logits give the reference kernel's loss and gradient (IEEE: NaN stays NaN
    in loss and gradient, also for gamma = 0 where nothing multiplies it by a power; 0 * inf =
    NaN where the target's side of the loss is the infinite softplus) and the oracle's, and
    leave the other elements of the row alone. The float64 rows take the exp of a separate
    loop whose flush would turn a NaN into e = 0 and a finite gradient."""
    specials = [np.nan, np.inf, -np.inf, -np.nan]
    c = BLOCK + 6
    x = np.tile(np.linspace(-5, 5, c), (3, 1))
    x[:, :4] = specials
    x[:, -4:] = specials
    x = x.astype(dtype)
    t = np.stack([np.zeros(c), np.ones(c), np.full(c, 0.3)]).astype(dtype)
    for alpha in (0.25, -1.0):
        loss, rows, grad = _sigmoid_focal_fast(x, t, alpha, gamma)
        ref_loss, ref_grad = np.empty(x.shape), np.empty_like(x)
        cpu.sigmoid_focal_fwd_grad(x, t, alpha, gamma, 1.0, ref_loss, ref_grad)
        np.testing.assert_array_equal(np.isnan(loss), np.isnan(ref_loss))
        np.testing.assert_array_equal(np.isnan(grad), np.isnan(ref_grad))
        bad = ~np.isfinite(ref_loss) | ~np.isfinite(ref_grad)
        np.testing.assert_array_equal(loss[bad & ~np.isnan(loss)], ref_loss[bad & ~np.isnan(loss)])
        assert np.isnan(loss[:, [0, 3, -4, -1]]).all() and np.isnan(grad[:, [0, 3, -4, -1]]).all()
        with np.errstate(invalid="ignore", over="ignore"):
            exact = oracle.sigmoid_focal_loss(x, t, alpha, gamma)
        tol = focal_tol(gamma, dtype)
        assert_ulp(loss.astype(dtype), exact, dtype, tol, "loss")
        assert np.isnan(rows).all()


def test_fast_bce_with_logits_float64_nan_logit_has_a_nan_gradient():
    """float64 BCE with logits: a NaN logit gave the gradient -pw t (the exp's flush made
    e = 0); it is NaN, as in the reference kernel and torch."""
    x = np.array([[np.nan, 1.0, -np.nan]])
    t = np.array([[1.0, 0.0, 0.0]])
    w = np.ones((1, 3))
    loss, grad = np.empty(x.shape), np.empty_like(x)
    cpu_fast.bce_with_logits_fwd_grad(x, t, w, w, 1.0, loss, grad)
    assert np.isnan(grad[0, [0, 2]]).all() and np.isnan(loss[0, [0, 2]]).all()
    assert np.isfinite(grad[0, 1])


def _rows_before_a_guard_page(n, c, dtype):
    """An (n, c) array whose last byte is the last byte before a page mapped PROT_NONE: any read
    past the last row faults (the mapping lives as long as the array, its base)."""
    page = mmap.PAGESIZE
    size = n * c * np.dtype(dtype).itemsize
    assert size % page == 0
    region = mmap.mmap(-1, size + page)
    start = ctypes.addressof(ctypes.c_char.from_buffer(region))
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mprotect(ctypes.c_void_p(start + size), ctypes.c_size_t(page), 0) == 0
    return np.frombuffer(region, dtype, n * c).reshape(n, c)


@pytest.mark.skipif(sys.platform != "linux", reason="mprotect from the C library")
@pytest.mark.parametrize("c", [4 * BLOCK, 17 * BLOCK])  # the maximum first; the online path
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_prefetch_hints_past_the_last_row_never_fault(dtype, c):
    """The streaming exp hints the next row's (or block's) memory while it computes
    (``exp_block_streaming``); past the last row that memory may not be mapped, and a hint must
    never become a read there (which would kill the process)."""
    x = _rows_before_a_guard_page(2, c, dtype)
    x[:] = np.random.default_rng(9).standard_normal((2, c))
    y = np.array([1, c - 1])
    loss, grad = run_fast(x, y)
    assert_ulp(loss.astype(dtype), oracle.cross_entropy(x, y), dtype)
    assert_ulp(grad, oracle.cross_entropy_grad(x, y), dtype)
    focal = cestudy.softmax_focal_loss(x, y, reduction="none")
    assert_ulp(focal, oracle.softmax_focal_loss(x, y, gamma=2.0), dtype)
