"""The vectorised float32 kernels (cestudy.kernels.cpu_fast): their exp over its whole input
range, and the same extreme cases and contract as the reference kernels."""
import math

import numpy as np
import pytest
from numba import njit

from cestudy.reference import oracle
from cestudy.kernels import cpu, cpu_fast

from helpers import assert_grad_ulp, assert_ulp


@njit
def _exp_many(d, out):
    for i in range(d.shape[0]):
        out[i] = cpu_fast.exp_neg(d[i])


def test_exp_neg_relative_error_over_its_whole_input_range():
    d = np.concatenate([-np.logspace(-300, np.log10(708), 200000),
                        np.linspace(-708, 0, 200001), [0.0, -0.0, -708.0]])
    out = np.empty_like(d)
    _exp_many(d, out)
    exact = np.exp(d.astype(np.longdouble))
    rel = np.abs(out - exact) / exact
    assert rel.max() < 1e-11  # 7e-12 truncation bound of the degree-9 polynomial, 2e-4 f32 ulp
    special = np.array([-709.0, -1e4, -np.inf, np.nan])
    out = np.empty_like(special)
    _exp_many(special, out)
    assert out[0] == 0 and out[1] == 0 and out[2] == 0 and math.isnan(out[3])


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
    "confident_correct_tiny_loss": (np.array([[20.0, 0, 0], [60.0, 1, 2], [87.0, 0, -3]]),
                                    [0, 0, 0]),
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
    assert_ulp(loss, oracle.cross_entropy(x, y, label_smoothing=eps), np.float32)
    exact_g = oracle.cross_entropy_grad(x, y, label_smoothing=eps)
    finite = np.isfinite(exact_g).all(axis=1)
    assert_grad_ulp(grad[finite], exact_g[finite], np.float32)


def test_nan_plus_inf_and_all_minus_inf_rows_are_nan():
    x = np.array([[np.nan, 0, 1], [np.inf, 0, 1], [-np.inf, -np.inf, -np.inf], [1, 2, 3]],
                 np.float32)
    loss, grad = run_fast(x, np.array([0, 1, 2, 2]))
    assert np.isnan(loss[:3]).all() and np.isnan(grad[:3]).all() and np.isfinite(loss[3])


@pytest.mark.parametrize("c", [2, 31, 1000, 262144])
def test_random_rows_agree_with_reference_kernel_and_oracle(c):
    rng = np.random.default_rng(c)
    n = 6 if c > 1000 else 40
    x = (rng.normal(size=(n, c)) * 10.0 ** rng.uniform(-2, 2.5, (n, 1))).astype(np.float32)
    y = np.where(np.arange(n) % 2 == 0, np.argmax(x, 1), rng.integers(0, c, n))
    w = rng.uniform(0.1, 3, c)
    for eps in (0.0, 0.2):
        loss, grad = run_fast(x, y, w, eps, 1.0 / n)
        ref = np.empty(n)
        ref_g = np.empty_like(x)
        cpu.cross_entropy_index_fwd_grad(x, y, w, -100, eps, 1.0 / n, ref, ref_g)
        assert_ulp(loss, oracle.cross_entropy(x, y, w, label_smoothing=eps), np.float32, tol=1)
        np.testing.assert_allclose(loss, ref, rtol=1e-9)
        exact_g = oracle.cross_entropy_grad(x, y, w, label_smoothing=eps) / n
        assert_grad_ulp(grad, exact_g, np.float32, tol=2)


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
    loss = np.empty(30)
    fused = np.empty(30)
    grad = np.empty_like(x)
    cpu_fast.cross_entropy_prob_fwd(x, p, w, eps, loss)
    cpu_fast.cross_entropy_prob_fwd_grad(x, p, w, eps, 1.0, fused, grad)
    np.testing.assert_array_equal(loss, fused)
    exact = oracle.cross_entropy_probs(x, p, w, eps)
    assert_ulp(loss, exact, np.float32, tol=1)
    ok = np.isfinite(exact)
    assert_grad_ulp(grad[ok], oracle.cross_entropy_probs_grad(x, p, w, eps)[ok], np.float32,
                    tol=2)


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
    assert_ulp(loss.astype(np.float32)[ok], oracle.binary_cross_entropy_with_logits(x, t, w, pw)[ok],
               np.float32, tol=1)
    assert_ulp(grad[ok], oracle.binary_cross_entropy_with_logits_grad(x, t, w, pw)[ok], np.float32, tol=1)


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
    assert_ulp(loss.astype(np.float32), oracle.binary_cross_entropy_with_logits(x, t, w_row, pw_row), np.float32,
               tol=1)
