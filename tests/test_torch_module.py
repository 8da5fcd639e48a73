"""cestudy.torch: torch's functions and Modules computed by cestudy's fused kernels.

What is checked here is the torch glue; the kernels' accuracy is checked elsewhere
(``test_accuracy_contract.py``, ``test_torch_conformance.py``):

- values and gradients equal torch's (computed in float64 on the same inputs) for every function,
  every reduction, the keywords and the (C,), (N, C), (N, C, d1, ..., dk) and 0-d shapes, with an
  upstream gradient that is not ones (random, with zeros and negative entries, for "none");
- ``torch.autograd.gradcheck`` passes in float64 for every function and reduction; double backward
  raises;
- CPU tensors reach the kernels as numpy views (bfloat16 through ml_dtypes) and come back without
  copies; float16 and bfloat16 give what the float32 computation gives, rounded;
- the Modules equal torch.nn's, their weights are buffers;
- bad arguments raise errors that name them; ``import cestudy`` never imports torch;
- the CUDA route, in numba's CUDA simulator, with host copies standing in for the
  ``__cuda_array_interface__`` hand-over (no GPU here);
- the README example: a small MLP trained with ``cestudy.torch.CrossEntropyLoss``.

Tolerances: torch in float64 is exact to far below a float32 ulp, so float32 results must be
within 8 float32 eps of it (relative, or relative to the largest entry for gradients that
cancel); in float64, where torch itself is off by tens of ulp with label smoothing, within 256
float64 eps.
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import cestudy as cs  # noqa: E402
import cestudy.torch as ct  # noqa: E402

HERE = Path(__file__).resolve().parent
KL_MEAN = "ignore:reduction. 'mean' divides"


# --------------------------------------------------------------------------------------------
# References: torch's own functions, and the two focal losses written with torch operations
# --------------------------------------------------------------------------------------------
def softmax_focal_ref(x, y, gamma=2.0, weight=None, ignore_index=-100, reduction="mean"):
    """-w_y (1 - p_y)^gamma log p_y; nll_loss picks entry y and applies torch's weighted mean."""
    logp = F.log_softmax(x, dim=0 if x.dim() == 1 else 1)
    return F.nll_loss(
        (1 - logp.exp()) ** gamma * logp,
        y,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
    )


def sigmoid_focal_ref(x, t, alpha=0.25, gamma=2.0, reduction="none"):
    """torchvision.ops.sigmoid_focal_loss (torchvision 0.2x), line for line."""
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


def _indices(rng, shape, n_classes, ignore=None):
    y = torch.from_numpy(rng.integers(0, n_classes, shape))
    if ignore is not None and y.dim():
        y.view(-1)[::3] = ignore
    return y


def _probs(rng, shape, class_dim):
    p = torch.from_numpy(rng.uniform(0.0, 1.0, shape))
    return p / p.sum(class_dim, keepdim=True)


def _case_inputs(name, dtype, rng):
    """(ours, reference, x, target, keyword arguments) for case ``name``; x in ``dtype``."""

    def x_of(shape, scale=3.0):
        return torch.from_numpy(np.asarray(rng.normal(size=shape) * scale)).to(dtype)

    def w_of(shape):
        return torch.from_numpy(rng.uniform(0.3, 2.0, shape)).to(dtype)

    if name == "ce_index_2d":
        return ct.cross_entropy, F.cross_entropy, x_of((5, 7)), _indices(rng, 5, 7), {}
    if name == "ce_index_2d_options":
        return (
            ct.cross_entropy,
            F.cross_entropy,
            x_of((6, 7)),
            _indices(rng, 6, 7, ignore=2),
            {"weight": w_of(7), "ignore_index": 2, "label_smoothing": 0.1},
        )
    if name == "ce_index_1d":
        return ct.cross_entropy, F.cross_entropy, x_of(7), _indices(rng, (), 7), {}
    if name == "ce_index_kd":
        return (
            ct.cross_entropy,
            F.cross_entropy,
            x_of((3, 4, 2, 3)),
            _indices(rng, (3, 2, 3), 4, ignore=-100),
            {"weight": w_of(4), "label_smoothing": 0.2},
        )
    if name == "ce_probs_2d":
        return (
            ct.cross_entropy,
            F.cross_entropy,
            x_of((5, 6)),
            _probs(rng, (5, 6), 1).to(dtype),
            {"weight": w_of(6), "label_smoothing": 0.1},
        )
    if name == "ce_probs_kd":
        return (
            ct.cross_entropy,
            F.cross_entropy,
            x_of((2, 5, 3)),
            _probs(rng, (2, 5, 3), 1).to(dtype),
            {},
        )
    if name == "bce_0d":
        return (
            ct.binary_cross_entropy_with_logits,
            F.binary_cross_entropy_with_logits,
            x_of(()),
            torch.tensor(0.3, dtype=dtype),
            {},
        )
    if name == "bce_2d_weights":
        t = torch.from_numpy(rng.uniform(size=(4, 5))).to(dtype)
        t[:2] = t[:2].round()
        return (
            ct.binary_cross_entropy_with_logits,
            F.binary_cross_entropy_with_logits,
            x_of((4, 5), 5.0),
            t,
            {"weight": w_of(5), "pos_weight": w_of(5)},
        )
    if name == "bce_3d_weight":
        return (
            ct.binary_cross_entropy_with_logits,
            F.binary_cross_entropy_with_logits,
            x_of((2, 3, 4)),
            torch.from_numpy(rng.uniform(size=(2, 3, 4))).to(dtype),
            {"weight": w_of((3, 1))},
        )
    if name == "nll_2d":
        return (
            ct.nll_loss,
            F.nll_loss,
            F.log_softmax(x_of((5, 6)), 1),
            _indices(rng, 5, 6, ignore=3),
            {"weight": w_of(6), "ignore_index": 3},
        )
    if name == "nll_kd":
        return (
            ct.nll_loss,
            F.nll_loss,
            F.log_softmax(x_of((2, 4, 3, 2)), 1),
            _indices(rng, (2, 3, 2), 4),
            {},
        )
    if name == "nll_1d":
        return ct.nll_loss, F.nll_loss, F.log_softmax(x_of(5), 0), _indices(rng, (), 5), {}
    if name == "kl_div_2d":
        return (
            ct.kl_div,
            F.kl_div,
            F.log_softmax(x_of((4, 5)), 1),
            _probs(rng, (4, 5), 1).to(dtype),
            {},
        )
    if name == "kl_div_3d_log_target":
        return (
            ct.kl_div,
            F.kl_div,
            F.log_softmax(x_of((2, 3, 4)), -1),
            _probs(rng, (2, 3, 4), -1).log().to(dtype),
            {"log_target": True},
        )
    if name == "softmax_focal_2d":
        return (
            ct.softmax_focal_loss,
            softmax_focal_ref,
            x_of((6, 5)),
            _indices(rng, 6, 5, ignore=-100),
            {"weight": w_of(5)},
        )
    if name == "softmax_focal_kd":
        return (
            ct.softmax_focal_loss,
            softmax_focal_ref,
            x_of((2, 4, 3)),
            _indices(rng, (2, 3), 4),
            {"gamma": 3.5},
        )
    if name == "softmax_focal_1d":
        return (
            ct.softmax_focal_loss,
            softmax_focal_ref,
            x_of(4),
            _indices(rng, (), 4),
            {"gamma": 0.0},
        )
    if name == "sigmoid_focal_2d":
        return (
            ct.sigmoid_focal_loss,
            sigmoid_focal_ref,
            x_of((4, 5)),
            torch.from_numpy(rng.integers(0, 2, (4, 5))).to(dtype),
            {},
        )
    if name == "sigmoid_focal_3d":
        return (
            ct.sigmoid_focal_loss,
            sigmoid_focal_ref,
            x_of((2, 3, 4)),
            torch.from_numpy(rng.uniform(size=(2, 3, 4))).to(dtype),
            {"alpha": -1.0, "gamma": 1.0},
        )
    raise KeyError(name)


CASES = [
    "ce_index_2d",
    "ce_index_2d_options",
    "ce_index_1d",
    "ce_index_kd",
    "ce_probs_2d",
    "ce_probs_kd",
    "bce_0d",
    "bce_2d_weights",
    "bce_3d_weight",
    "nll_2d",
    "nll_kd",
    "nll_1d",
    "kl_div_2d",
    "kl_div_3d_log_target",
    "softmax_focal_2d",
    "softmax_focal_kd",
    "softmax_focal_1d",
    "sigmoid_focal_2d",
    "sigmoid_focal_3d",
]


def _reductions(case):
    return ["none", "mean", "sum"] + (["batchmean"] if case.startswith("kl_div") else [])


CASE_REDUCTIONS = [(c, r) for c in CASES for r in _reductions(c)]


def _upstream(loss, rng):
    """An upstream gradient that is not ones: random with a zero and a negative entry for
    "none", 0.7 for a reduced loss."""
    if loss.dim() == 0:
        return torch.tensor(0.7, dtype=loss.dtype)
    g = torch.from_numpy(rng.uniform(-1.0, 2.0, loss.shape)).to(loss.dtype)
    g.view(-1)[0] = 0.0
    return g


def _assert_close(ours, ref, dtype):
    eps = torch.finfo(dtype).eps * (8 if dtype != torch.float64 else 256)
    ours, ref = ours.double(), ref.double()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    torch.testing.assert_close(ours, ref, rtol=eps, atol=eps * scale, equal_nan=True)


# --------------------------------------------------------------------------------------------
# Values and gradients against torch
# --------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings(KL_MEAN)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case,reduction", CASE_REDUCTIONS)
def test_values_and_gradients_equal_torch(case, reduction, dtype):
    rng = np.random.default_rng(CASES.index(case))
    ours_fn, ref_fn, x, target, kw = _case_inputs(case, dtype, rng)
    x = x.detach().requires_grad_(True)
    loss = ours_fn(x, target, reduction=reduction, **kw)
    x64 = x.detach().double().requires_grad_(True)
    kw64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    t64 = target.double() if target.dtype.is_floating_point else target
    ref = ref_fn(x64, t64, reduction=reduction, **kw64)
    assert loss.dtype == dtype and loss.shape == ref.shape and loss.requires_grad
    _assert_close(loss.detach(), ref.detach(), dtype)
    g = _upstream(loss, rng)
    (grad,) = torch.autograd.grad(loss, x, g)
    (ref_grad,) = torch.autograd.grad(ref, x64, g.double())
    assert grad.dtype == dtype and grad.shape == x.shape
    _assert_close(grad, ref_grad, dtype)


@pytest.mark.filterwarnings(KL_MEAN)
@pytest.mark.parametrize("case,reduction", CASE_REDUCTIONS)
def test_gradcheck(case, reduction):
    rng = np.random.default_rng(100 + CASES.index(case))
    ours_fn, _, x, target, kw = _case_inputs(case, torch.float64, rng)
    x = x.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: ours_fn(z, target, reduction=reduction, **kw),
        (x,),
        eps=1e-6,
        atol=1e-7,
        rtol=1e-6,
    )


@pytest.mark.parametrize("upstream_needs_grad", [False, True])
def test_double_backward_raises(upstream_needs_grad):
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    loss = ct.cross_entropy(x, torch.tensor([0, 1, 2]), reduction="none")
    g = torch.ones(3, dtype=torch.float64, requires_grad=upstream_needs_grad)
    with pytest.raises(RuntimeError, match="cross_entropy does not support double backward"):
        torch.autograd.grad(loss, x, g, create_graph=True)


def test_backward_twice_with_retain_graph_gives_the_same_gradient():
    x = torch.randn(4, 5, requires_grad=True)
    loss = ct.cross_entropy(x, torch.tensor([0, 1, 2, 3]), reduction="none")
    g = torch.tensor([1.0, -2.0, 0.5, 3.0])
    (a,) = torch.autograd.grad(loss, x, g, retain_graph=True)
    (b,) = torch.autograd.grad(loss, x, g)
    assert torch.equal(a, b)


def test_no_gradient_is_computed_when_none_is_needed(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the fused kernel ran although no gradient was needed")

    monkeypatch.setattr(cs.losses, "cross_entropy_with_grad", fail)
    x = torch.randn(3, 4, requires_grad=True)
    y = torch.tensor([0, 1, 3])
    with torch.no_grad():
        loss = ct.cross_entropy(x, y)
    assert not loss.requires_grad
    assert not ct.cross_entropy(x.detach(), y).requires_grad
    assert torch.allclose(loss, F.cross_entropy(x.detach(), y))


def test_the_input_and_target_are_not_modified():
    x = torch.randn(4, 6, requires_grad=True)
    t = torch.rand(4, 6)
    x0, t0 = x.detach().clone(), t.clone()
    ct.cross_entropy(x, t, label_smoothing=0.1).backward()
    ct.binary_cross_entropy_with_logits(x, t, reduction="none").sum().backward()
    assert torch.equal(x.detach(), x0) and torch.equal(t, t0)


def test_non_contiguous_and_expanded_inputs():
    base = torch.randn(7, 5, dtype=torch.float64)
    x = base.t().requires_grad_(True)  # (5, 7), column-major
    y = torch.tensor([1]).expand(5)  # stride 0
    loss = ct.cross_entropy(x, y, reduction="sum")
    loss.backward()
    x64 = x.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(x64, y.clone(), reduction="sum")
    ref.backward()
    _assert_close(loss.detach(), ref.detach(), torch.float64)
    _assert_close(x.grad, x64.grad, torch.float64)


# --------------------------------------------------------------------------------------------
# Low precision and the numpy hand-over
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cpu_tensors_reach_the_kernels_as_views_and_come_back_without_copies(dtype):
    t = torch.randn(3, 4).to(dtype)
    a = ct._numpy_view(t)
    assert a.__array_interface__["data"][0] == t.data_ptr() and a.shape == (3, 4)
    assert a.dtype == (
        cs.dtypes.bfloat16 if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype
    )
    np.testing.assert_array_equal(np.asarray(a, np.float64), t.double().numpy())
    back = ct._from_numpy(a)
    assert back.dtype == dtype and back.data_ptr() == t.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "case",
    [
        "ce_index_2d_options",
        "ce_probs_kd",
        "bce_2d_weights",
        "softmax_focal_2d",
        "sigmoid_focal_2d",
        "nll_2d",
    ],
)
def test_low_precision_is_the_float32_result_rounded(case, dtype):
    rng = np.random.default_rng(7)
    ours_fn, _, x, target, kw = _case_inputs(case, dtype, rng)
    x = x.detach().requires_grad_(True)
    loss = ours_fn(x, target, reduction="none", **kw)
    g = _upstream(loss, rng)
    (grad,) = torch.autograd.grad(loss, x, g)
    x32 = x.detach().float().requires_grad_(True)
    kw32 = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    t32 = target.float() if target.dtype.is_floating_point else target
    loss32 = ours_fn(x32, t32, reduction="none", **kw32)
    (grad32,) = torch.autograd.grad(loss32, x32, g.float())
    assert loss.dtype == dtype and grad.dtype == dtype
    # the float32 result rounded once (the loss) or twice (the gradient, then its product with
    # the upstream gradient); the smallest subnormal for values below the dtype's normal range
    fi = torch.finfo(dtype)
    torch.testing.assert_close(loss.float(), loss32.detach(), rtol=fi.eps, atol=fi.tiny * fi.eps)
    torch.testing.assert_close(
        grad.float(), grad32, rtol=2 * fi.eps, atol=2 * fi.eps * grad32.abs().max().item()
    )


def test_bfloat16_loss_of_a_confident_row_is_not_zero():
    x = torch.tensor([[30.0, 0.0]], dtype=torch.bfloat16, requires_grad=True)
    loss = ct.cross_entropy(x, torch.tensor([0]))
    loss.backward()
    assert loss.item() == pytest.approx(np.exp(-30.0), rel=2**-8)
    assert x.grad[0, 0].item() == pytest.approx(-np.exp(-30.0), rel=2**-7)
    assert F.cross_entropy(x.detach(), torch.tensor([0])).item() == 0.0  # torch's


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------
def _module_pairs():
    w = torch.tensor([0.5, 2.0, 1.0, 1.5])
    return [
        (
            ct.CrossEntropyLoss(weight=w, ignore_index=1, label_smoothing=0.1),
            torch.nn.CrossEntropyLoss(weight=w, ignore_index=1, label_smoothing=0.1),
            "index",
        ),
        (
            ct.CrossEntropyLoss(reduction="none"),
            torch.nn.CrossEntropyLoss(reduction="none"),
            "index",
        ),
        (
            ct.NLLLoss(weight=w, reduction="sum"),
            torch.nn.NLLLoss(weight=w, reduction="sum"),
            "index",
        ),
        (ct.BCEWithLogitsLoss(pos_weight=w), torch.nn.BCEWithLogitsLoss(pos_weight=w), "binary"),
        (
            ct.KLDivLoss(reduction="batchmean", log_target=True),
            torch.nn.KLDivLoss(reduction="batchmean", log_target=True),
            "log_probs",
        ),
    ]


@pytest.mark.parametrize("i", range(5))
def test_modules_equal_torch_nn(i):
    ours, ref, kind = _module_pairs()[i]
    torch.manual_seed(i)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    target = {
        "index": torch.tensor([0, 1, 2, 3, 1, 0]),
        "binary": torch.rand(6, 4, dtype=torch.float64),
        "log_probs": F.log_softmax(torch.randn(6, 4, dtype=torch.float64), 1),
    }[kind]
    ours, ref = ours.double(), ref.double()
    a = ours(x, target)
    b = ref(x, target)
    _assert_close(a.detach(), b.detach(), torch.float64)
    g = _upstream(a, np.random.default_rng(i))
    _assert_close(torch.autograd.grad(a, x, g)[0], torch.autograd.grad(b, x, g)[0], torch.float64)


def test_module_weights_are_buffers():
    m = ct.BCEWithLogitsLoss(weight=torch.ones(3), pos_weight=torch.full((3,), 2.0))
    assert set(dict(m.named_buffers())) == {"weight", "pos_weight"}
    assert m.double().pos_weight.dtype == torch.float64
    assert set(m.state_dict()) == {"weight", "pos_weight"}
    assert dict(ct.CrossEntropyLoss().named_buffers()) == {}


def test_focal_modules_equal_their_functions():
    x = torch.randn(5, 3, requires_grad=True)
    y = torch.tensor([0, 2, 1, 1, 0])
    w = torch.tensor([1.0, 0.5, 2.0])
    m = ct.SoftmaxFocalLoss(gamma=1.5, weight=w, reduction="sum")
    assert torch.equal(m(x, y), ct.softmax_focal_loss(x, y, gamma=1.5, weight=w, reduction="sum"))
    t = torch.rand(5, 3)
    assert ct.SigmoidFocalLoss()(x, t).shape == (5, 3)  # torchvision's default: "none"
    assert torch.equal(
        ct.SigmoidFocalLoss(0.5, 1.0, "mean")(x, t), ct.sigmoid_focal_loss(x, t, 0.5, 1.0, "mean")
    )


# --------------------------------------------------------------------------------------------
# torch's argument conventions and errors
# --------------------------------------------------------------------------------------------
def test_legacy_size_average_and_reduce_as_torch():
    x = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    for sa, red, expect in [(False, None, "sum"), (None, False, "none"), (True, True, "mean")]:
        with pytest.warns(UserWarning, match=f"reduction='{expect}'"):
            ours = ct.cross_entropy(x, y, size_average=sa, reduce=red)
        torch.testing.assert_close(ours, F.cross_entropy(x, y, reduction=expect))
    with pytest.warns(UserWarning, match="reduction='sum'"):
        assert ct.NLLLoss(size_average=False).reduction == "sum"


def test_kl_div_mean_warns_as_torch():
    x = F.log_softmax(torch.randn(2, 3), 1)
    p = torch.softmax(torch.randn(2, 3), 1)
    with pytest.warns(UserWarning, match="'batchmean' divides only by the batch size"):
        ours = ct.kl_div(x, p)
    torch.testing.assert_close(ours, x.numel() ** -1 * F.kl_div(x, p, reduction="sum"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ct.kl_div(x, p, reduction="batchmean")


@pytest.mark.parametrize(
    "call,error,match",
    [
        (
            lambda: ct.cross_entropy(torch.randn(2, 3).numpy(), torch.tensor([0, 1])),
            TypeError,
            "input must be a torch.Tensor",
        ),
        (
            lambda: ct.cross_entropy(torch.ones(2, 3, dtype=torch.int64), torch.tensor([0, 1])),
            TypeError,
            "input must be a floating-point tensor",
        ),
        (
            lambda: ct.cross_entropy(torch.tensor(1.0), torch.tensor(0)),
            ValueError,
            "input must have a class axis",
        ),
        (
            lambda: ct.cross_entropy(torch.randn(2, 3), [0, 1]),
            TypeError,
            "target must be a torch.Tensor",
        ),
        (
            lambda: ct.cross_entropy(torch.randn(2, 3), torch.tensor([0, 3])),
            ValueError,
            r"target\[1\] = 3 is out of range",
        ),
        (
            lambda: ct.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), reduction="avg"),
            ValueError,
            "reduction must be one of",
        ),
        (
            lambda: ct.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), weight=torch.ones(4)),
            ValueError,
            r"weight must have shape \(3,\)",
        ),
        (
            lambda: ct.cross_entropy(
                torch.randn(2, 3), torch.tensor([0, 1]), weight=-torch.ones(3)
            ),
            ValueError,
            "weight must be non-negative",
        ),
        (
            lambda: ct.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), label_smoothing=2.0),
            ValueError,
            "label_smoothing must be in",
        ),
        (
            lambda: ct.cross_entropy(
                torch.randn(2, 3, requires_grad=True), torch.rand(2, 3, requires_grad=True)
            ),
            ValueError,
            r"target requires a gradient.*target.detach\(\)",
        ),
        (
            lambda: ct.binary_cross_entropy_with_logits(
                torch.randn(2, 3), torch.rand(2, 3), pos_weight=torch.ones(3, requires_grad=True)
            ),
            ValueError,
            "pos_weight requires a gradient",
        ),
        (
            lambda: ct.binary_cross_entropy_with_logits(
                torch.randn(2, 3), torch.rand(2, 3), weight=torch.ones(4)
            ),
            ValueError,
            "weight of shape",
        ),
        (
            lambda: ct.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1], device="meta")),
            ValueError,
            "target is on device meta but input is on cpu",
        ),
        (
            lambda: ct.kl_div(torch.randn(2, 3), torch.rand(2, 3), reduction="avg"),
            ValueError,
            "reduction must be one of",
        ),
        (
            lambda: ct.softmax_focal_loss(torch.randn(2, 3), torch.tensor([0, 1]), gamma=-1.0),
            ValueError,
            "gamma must be >= 0",
        ),
    ],
)
def test_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_import_cestudy_does_not_import_torch():
    code = (
        "import sys, cestudy, cestudy.losses, cestudy.dispatch\n"
        "assert 'torch' not in sys.modules, 'import cestudy imported torch'\n"
        "import cestudy.torch\n"
        "assert 'torch' in sys.modules\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE.parent, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


# --------------------------------------------------------------------------------------------
# The CUDA route, in numba's CUDA simulator
# --------------------------------------------------------------------------------------------
def test_cuda_route_in_the_simulator():
    """The route CUDA tensors take (layouts, float16/bfloat16 widening, dense element-wise
    weights, device reductions, the host round trip of nll_loss and kl_div), run in numba's CUDA
    simulator in a process of its own; the ``__cuda_array_interface__`` hand-over is replaced by
    host copies, since the simulator cannot read torch CUDA tensors and there is no GPU here."""
    env = dict(
        os.environ, NUMBA_ENABLE_CUDASIM="1", CESTUDY_CUDA_THREADS="8", CESTUDY_TORCH_SIM="1"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "in_sim",
            str(Path(__file__)),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=HERE.parent,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout


if os.environ.get("CESTUDY_TORCH_SIM") == "1":
    SIM_CASES = [
        "ce_index_2d_options",
        "ce_index_1d",
        "ce_index_kd",
        "ce_probs_kd",
        "bce_0d",
        "bce_2d_weights",
        "bce_3d_weight",
        "softmax_focal_kd",
        "sigmoid_focal_3d",
        "nll_2d",
        "kl_div_2d",
    ]

    @pytest.fixture
    def simulated_cuda(monkeypatch):
        from numba import cuda

        assert cuda.is_available()
        monkeypatch.setattr(ct, "_is_cuda", lambda t: True)
        monkeypatch.setattr(
            ct, "_to_cuda_array", lambda t: cuda.to_device(np.ascontiguousarray(ct._numpy_view(t)))
        )
        monkeypatch.setattr(
            ct, "_from_cuda_array", lambda a, device: ct._from_numpy(a.copy_to_host())
        )

    # every case in float32; float64 and the widened bfloat16 on a few (the simulator is slow)
    SIM_PARAMS = (
        [(c, torch.float32) for c in SIM_CASES]
        + [(c, torch.bfloat16) for c in ("ce_index_kd", "bce_2d_weights")]
        + [("ce_probs_kd", torch.float64)]
    )

    @pytest.mark.filterwarnings(KL_MEAN)
    @pytest.mark.filterwarnings("ignore:cestudy has no CUDA kernel")
    @pytest.mark.parametrize("case,dtype", SIM_PARAMS)
    def test_route_in_sim(case, dtype, simulated_cuda, monkeypatch):
        device_calls = []
        run_device = cs.dispatch._run_device
        monkeypatch.setattr(
            cs.dispatch, "_run_device", lambda *a: device_calls.append(a) or run_device(*a)
        )
        for reduction in _reductions(case):
            rng = np.random.default_rng(CASES.index(case))
            ours_fn, _, x, target, kw = _case_inputs(case, dtype, rng)
            x = x.detach().requires_grad_(True)
            loss = ours_fn(x, target, reduction=reduction, **kw)
            g = _upstream(loss, rng)
            (grad,) = torch.autograd.grad(loss, x, g)
            with monkeypatch.context() as m:  # the CPU route for the same call
                m.setattr(ct, "_is_cuda", lambda t: False)
                ref = ours_fn(x, target, reduction=reduction, **kw)
                (ref_grad,) = torch.autograd.grad(ref, x, g)
            assert loss.dtype == dtype and loss.shape == ref.shape, (case, reduction)
            assert grad.dtype == dtype and grad.shape == x.shape, (case, reduction)
            tol = 8 * torch.finfo(dtype).eps
            torch.testing.assert_close(
                loss.double(), ref.detach().double(), rtol=tol, atol=tol * ref.abs().max().item()
            )
            torch.testing.assert_close(
                grad.double(), ref_grad.double(), rtol=tol, atol=tol * ref_grad.abs().max().item()
            )
        # the kernels ran on the (simulated) device, except where there is no CUDA kernel
        assert bool(device_calls) == (case.split("_")[0] not in ("nll", "kl"))

    def test_nll_loss_on_cuda_tensors_warns_of_the_host_round_trip_in_sim(simulated_cuda):
        with pytest.warns(UserWarning, match="no CUDA kernel for nll_loss"):
            ct.nll_loss(torch.randn(2, 3), torch.tensor([0, 1]))


# --------------------------------------------------------------------------------------------
# The README example
# --------------------------------------------------------------------------------------------
def test_readme_example_trains_a_small_mlp():
    pytest.importorskip("sklearn")
    # --- the README snippet, verbatim ---
    import torch
    from sklearn.datasets import load_digits

    import cestudy.torch as ct

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    loss_fn = ct.CrossEntropyLoss(label_smoothing=0.05)  # drop-in for torch.nn.CrossEntropyLoss
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    history = []
    for step in range(20):
        opt.zero_grad()
        loss = loss_fn(model(X), y)  # the fused kernel writes loss and gradient in one pass
        loss.backward()  # hands that gradient to autograd
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.5 * history[0]
    # --- end of the snippet ---

    # the same run with torch's own loss takes the same steps
    torch.manual_seed(0)
    ref_model = torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    )
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.5, momentum=0.9)
    ref_loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.05)
    ref_history = []
    for step in range(20):
        ref_opt.zero_grad()
        loss = ref_loss_fn(ref_model(X), y)
        loss.backward()
        ref_opt.step()
        ref_history.append(loss.item())
    np.testing.assert_allclose(history, ref_history, rtol=1e-4)
