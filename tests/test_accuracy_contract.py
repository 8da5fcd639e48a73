"""The accuracy contract (stated in ``tests/helpers.py``) on every public function, float32 and
float64, each with the measure the contract names for it: values and hard-target gradients
element-wise, soft-target gradients in ulps of the larger term they subtract, focal losses in
float64 to 2 gamma + 4 ulp, KL in ulps of H(p, q), reductions against the exact mean and sum.

Inputs mix ordinary rows with the extremes the contract names: confident rows (tiny losses),
large offsets, -inf masked classes, wide logit scales.
"""

import numpy as np
import pytest

import cestudy as cs
from cestudy.reference import oracle

from helpers import (
    assert_kl_ulp,
    assert_ulp,
    assert_ulp_of_scale,
    bce_grad_scale,
    focal_tol,
    probs_target,
    sigmoid_focal_grad_scale,
    smoothed_index_target,
    soft_grad_scale,
)

DTYPES = [np.float32, np.float64]
LD = np.longdouble


def mixed_logits(rng, n, c, dtype):
    """Rows at scales 1e-2..1e3 (float64: 1e4), some confident, some masked, some offset."""
    top = 3 if dtype == np.float32 else 4
    scales = 10.0 ** rng.uniform(-2, top, n)
    x = rng.normal(size=(n, c)) * scales[:, None]
    x[::5] += rng.choice([-1e6, 1e4, 3e7], size=(len(x[::5]), 1))
    x[1::7, : max(1, c // 4)] = -np.inf
    return x.astype(dtype)


def index_targets(rng, x):
    """The argmax for half the rows (confident-correct), random otherwise, never a -inf class."""
    n, c = x.shape
    k = np.argmax(x, 1)
    y = np.where(rng.uniform(size=n) < 0.5, k, rng.integers(0, c, n))
    masked = x[np.arange(n), y] == -np.inf
    y[masked] = k[masked]
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [2, 17, 1000])
def test_cross_entropy_index_weight_smoothing_ignore(dtype, c):
    rng = np.random.default_rng(c)
    x = mixed_logits(rng, 60, c, dtype)
    y = index_targets(rng, x)
    y[7] = -100
    w = rng.uniform(0.1, 3, c)
    for opts in (
        {},
        {"weight": w},
        {"label_smoothing": 0.1},
        {"label_smoothing": 0.1, "weight": w},
    ):
        what = f"{sorted(opts)}"
        loss, grad = cs.cross_entropy_with_grad(x, y, reduction="none", **opts)
        exact = oracle.cross_entropy(x, y, **opts)
        assert_ulp(loss, exact, dtype, what=f"loss {what}")
        exact_g = oracle.cross_entropy_grad(x, y, **opts)
        ok = np.isfinite(exact)  # smoothing over a masked class: loss +inf (tested elsewhere)
        if "label_smoothing" in opts:
            a = smoothed_index_target(y, c, opts.get("weight"), opts["label_smoothing"])
            assert_ulp_of_scale(
                grad[ok], exact_g[ok], soft_grad_scale(x, a)[ok], dtype, what=f"grad {what}"
            )
        else:
            assert_ulp(grad, exact_g, dtype, what=f"grad {what}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_smoothed_rows_with_masked_classes_gradient(dtype):
    """Label smoothing over -inf classes: the loss is +inf (as torch), the gradient is finite,
    -eps w_j / C on the masked classes, and held to the soft-target measure."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(12, 9)) * 5
    x[:, [1, 4]] = -np.inf
    x[::3, 6] = 60.0  # confident rows too
    x = x.astype(dtype)
    y = rng.choice([0, 2, 6, 8], 12)
    w = rng.uniform(0.5, 2, 9)
    loss, grad = cs.cross_entropy_with_grad(x, y, weight=w, label_smoothing=0.2, reduction="none")
    assert np.isposinf(loss).all()
    exact_g = oracle.cross_entropy_grad(x, y, w, label_smoothing=0.2)
    a = smoothed_index_target(y, 9, w, 0.2)
    assert_ulp_of_scale(grad, exact_g, soft_grad_scale(x, a), dtype)
    assert_ulp(grad[:, [1, 4]], exact_g[:, [1, 4]], dtype, what="masked columns")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_probability_kl_entropy(dtype):
    rng = np.random.default_rng(11)
    x = mixed_logits(rng, 40, 50, dtype)
    x[np.isinf(x)] = -30.0  # soft targets put mass on every class
    p = rng.dirichlet(np.full(50, 0.3), 40).astype(dtype)
    p[3] = cs.softmax(x[3:4])[0]  # q ~ p: the gradient cancels throughout the row
    w = rng.uniform(0.5, 2, 50)
    for opts in ({}, {"weight": w, "label_smoothing": 0.05}):
        loss, grad = cs.cross_entropy_with_grad(x, p, reduction="none", **opts)
        assert_ulp(loss, oracle.cross_entropy_probs(x, p, **opts), dtype)
        assert_ulp_of_scale(
            grad,
            oracle.cross_entropy_probs_grad(x, p, **opts),
            soft_grad_scale(x, probs_target(p, **opts)),
            dtype,
        )
    kl, kgrad = cs.kl_divergence_with_grad(x, p, reduction="none")
    assert_kl_ulp(kl, oracle.kl_divergence(x, p), oracle.cross_entropy_probs(x, p), dtype)
    assert_ulp_of_scale(
        kgrad, oracle.kl_divergence_grad(x, p), soft_grad_scale(x, probs_target(p)), dtype
    )
    assert_ulp(cs.entropy(p), oracle.entropy(p), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 5.0])
def test_softmax_focal_with_and_without_weight(dtype, gamma):
    rng = np.random.default_rng(int(gamma * 10))
    x = mixed_logits(rng, 50, 30, dtype)
    y = index_targets(rng, x)
    y[5] = -100
    w = rng.uniform(0.1, 3, 30)
    tol = focal_tol(gamma, dtype)
    for weight in (None, w):
        loss, grad = cs.softmax_focal_loss_with_grad(
            x, y, gamma=gamma, weight=weight, reduction="none"
        )
        what = f"weight={weight is not None}"
        assert_ulp(
            loss,
            oracle.softmax_focal_loss(x, y, gamma, weight),
            dtype,
            tol=tol,
            what=f"loss {what}",
        )
        assert_ulp(
            grad,
            oracle.softmax_focal_loss_grad(x, y, gamma, weight),
            dtype,
            tol=tol,
            what=f"grad {what}",
        )


def _sigmoid_inputs(dtype):
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(40, 25)) * 10.0 ** rng.uniform(-2, 2, (40, 1))).astype(dtype)
    t_hard = np.round(rng.uniform(size=x.shape)).astype(dtype)
    t_soft = rng.uniform(size=x.shape).astype(dtype)
    return rng, x, t_hard, t_soft


@pytest.mark.parametrize("dtype", DTYPES)
def test_bce_with_logits_weight_and_pos_weight(dtype):
    rng, x, t_hard, t_soft = _sigmoid_inputs(dtype)
    pw = rng.uniform(0.5, 4, 25)
    w = rng.uniform(0, 2, x.shape)
    for opts in ({}, {"pos_weight": pw}, {"weight": w}, {"weight": w[0], "pos_weight": pw}):
        for t in (t_hard, t_soft):
            loss, grad = cs.binary_cross_entropy_with_logits_with_grad(
                x, t, reduction="none", **opts
            )
            what = f"{sorted(opts)} hard={t is t_hard}"
            assert_ulp(
                loss,
                oracle.binary_cross_entropy_with_logits(x, t, **opts),
                dtype,
                what=f"loss {what}",
            )
            exact_g = oracle.binary_cross_entropy_with_logits_grad(x, t, **opts)
            if t is t_hard:
                assert_ulp(grad, exact_g, dtype, what=f"grad {what}")
            else:
                assert_ulp_of_scale(
                    grad, exact_g, bce_grad_scale(x, t, **opts), dtype, what=f"grad {what}"
                )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [0.25, 0.75, 0.0, -1.0])
def test_sigmoid_focal_alpha_and_gamma(dtype, alpha):
    _, x, t_hard, t_soft = _sigmoid_inputs(dtype)
    for gamma in (0.0, 1.0, 2.0, 3.5):
        tol = focal_tol(gamma, dtype)
        for t in (t_hard, t_soft):
            what = f"gamma={gamma} hard={t is t_hard}"
            sl, sg = cs.sigmoid_focal_loss_with_grad(
                x, t, alpha=alpha, gamma=gamma, reduction="none"
            )
            assert_ulp(
                sl,
                oracle.sigmoid_focal_loss(x, t, alpha, gamma),
                dtype,
                tol=tol,
                what=f"loss {what}",
            )
            exact_g = oracle.sigmoid_focal_loss_grad(x, t, alpha, gamma)
            if t is t_hard:
                assert_ulp(sg, exact_g, dtype, tol=tol, what=f"grad {what}")
            else:
                assert_ulp_of_scale(
                    sg,
                    exact_g,
                    sigmoid_focal_grad_scale(x, t, alpha, gamma),
                    dtype,
                    tol=tol,
                    what=f"grad {what}",
                )


@pytest.mark.parametrize("dtype", DTYPES)
def test_binary_cross_entropy_on_probabilities(dtype):
    """(5) of the contract: torch's clamped BCELoss on the given (already rounded) p."""
    rng = np.random.default_rng(8)
    p = rng.uniform(size=(30, 7))
    p[0] = [0.0, 1.0, 1e-30, 1 - 1e-7, 1e-45, 0.5, 1e-300 if dtype == np.float64 else 1e-40]
    p = p.astype(dtype)
    t = rng.uniform(size=p.shape).astype(dtype)
    t[1] = np.round(t[1])
    w = rng.uniform(0, 2, p.shape)
    for opts in ({}, {"weight": w}):
        got = cs.binary_cross_entropy(p, t, reduction="none", **opts)
        assert_ulp(got, oracle.binary_cross_entropy(p, t, **opts), dtype, what=f"{sorted(opts)}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_reductions_mean_and_sum_against_the_exact_sums(dtype):
    """(4): sum = exact sum of the exact per-sample losses; mean = the weighted mean over
    non-ignored rows (cross_entropy), the plain mean otherwise."""
    rng = np.random.default_rng(12)
    x = mixed_logits(rng, 300, 40, dtype)
    x[np.isinf(x)] = -50.0
    y = index_targets(rng, x)
    y[::11] = -100
    w = rng.uniform(0.1, 3, 40)
    for opts in ({}, {"weight": w}, {"weight": w, "label_smoothing": 0.1}):
        per = oracle.cross_entropy(x, y, **opts)
        wy = (w if "weight" in opts else np.ones(40))[np.where(y == -100, 0, y)] * (y != -100)
        assert_ulp(
            cs.cross_entropy(x, y, reduction="sum", **opts),
            per.sum(),
            dtype,
            what=f"sum {sorted(opts)}",
        )
        assert_ulp(
            cs.cross_entropy(x, y, reduction="mean", **opts),
            per.sum() / wy.astype(LD).sum(),
            dtype,
            what=f"mean {sorted(opts)}",
        )
    p = rng.dirichlet(np.ones(40), 300).astype(dtype)
    per = oracle.cross_entropy_probs(x, p)
    assert_ulp(cs.cross_entropy(x, p, reduction="mean"), per.mean(), dtype, what="probs mean")
    kl = oracle.kl_divergence(x, p)
    assert_ulp(cs.kl_divergence(x, p, reduction="sum"), kl.sum(), dtype, what="KL sum")
    per = oracle.softmax_focal_loss(x, y, 2.0, w)
    assert_ulp(
        cs.softmax_focal_loss(x, y, weight=w, reduction="sum"), per.sum(), dtype, what="focal sum"
    )
    xb = x[:, :10] / 10
    tb = rng.uniform(size=xb.shape).astype(dtype)
    per = oracle.binary_cross_entropy_with_logits(xb, tb)
    assert_ulp(cs.binary_cross_entropy_with_logits(xb, tb), per.mean(), dtype, what="bce mean")
    per = oracle.sigmoid_focal_loss(xb, tb, 0.25, 2.0)
    assert_ulp(
        cs.sigmoid_focal_loss(xb, tb, reduction="mean"),
        per.mean(),
        dtype,
        what="sigmoid focal mean",
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_logsumexp_log_softmax_softmax(dtype):
    rng = np.random.default_rng(9)
    x = mixed_logits(rng, 30, 40, dtype)
    assert_ulp(cs.logsumexp(x), oracle.logsumexp(x), dtype)
    assert_ulp(cs.log_softmax(x), oracle.log_softmax(x), dtype)
    assert_ulp(cs.softmax(x), oracle.softmax(x), dtype)
