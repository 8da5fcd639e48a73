"""Values and gradients of every public function against torch.nn.functional and autograd.

Tolerance rule, stated in ulps of the dtype under test: torch is evaluated in float64 on the same
(exactly converted) inputs, which for float32 tests is exact to far below a float32 ulp, so
cestudy must be within 4 float32 ulp of it. For float64 tests torch is the less accurate party
(its label-smoothed gradients are off by up to 90 ulp of the row maximum, cestudy's by 1.7, see
``test_torch_float64_error_exceeds_ours``), so there the check is semantic: within 1024 float64
ulp; the 4-ulp contract itself is checked against the oracle (``test_accuracy_contract.py``).
Elements that are tiny cancellations are measured in ulps of the largest element of their row
(the gradient contract). A semantic mismatch (a wrong reduction, weight or smoothing convention)
shows up as millions of ulps; rounding differences do not.
"""

import numpy as np
import pytest

import cestudy as cs
from cestudy.reference import oracle

torch = pytest.importorskip("torch")
F = torch.nn.functional

SHAPES = [(3, 1000), (37, 3200), (5, 2), (1, 7)]
DTYPES = [np.float32, np.float64]


def _t(a, grad=False):
    """The input as a float64 torch tensor (exact for float32 data): the reference precision."""
    a = np.asarray(a)
    if a.dtype.kind == "f":
        a = a.astype(np.float64)
    return torch.tensor(a).requires_grad_(grad)


def _close_to_torch(ours, ref, dtype, tol=None):
    if tol is None:
        tol = 4.0 if dtype == np.float32 else 1024.0
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    gap = oracle.ulp_error(ours, ref, dtype)
    # Where the values are tiny cancellations of larger ones, compare against the row scale
    if ref.ndim >= 2:
        scale = np.max(np.abs(ref), axis=-1, keepdims=True)
    else:
        scale = np.max(np.abs(ref)) if ref.size else 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        absgap = np.abs(ours - ref) / oracle.ulp(scale, dtype).astype(np.float64)
    bad = np.minimum(gap, absgap) > tol
    assert not bad.any(), (
        f"max gap {np.minimum(gap, absgap).max():.3g} ulp to torch at "
        f"{np.argwhere(bad)[:5].tolist()}"
    )


def _data(shape, dtype, seed=0, scale=4.0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=shape) * scale).astype(dtype)
    return rng, x


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"label_smoothing": 0.1},
        {"weight": True},
        {"weight": True, "label_smoothing": 0.2},
        {"ignore_index": 1},
        {"weight": True, "ignore_index": 0, "label_smoothing": 0.05},
    ],
)
def test_cross_entropy_class_indices(shape, dtype, reduction, options):
    rng, x = _data(shape, dtype)
    n, c = shape
    y = rng.integers(0, c, n)
    opts = dict(options)
    w = rng.uniform(0.2, 3.0, c) if opts.pop("weight", False) else None
    loss, grad = cs.cross_entropy_with_grad(x, y, weight=w, reduction=reduction, **opts)
    xt = _t(x, True)
    wt = None if w is None else torch.tensor(w.astype(dtype).astype(np.float64))
    ref = F.cross_entropy(xt, torch.tensor(y), weight=wt, reduction=reduction, **opts)
    ref.sum().backward()
    assert loss.dtype == dtype and grad.dtype == dtype and grad.shape == x.shape
    _close_to_torch(loss, ref.detach().numpy(), dtype)
    _close_to_torch(grad, xt.grad.numpy(), dtype)
    np.testing.assert_array_equal(
        cs.cross_entropy(x, y, weight=w, reduction=reduction, **opts), loss
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing,weighted", [(0.0, False), (0.1, True)])
def test_cross_entropy_probability_targets(dtype, reduction, smoothing, weighted):
    rng, x = _data((9, 50), dtype)
    p = rng.dirichlet(np.ones(50), 9).astype(dtype)
    w = rng.uniform(0.5, 2.0, 50) if weighted else None
    loss, grad = cs.cross_entropy_with_grad(
        x, p, weight=w, label_smoothing=smoothing, reduction=reduction
    )
    xt = _t(x, True)
    wt = None if w is None else torch.tensor(w.astype(dtype).astype(np.float64))
    ref = F.cross_entropy(xt, _t(p), weight=wt, label_smoothing=smoothing, reduction=reduction)
    ref.sum().backward()
    _close_to_torch(loss, ref.detach().numpy(), dtype)
    _close_to_torch(grad, xt.grad.numpy(), dtype)


def test_one_dimensional_logits_as_torch():
    x = np.array([1.0, 2.0, -1.0], np.float32)
    loss, grad = cs.cross_entropy_with_grad(x, np.array(1))
    xt = _t(x, True)
    ref = F.cross_entropy(xt, torch.tensor(1))
    ref.backward()
    assert np.shape(loss) == () and grad.shape == (3,)
    _close_to_torch(loss, ref.detach().numpy(), np.float32)
    _close_to_torch(grad, xt.grad.numpy(), np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "weighted,pos_weighted", [(False, False), (True, False), (True, True), (False, True)]
)
def test_bce_with_logits(dtype, reduction, weighted, pos_weighted):
    rng, x = _data((13, 7), dtype, scale=6)
    t = rng.uniform(size=x.shape).astype(dtype)
    t[:6] = np.round(t[:6])
    w = rng.uniform(0.1, 2, (1, 7)).astype(dtype) if weighted else None
    pw = rng.uniform(0.5, 3, 7).astype(dtype) if pos_weighted else None
    loss, grad = cs.binary_cross_entropy_with_logits_with_grad(
        x, t, weight=w, pos_weight=pw, reduction=reduction
    )
    xt = _t(x, True)
    ref = F.binary_cross_entropy_with_logits(
        xt,
        _t(t),
        weight=None if w is None else _t(w),
        pos_weight=None if pw is None else _t(pw),
        reduction=reduction,
    )
    ref.sum().backward()
    _close_to_torch(loss, ref.detach().numpy(), dtype)
    _close_to_torch(grad, xt.grad.numpy(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_on_probabilities_matches_torch_including_the_clamp(dtype, reduction):
    rng = np.random.default_rng(2)
    p = rng.uniform(size=(6, 5)).astype(dtype)
    p[0, 0], p[1, 1] = 0.0, 1.0
    t = np.round(rng.uniform(size=(6, 5))).astype(dtype)
    t[0, 0], t[1, 1] = 1.0, 0.0  # both hit the -100 clamp
    w = rng.uniform(0.1, 2, 5).astype(dtype)
    ours = cs.binary_cross_entropy(p, t, weight=w, reduction=reduction)
    ref = F.binary_cross_entropy(_t(p), _t(t), weight=_t(w), reduction=reduction)
    _close_to_torch(ours, ref.numpy(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_kl_divergence_is_torch_kl_div_batchmean(dtype, reduction):
    rng, x = _data((8, 40), dtype)
    p = rng.dirichlet(np.ones(40), 8).astype(dtype)
    loss, grad = cs.kl_divergence_with_grad(x, p, reduction=reduction)
    xt = _t(x, True)
    per_row = F.kl_div(F.log_softmax(xt, -1), _t(p), reduction="none").sum(-1)
    ref = {"mean": per_row.mean(), "sum": per_row.sum(), "none": per_row}[reduction]
    ref.sum().backward()
    if reduction == "mean":
        batchmean = F.kl_div(F.log_softmax(_t(x), -1), _t(p), reduction="batchmean")
        _close_to_torch(loss, batchmean.numpy(), dtype)
    _close_to_torch(loss, ref.detach().numpy(), dtype)
    _close_to_torch(grad, xt.grad.numpy(), dtype)


def _torch_softmax_focal(xt, y, gamma, w, ignore_index):
    logp = F.log_softmax(xt, -1)
    keep = y != ignore_index
    ys = torch.where(keep, y, torch.zeros_like(y))
    lp = logp.gather(1, ys[:, None])[:, 0]
    wy = torch.ones_like(lp) if w is None else w[ys]
    per = torch.where(keep, -wy * (1 - lp.exp()) ** gamma * lp, torch.zeros_like(lp))
    return per, (wy * keep).sum()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_softmax_focal_loss_against_its_autograd_definition(dtype, reduction, gamma):
    rng, x = _data((11, 20), dtype)
    y = rng.integers(0, 20, 11)
    y[3] = -100
    w = rng.uniform(0.5, 2.0, 20)
    loss, grad = cs.softmax_focal_loss_with_grad(x, y, gamma=gamma, weight=w, reduction=reduction)
    xt = _t(x, True)
    wt = torch.tensor(w.astype(dtype).astype(np.float64))
    per, denom = _torch_softmax_focal(xt, torch.tensor(y), gamma, wt, -100)
    ref = {"mean": per.sum() / denom, "sum": per.sum(), "none": per}[reduction]
    ref.sum().backward()
    _close_to_torch(loss, ref.detach().numpy(), dtype)
    _close_to_torch(grad, xt.grad.numpy(), dtype)
    if gamma == 0.0:
        np.testing.assert_allclose(
            loss,
            cs.cross_entropy(x, y, weight=w, reduction=reduction),
            rtol=4 * np.finfo(dtype).eps,
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 1.0), (0.5, 0.0)])
def test_sigmoid_focal_loss_is_torchvision(dtype, reduction, alpha, gamma):
    rng, x = _data((6, 9), dtype, scale=3)
    t = np.round(rng.uniform(size=x.shape)).astype(dtype)
    loss, grad = cs.sigmoid_focal_loss_with_grad(
        x, t, alpha=alpha, gamma=gamma, reduction=reduction
    )
    xt = _t(x, True)
    tt = _t(t)
    p = torch.sigmoid(xt)  # torchvision.ops.sigmoid_focal_loss, verbatim
    ce = F.binary_cross_entropy_with_logits(xt, tt, reduction="none")
    p_t = p * tt + (1 - p) * (1 - tt)
    per = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        per = (alpha * tt + (1 - alpha) * (1 - tt)) * per
    ref = {"mean": per.mean(), "sum": per.sum(), "none": per}[reduction]
    ref.sum().backward()
    _close_to_torch(loss, ref.detach().numpy(), dtype)
    _close_to_torch(grad, xt.grad.numpy(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_logsumexp_log_softmax_softmax(dtype):
    rng, x = _data((4, 5, 33), dtype, scale=20)
    xt = _t(x)
    _close_to_torch(cs.logsumexp(x), torch.logsumexp(xt, -1).numpy(), dtype)
    _close_to_torch(cs.log_softmax(x), F.log_softmax(xt, -1).numpy(), dtype)
    _close_to_torch(cs.softmax(x), F.softmax(xt, -1).numpy(), dtype)


def test_empty_batch_behaves_as_torch():
    x = np.zeros((0, 5), np.float32)
    y = np.zeros(0, np.int64)
    assert np.isnan(cs.cross_entropy(x, y))
    assert np.isnan(F.cross_entropy(torch.tensor(x), torch.tensor(y)).item())
    assert cs.cross_entropy(x, y, reduction="sum") == 0
    assert cs.cross_entropy(x, y, reduction="none").shape == (0,)
    loss, grad = cs.cross_entropy_with_grad(x, y, reduction="sum")
    assert grad.shape == (0, 5)


def test_torch_float64_error_exceeds_ours():
    rng, x = _data((37, 3200), np.float64)
    y = rng.integers(0, 3200, 37)
    _, g = cs.cross_entropy_with_grad(x, y, label_smoothing=0.1, reduction="sum")
    xt = _t(x, True)
    F.cross_entropy(xt, torch.tensor(y), label_smoothing=0.1, reduction="sum").backward()
    exact = oracle.cross_entropy_grad(x, y, label_smoothing=0.1)
    ours = oracle.grad_ulp_error(g, exact, np.float64).max()
    theirs = oracle.grad_ulp_error(xt.grad.numpy(), exact, np.float64).max()
    assert ours <= 4 < theirs


@pytest.mark.parametrize("dtype", DTYPES)
def test_cestudy_is_at_least_as_accurate_as_torch_on_confident_rows(dtype):
    """Accuracy differentiator: on confident rows torch's error is huge, cestudy's tiny."""
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(64, 100)) * 30).astype(dtype)
    y = np.argmax(x, axis=1)
    exact = oracle.cross_entropy(x, y)
    ours = cs.cross_entropy(x, y, reduction="none")
    ref = F.cross_entropy(torch.tensor(x), torch.tensor(y), reduction="none").numpy()  # own dtype
    err_ours = oracle.ulp_error(ours, exact, dtype)
    err_torch = oracle.ulp_error(ref, exact, dtype)
    assert err_ours.max() <= 4
    assert err_torch.max() > 100 * max(err_ours.max(), 1)
