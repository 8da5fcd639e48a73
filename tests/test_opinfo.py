"""PyTorch conformance measured with PyTorch's own test inputs.

Every sample that ``torch.testing._internal.common_methods_invocations.op_db`` feeds the OpInfo
entries below (the inputs PyTorch's test suite uses: (N, C, d1, ..., dk) shapes, 0-d inputs,
``dim`` arguments, every keyword) is run through cestudy in float32 and float64 and compared with
torch computed in float64 on the same (rounded) inputs: values, and gradients where cestudy has
a fused ``_with_grad`` function.

Tolerance: 4 ulp of float32 relative to the largest entry of the reference for float32 inputs
(torch in float64 is exact to that precision). For float64 inputs torch in float64 is a peer,
not an exact value (its ``lse - x_y`` loses relative accuracy on small losses), so the tolerance
is 64 float64 ulp relative to the largest entry; cestudy's own float64 accuracy is tested
against the extended-precision oracle in test_accuracy_contract.py. Values of losses whose terms
have both signs (kl_div) and gradients that cancel are accurate to their largest entry, not
element-wise.

The one documented exception: cestudy rejects negative class or element weights (torch accepts
them) with a ValueError naming the argument; the samples that draw negative weights check that.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("expecttest")
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402

import cestudy as cs  # noqa: E402

OPS = {
    "nn.functional.cross_entropy": ("cross_entropy", True),
    "nn.functional.binary_cross_entropy": ("binary_cross_entropy", False),
    "nn.functional.binary_cross_entropy_with_logits": ("binary_cross_entropy_with_logits", True),
    "nn.functional.nll_loss": ("nll_loss", True),
    "nn.functional.kl_div": ("kl_div", True),
    "log_softmax": ("log_softmax", False),
    "softmax": ("softmax", False),
    "logsumexp": ("logsumexp", False),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _samples():
    out = []
    for op in op_db:
        if op.name not in OPS:
            continue
        for dname, dt in DTYPES.items():
            for i, s in enumerate(op.sample_inputs("cpu", dt, requires_grad=False)):
                label = f"{op.name}{'.' + op.variant_test_name if op.variant_test_name else ''}"
                out.append(pytest.param(op.name, s, id=f"{label}-{dname}-{i}"))
    return out


SAMPLES = _samples()


def _np(a):
    return a.detach().numpy().copy() if isinstance(a, torch.Tensor) else a


def _weights_negative(kwargs):
    return any(
        isinstance(kwargs.get(k), torch.Tensor) and bool((kwargs[k] < 0).any())
        for k in ("weight", "pos_weight")
    )


def _close(got, ref, dtype, what):
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != torch's {ref.shape}"
    assert np.array_equal(np.isnan(got), np.isnan(ref)), f"{what}: NaN positions differ"
    finite = np.isfinite(ref)
    assert np.array_equal(got[~finite & ~np.isnan(ref)], ref[~finite & ~np.isnan(ref)]), (
        f"{what}: infinities differ"
    )
    if not finite.any():
        return
    eps = np.finfo(dtype).eps * (4 if dtype == np.float32 else 64)
    scale = np.max(np.abs(ref[finite]))
    err = np.abs(got[finite] - ref[finite])
    tol = eps * np.maximum(np.abs(ref[finite]), scale) + np.finfo(dtype).tiny
    bad = np.flatnonzero(err > tol)
    assert bad.size == 0, (
        f"{what}: {bad.size} entries off, first at {bad[0]}: got "
        f"{got[finite][bad[0]]!r}, torch {ref[finite][bad[0]]!r}"
    )


def _call(op_name, sample, dtype):
    """(cestudy's value, gradient or None, torch's float64 value, gradient or None)."""
    name, has_grad = OPS[op_name]
    x = _np(sample.input).astype(dtype)
    args = [_np(a) for a in sample.args]
    kwargs = {k: _np(v) for k, v in sample.kwargs.items()}
    if "dtype" in kwargs:
        kwargs["dtype"] = {torch.float64: np.float64, torch.float32: np.float32}[kwargs["dtype"]]
    for k in ("weight", "pos_weight"):
        if isinstance(kwargs.get(k), np.ndarray):
            kwargs[k] = kwargs[k].astype(dtype)
    if args and isinstance(args[0], np.ndarray) and args[0].dtype.kind == "f":
        args[0] = args[0].astype(dtype)

    # torch in float64 on the same rounded inputs
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_(has_grad)
    targs = [
        torch.from_numpy(
            np.asarray(a, dtype=np.float64 if np.asarray(a).dtype.kind == "f" else np.int64)
        )
        if isinstance(a, np.ndarray)
        else a
        for a in args
    ]
    tkw = {
        k: (torch.from_numpy(v.astype(np.float64)) if isinstance(v, np.ndarray) else v)
        for k, v in kwargs.items()
    }
    if "dtype" in tkw:
        tkw["dtype"] = torch.float64
    op = next(o for o in op_db if o.name == op_name)
    with (
        pytest.warns(UserWarning)
        if (name == "kl_div" and tkw.get("reduction", "mean") == "mean")
        else _nullcontext()
    ):
        ref = op.op(xt, *targs, **tkw)
    ref_grad = None
    if has_grad:
        ref.sum().backward()
        ref_grad = xt.grad.numpy()

    fn = getattr(cs, name + ("_with_grad" if has_grad else ""))
    if name in ("log_softmax", "softmax"):
        got = fn(x, args[0], **kwargs)
    elif name == "logsumexp":
        got = fn(x, *args, **kwargs)
    else:
        got = fn(x, *args, **kwargs)
    grad = None
    if has_grad:
        got, grad = got
    return got, grad, ref.detach().numpy(), ref_grad


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("op_name, sample", SAMPLES)
def test_opinfo_sample_matches_torch(op_name, sample):
    dtype = np.dtype(str(sample.input.dtype).replace("torch.", ""))
    if _weights_negative(sample.kwargs):
        with pytest.raises(ValueError, match="weight"):
            _call(op_name, sample, dtype)
        return
    got, grad, ref, ref_grad = _call(op_name, sample, dtype)
    assert np.asarray(got).dtype == (np.float64 if "dtype" in sample.kwargs else dtype)
    _close(got, ref, dtype, "value")
    if ref_grad is not None:
        assert grad.shape == sample.input.shape and grad.dtype == dtype
        _close(grad, ref_grad, dtype, "gradient")


def test_every_op_has_samples_in_both_dtypes():
    """The enumeration above is not empty by accident (a renamed OpInfo would drop it)."""
    ops = {p.values[0] for p in SAMPLES}
    assert ops == set(OPS)
    assert len(SAMPLES) >= 300
