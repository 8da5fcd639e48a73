"""Extreme inputs checked against the oracle, each test named after the failure it guards.

Gradients here have hard targets: the contract (tests/helpers.py) holds them element-wise."""

import numpy as np
import pytest

import cestudy as cs
from cestudy.reference import oracle

from helpers import assert_kl_ulp, assert_ulp, focal_tol

DTYPES = [np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES)
def test_confident_correct_rows_keep_tiny_losses(dtype):
    # lse - x_y and torch return 0 here (100% error); the exact losses are 1e-8 .. 1e-37 (f32)
    margins = [20, 50, 69, 85] if dtype == np.float32 else [20, 50, 69, 100, 300, 700]
    x = np.zeros((len(margins), 10), dtype)
    x[:, 3] = margins
    y = np.full(len(margins), 3)
    loss, grad = cs.cross_entropy_with_grad(x, y, reduction="none")
    assert np.all(loss > 0)
    assert_ulp(loss, oracle.cross_entropy(x, y), dtype)
    assert_ulp(grad, oracle.cross_entropy_grad(x, y), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_true_class_gradient_does_not_vanish_when_p_y_rounds_to_one(dtype):
    # softmax - onehot gives exactly 0 for the true class when p_y rounds to 1
    x = np.array([[30.0, 0.0, -1.0], [45.0, 2.0, 1.0]], dtype)
    y = np.array([0, 0])
    _, grad = cs.cross_entropy_with_grad(x, y, reduction="none")
    assert np.all(grad[:, 0] < 0)
    assert_ulp(grad[:, 0], oracle.cross_entropy_grad(x, y)[:, 0], dtype)


@pytest.mark.parametrize(
    "dtype,offset", [(np.float32, 1e6), (np.float32, 1e8), (np.float64, 1e15), (np.float64, 1e300)]
)
def test_equal_logits_at_large_offset_give_log_c(dtype, offset):
    # lse - x_y gives 0 at offset 1e8 in float32 (true value log 3 = 1.0986)
    x = np.full((2, 3), offset, dtype)
    y = np.array([0, 2])
    loss = cs.cross_entropy(x, y, reduction="none")
    assert_ulp(loss, np.full(2, np.log(np.longdouble(3))), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_classes_with_minus_inf_contribute_zero(dtype):
    x = np.array([[2.0, -np.inf, 0.5, -np.inf]], dtype)
    y = np.array([0])
    loss, grad = cs.cross_entropy_with_grad(x, y, reduction="none")
    assert np.isfinite(loss).all()
    assert grad[0, 1] == 0 and grad[0, 3] == 0
    assert_ulp(loss, oracle.cross_entropy(x, y), dtype)
    assert_ulp(grad, oracle.cross_entropy_grad(x, y), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_label_smoothing_with_minus_inf_logits_is_inf_and_zero_weight_gives_nan(dtype, torch):
    x = np.array([[2.0, -np.inf, 0.5]], dtype)
    y = np.array([0])
    loss = cs.cross_entropy(x, y, label_smoothing=0.1, reduction="none")
    assert np.isposinf(loss[0])
    ref = torch.nn.functional.cross_entropy(
        torch.tensor(x), torch.tensor(y), label_smoothing=0.1, reduction="none"
    )
    assert np.isposinf(ref.numpy()[0])
    w = np.array([1.0, 0.0, 1.0])
    loss_w = cs.cross_entropy(x, y, weight=w, label_smoothing=0.1, reduction="none")
    assert np.isnan(loss_w[0])  # 0 * inf, as torch


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_minus_inf_row_and_plus_inf_and_nan_rows_give_nan(dtype):
    x = np.array([[-np.inf, -np.inf], [np.inf, 0.0], [np.nan, 1.0], [1.0, 2.0]], dtype)
    y = np.array([0, 0, 1, 1])
    loss, grad = cs.cross_entropy_with_grad(x, y, reduction="none")
    assert np.isnan(loss[:3]).all() and np.isnan(grad[:3]).all()
    assert np.isfinite(loss[3]) and np.isfinite(grad[3]).all()


def test_bce_logit_18_in_float32_keeps_the_tiny_loss():
    # sigmoid(18) rounds to 1 in float32: -log(sigmoid) gives 0, torch's BCELoss on probs 100
    x = np.array([18.0, -18.0, 40.0], np.float32)
    t = np.array([1.0, 0.0, 1.0], np.float32)
    loss, grad = cs.binary_cross_entropy_with_logits_with_grad(x, t, reduction="none")
    assert np.all(loss > 0) and np.all(grad != 0)
    assert_ulp(loss, oracle.binary_cross_entropy_with_logits(x, t), np.float32)
    assert_ulp(grad, oracle.binary_cross_entropy_with_logits_grad(x, t), np.float32)
    probs = (1 / (1 + np.exp(-x.astype(np.float64)))).astype(np.float32)
    clamped = cs.binary_cross_entropy(probs, 1 - t, reduction="none")
    assert clamped[0] == pytest.approx(100.0)  # the documented clamp of torch's BCELoss


@pytest.mark.parametrize("dtype", DTYPES)
def test_logits_104_0_do_not_overflow(dtype):
    # exp(104) overflows float32: naive softmax gives NaN
    x = np.array([[104.0, 0.0]], dtype)
    for y in (0, 1):
        t = np.array([y])
        loss, grad = cs.cross_entropy_with_grad(x, t, reduction="none")
        assert_ulp(loss, oracle.cross_entropy(x, t), dtype)
        assert_ulp(grad, oracle.cross_entropy_grad(x, t), dtype)
    assert_ulp(cs.logsumexp(x), oracle.logsumexp(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_targets_ignored_mean_is_nan_as_torch(dtype):
    x = np.ones((3, 4), dtype)
    y = np.full(3, -100)
    assert np.isnan(cs.cross_entropy(x, y))
    assert cs.cross_entropy(x, y, reduction="sum") == 0
    loss, grad = cs.cross_entropy_with_grad(x, y, reduction="sum")
    assert np.all(grad == 0)


@pytest.mark.parametrize("dtype", [np.float16, cs.dtypes.bfloat16])
def test_low_precision_inputs_are_computed_in_float32_and_returned_in_their_dtype(dtype):
    x = np.array([[4096.0, 4096.0, 4096.0], [8.0, 0.0, -8.0]]).astype(dtype)
    y = np.array([0, 0])
    loss, grad = cs.cross_entropy_with_grad(x, y, reduction="none")
    assert loss.dtype == np.dtype(dtype) and grad.dtype == np.dtype(dtype)
    # equal logits at 4096: lse - x_y gives 0 in float16; the exact value is log 3
    assert_ulp(loss, oracle.cross_entropy(x, y), dtype, tol=1.0)
    # the gradient too: float32 within 1 ulp, then one rounding to the input's dtype; the
    # true-class -S/(1+S) = -2/3 at 4096 and -3.4e-4 at [8, 0, -8], the smallest 1.1e-7
    # (a float16 subnormal)
    assert_ulp(grad, oracle.cross_entropy_grad(x, y), dtype, tol=1.0)
    assert grad[1, 0] < 0 and grad[1, 2] > 0
    fl, fg = cs.softmax_focal_loss_with_grad(x, y, reduction="none")
    assert fl.dtype == np.dtype(dtype) and fg.dtype == np.dtype(dtype)
    assert_ulp(fl, oracle.softmax_focal_loss(x, y), dtype, tol=1.0)
    assert_ulp(fg, oracle.softmax_focal_loss_grad(x, y), dtype, tol=1.0)
    # float16 reductions: torch's float16 sum overflows 65504 long before the mean does; here the
    # batch is accumulated in float64 and only the result is rounded
    zeros = np.zeros((100000, 2), dtype)
    mean = cs.cross_entropy(zeros, np.zeros(100000, int), reduction="mean")
    assert_ulp(mean, np.log(np.longdouble(2)), dtype, tol=0.5)
    total = cs.cross_entropy(zeros, np.zeros(100000, int), reduction="sum")
    if dtype == np.float16:
        assert np.isposinf(total)  # 69315 is not representable in float16
    else:
        assert_ulp(total, 100000 * np.log(np.longdouble(2)), dtype, tol=0.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_focal_losses_keep_tiny_values_of_confident_rows(dtype):
    x = np.array([[40.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-3.0, 5.0, 1.0]], dtype)
    y = np.array([0, 1, 2])
    loss, grad = cs.softmax_focal_loss_with_grad(x, y, reduction="none")
    if dtype == np.float64:
        assert loss[0] > 0  # (1 - p_y)^2 (-log p_y) = 6e-52: 1 - p_y rounds to 0 in the naive form
    assert_ulp(loss, oracle.softmax_focal_loss(x, y), dtype, tol=focal_tol(2.0, dtype))
    assert_ulp(grad, oracle.softmax_focal_loss_grad(x, y), dtype, tol=focal_tol(2.0, dtype))
    xs = np.array([30.0, -30.0, 0.5, 12.0], dtype)
    ts = np.array([1.0, 0.0, 1.0, 0.0], dtype)
    sl, sg = cs.sigmoid_focal_loss_with_grad(xs, ts)
    tol = focal_tol(2.0, dtype)  # float64 focal losses: 2 gamma + 4 ulp (tests/helpers.py)
    assert_ulp(sl, oracle.sigmoid_focal_loss(xs, ts), dtype, tol=tol)
    assert_ulp(sg, oracle.sigmoid_focal_loss_grad(xs, ts), dtype, tol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_of_identical_distributions_is_zero_and_decomposition_holds(dtype):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20, 30)).astype(dtype)
    p = cs.softmax(x)
    kl = cs.kl_divergence(x, p, reduction="none")
    # p is softmax(x) rounded: the exact KL is O(eps^2), a difference of terms of size
    # H(p, q) ~ log 30; the contract holds it to 4 ulp of H(p, q) (of the oracle's KL, which
    # resolves it to 2^-60 H)
    h = oracle.cross_entropy_probs(x, p)
    assert np.all((h > 2) & (h < 4))
    assert_kl_ulp(kl, oracle.kl_divergence(x, p), h, dtype)
    q = rng.dirichlet(np.ones(30), 20).astype(dtype)
    ce = cs.cross_entropy(x, q, reduction="none")
    h = cs.entropy(q)
    kl = cs.kl_divergence(x, q, reduction="none")
    assert_ulp(
        h.astype(np.float64) + kl.astype(np.float64),
        oracle.cross_entropy_probs(x, q),
        dtype,
        tol=4.0,
    )
    assert_ulp(ce, oracle.cross_entropy_probs(x, q), dtype)
