"""cestudy.linear_cross_entropy: torch's semantics, the accuracy of the fused kernel, its memory.

- PyTorch's own OpInfo samples of ``nn.functional.linear_cross_entropy`` (the reference,
  ``chunked`` and ``chunked_none`` entries; their ``options=`` only picks torch's chunking and is
  dropped) in float32 and float64 against torch in float64 on the same rounded inputs: the value
  and the three gradients. Tolerance: (4 + H) eps of the dtype relative to the largest entry of
  the reference, H the hidden size: 4 for the cross-entropy, as in test_opinfo.py, plus the
  first-order effect of the matrix product's rounding (|dz| <= gamma_H sum |x w|).
- Larger problems against torch autograd in float64 with chunk sizes that do not divide V,
  ignore_index, class weights, label smoothing, bias and every reduction: the issue's targets
  (loss within 1e-5 relative, gradients within 1e-5 of their largest entry) in float32.
- The accuracy contract of the cross-entropy part against the extended-precision oracle
  (``oracle.linear_cross_entropy``): on integer inputs the float32 products are exact, so the
  kernel's losses of confident rows (1e-30) must be within 4 ulp of the exact ones; on any input
  they must be within 4 ulp of the exact cross-entropy of the kernel's own logits.
- Peak traced memory (tracemalloc sees every numpy allocation): O(N x chunk).
- Bad input raises an error that names the argument.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import cestudy as cs
from cestudy import dtypes
from cestudy import linear as lin
from cestudy.kernels import linear as kern
from cestudy.reference import oracle

from helpers import assert_ulp

torch = pytest.importorskip("torch")
F = torch.nn.functional


# --------------------------------------------------------------------------------------------
# OpInfo samples
# --------------------------------------------------------------------------------------------
def _opinfo_samples():
    pytest.importorskip("expecttest")
    from torch.testing._internal.common_methods_invocations import op_db

    out = []
    for op in op_db:
        if op.name != "nn.functional.linear_cross_entropy":
            continue
        for dname, dt in (("float32", torch.float32), ("float64", torch.float64)):
            for i, s in enumerate(op.sample_inputs("cpu", dt, requires_grad=False)):
                label = op.variant_test_name or "reference"
                out.append(pytest.param(s, dname, id=f"{label}-{dname}-{i}"))
    return out


OPINFO = _opinfo_samples()


def _np(a):
    return a.detach().numpy().copy() if isinstance(a, torch.Tensor) else a


def _torch64(x, w, t, kwargs):
    """torch's float64 loss and gradients (input, weight, bias) for the same arguments."""
    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    wt = torch.tensor(np.asarray(w, np.float64), requires_grad=True)
    tt = torch.from_numpy(
        np.asarray(t, np.float64) if np.asarray(t).dtype.kind == "f" else np.asarray(t, np.int64)
    )
    tkw = {}
    for k, v in kwargs.items():
        if isinstance(v, np.ndarray):
            v = torch.tensor(v.astype(np.float64), requires_grad=k == "linear_bias")
        tkw[k] = v
    loss = F.linear_cross_entropy(xt, wt, tt, **tkw)
    loss.sum().backward()
    grads = [xt.grad.numpy(), wt.grad.numpy()]
    if "linear_bias" in tkw:
        grads.append(tkw["linear_bias"].grad.numpy())
    return loss.detach().numpy(), grads


def _close(got, ref, dtype, hidden, what):
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != torch's {ref.shape}"
    assert np.array_equal(np.isnan(got), np.isnan(ref)), f"{what}: NaN positions differ"
    if not np.isfinite(ref).any():
        return
    scale = np.max(np.abs(ref[np.isfinite(ref)]))
    tol = (4 + hidden) * np.finfo(dtype).eps * scale + np.finfo(dtype).tiny
    err = np.abs(got - ref)[np.isfinite(ref)]
    assert err.max() <= tol, f"{what}: error {err.max():.3g} > {tol:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("sample, dname", OPINFO)
def test_opinfo_sample_matches_torch(sample, dname):
    dtype = np.dtype(dname)
    x = _np(sample.input).astype(dtype)
    w = _np(sample.args[0]).astype(dtype)
    t = _np(sample.args[1])
    if t.dtype.kind == "f":
        t = t.astype(dtype)
    kwargs = {k: _np(v) for k, v in sample.kwargs.items() if k != "options"}
    if "linear_bias" in kwargs:
        kwargs["linear_bias"] = kwargs["linear_bias"].astype(dtype)
    ref, ref_grads = _torch64(x, w, t, kwargs)
    got, *grads = cs.linear_cross_entropy_with_grad(x, w, t, **kwargs)
    assert np.asarray(got).dtype == dtype
    h = x.shape[-1]
    _close(got, ref, dtype, h, "value")
    assert len(grads) == len(ref_grads)
    for name, g, r, a in zip(
        ("grad_input", "grad_weight", "grad_bias"),
        grads,
        ref_grads,
        (x, w, kwargs.get("linear_bias")),
    ):
        assert g.shape == a.shape and g.dtype == dtype, name
        _close(g, r, dtype, h, name)
    # the loss alone is the loss of the fused call
    alone = cs.linear_cross_entropy(x, w, t, **kwargs)
    np.testing.assert_array_equal(np.asarray(alone), np.asarray(got))


def test_opinfo_samples_cover_every_entry():
    labels = {p.id.split("-")[0] for p in OPINFO}
    assert labels == {"reference", "chunked", "chunked_none"}
    assert len(OPINFO) >= 600


# --------------------------------------------------------------------------------------------
# Against torch autograd at larger sizes, chunks that do not divide V
# --------------------------------------------------------------------------------------------
def _problem(n=96, h=48, v=1003, seed=0, dtype=np.float32, scale=1.0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h)).astype(dtype)
    w = (rng.standard_normal((v, h)) * scale / np.sqrt(h)).astype(dtype)
    b = (0.1 * rng.standard_normal(v)).astype(dtype)
    y = rng.integers(0, v, n)
    return x, w, b, y


OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"ignore_index": 5},
    {"label_smoothing": 0.1},
    {"weight": "random"},
    {"weight": "random", "label_smoothing": 0.25, "ignore_index": 5, "reduction": "sum"},
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("chunk", [1, 77, 256, 1002, 1003, 5000])
@pytest.mark.parametrize(
    "opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain"
)
def test_matches_torch_autograd(dtype, chunk, opts):
    x, w, b, y = _problem(dtype=dtype, scale=4.0)
    kwargs = dict(opts)
    if kwargs.get("weight") == "random":
        kwargs["weight"] = np.random.default_rng(1).random(w.shape[0])
    if "ignore_index" in kwargs:
        y[::7] = kwargs["ignore_index"] if chunk != 1 else y[::7]
    ref, (rgx, rgw, rgb) = _torch64(x, w, y, dict(kwargs, linear_bias=b))
    loss, gx, gw, gb = cs.linear_cross_entropy_with_grad(
        x, w, y, linear_bias=b, chunk_size=chunk, **kwargs
    )
    rtol = 1e-5 if dtype == np.float32 else 1e-13
    ref = np.asarray(ref, np.float64)
    assert np.max(np.abs(np.asarray(loss, np.float64) - ref)) <= rtol * np.max(np.abs(ref))
    for name, g, r in (("grad_input", gx, rgx), ("grad_weight", gw, rgw), ("grad_bias", gb, rgb)):
        assert g.dtype == dtype
        err = np.max(np.abs(g.astype(np.float64) - r)) / np.max(np.abs(r))
        assert err <= rtol, f"{name}: {err:.3g} of the largest entry"


def test_chunk_size_changes_nothing_beyond_the_products_rounding():
    """Every chunking gives the same losses and gradients up to the rounding of the float32
    products (BLAS may sum a product of another shape in another order: a one-column chunk is
    a matrix-vector product), within (4 + H) eps of the largest entry."""
    x, w, b, y = _problem(n=40, h=16, v=999, scale=8.0)
    base = lin.run_fused(x, w, y, linear_bias=b, reduction="none", chunk_size=999, with_grad=True)
    tol = (4 + x.shape[1]) * np.finfo(np.float32).eps
    for chunk in (1, 2, 10, 333, 500, 998, 4096):
        r = lin.run_fused(
            x, w, y, linear_bias=b, reduction="none", chunk_size=chunk, with_grad=True
        )
        np.testing.assert_allclose(r.per_row, base.per_row, rtol=tol, atol=0)
        for g, g0 in ((r.grad_input, base.grad_input), (r.grad_weight, base.grad_weight)):
            np.testing.assert_allclose(g, g0, rtol=0, atol=tol * np.abs(g0).max())


@pytest.fixture
def small_row_blocks(monkeypatch):
    """Row blocks of 32 rows at V = 1003 (float32), so that a 100-row problem runs in four
    blocks, the last one short; returns the calls of ``run_row_blocks`` (rows per block)."""
    monkeypatch.setattr(kern, "MIN_ROW_BLOCK", 32)
    monkeypatch.setattr(kern, "ROW_BLOCK_BYTES", 32 * 1003 * 4 + 100)
    calls = []
    real = kern.run_row_blocks

    def spy(*args, rows, **kwargs):
        calls.append(rows)
        return real(*args, rows=rows, **kwargs)

    monkeypatch.setattr(kern, "run_row_blocks", spy)
    return calls


@pytest.mark.parametrize(
    "opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain"
)
def test_row_blocks_match_torch_autograd(small_row_blocks, opts):
    """The default path for a vocabulary whose rows fit in blocks (three matrix products, the
    gradient accumulated block by block): float32, with a bias, every option."""
    x, w, b, y = _problem(n=100, dtype=np.float32, scale=4.0)
    kwargs = dict(opts)
    if kwargs.get("weight") == "random":
        kwargs["weight"] = np.random.default_rng(1).random(w.shape[0])
    if "ignore_index" in kwargs:
        y[::7] = kwargs["ignore_index"]
    ref, (rgx, rgw, rgb) = _torch64(x, w, y, dict(kwargs, linear_bias=b))
    loss, gx, gw, gb = cs.linear_cross_entropy_with_grad(x, w, y, linear_bias=b, **kwargs)
    assert small_row_blocks == [32]
    ref = np.asarray(ref, np.float64)
    assert np.max(np.abs(np.asarray(loss, np.float64) - ref)) <= 1e-5 * np.max(np.abs(ref))
    for name, g, r in (("grad_input", gx, rgx), ("grad_weight", gw, rgw), ("grad_bias", gb, rgb)):
        assert g.dtype == np.float32
        err = np.max(np.abs(g.astype(np.float64) - r)) / np.max(np.abs(r))
        assert err <= 1e-5, f"{name}: {err:.3g} of the largest entry"
    plain = cs.linear_cross_entropy(x, w, y, linear_bias=b, **kwargs)
    np.testing.assert_array_equal(plain, loss)  # the forward alone: the same losses


def test_row_blocks_keep_the_contract_on_confident_rows(small_row_blocks, monkeypatch):
    """Confident rows (losses down to 1e-91) in row blocks: the losses within 4 ulp of the
    oracle, where torch's float32 gives 0; the true-class gradients (grad_bias[y], -S/(1+S)
    summed) too, where softmax - onehot gives 0; the gradients as the vocabulary-chunk path's,
    up to the products' rounding."""
    x, w, y, _ = _integer_problem()
    loss = cs.linear_cross_entropy(x, w, y, reduction="none")
    assert small_row_blocks == [32]
    exact = oracle.linear_cross_entropy(x, w, y)
    assert np.min(exact) < 1e-30
    assert_ulp(loss, exact, np.float32, what="row-block per-row loss")

    monkeypatch.setattr(kern, "MIN_ROW_BLOCK", 3)
    monkeypatch.setattr(kern, "ROW_BLOCK_BYTES", 3 * 700 * 4)
    x, w, y, _ = _integer_problem(n=8, factor=4.0)
    b = np.zeros(w.shape[0], dtype=np.float32)
    blocked = lin.run_fused(x, w, y, linear_bias=b, reduction="sum", with_grad=True)
    assert small_row_blocks == [32, 3]
    _, _, exact_gb = oracle.linear_cross_entropy_grad(x, w, y, b)
    mine = np.unique(y)
    assert_ulp(blocked.grad_bias[mine], exact_gb[mine], np.float32, what="true-class grad_bias")
    chunked = lin.run_fused(x, w, y, linear_bias=b, reduction="sum", with_grad=True, chunk_size=256)
    tol = (4 + x.shape[1]) * np.finfo(np.float32).eps
    for g, g0 in (
        (blocked.grad_input, chunked.grad_input),
        (blocked.grad_weight, chunked.grad_weight),
    ):
        np.testing.assert_allclose(g, g0, rtol=0, atol=tol * np.abs(g0).max())


def test_row_blocks_filter_the_same_tiles(monkeypatch):
    """Cut Cross-Entropy's filter sees the same 128 x 128 tiles in row blocks of 128 rows as in
    vocabulary chunks of 256 classes: the same tiles dropped, the same mass."""
    x, w, b, y = _problem(n=300, h=32, v=1000, seed=9, scale=12.0)
    monkeypatch.setattr(kern, "ROW_BLOCK_BYTES", 128 * 1000 * 4)
    eps = np.finfo(np.float32).eps / 32
    blocked = lin.run_fused(x, w, y, with_grad=True, filter_eps=eps)
    chunked = lin.run_fused(x, w, y, chunk_size=256, with_grad=True, filter_eps=eps)
    assert kern.row_block(300, 1000, 4) == 128
    np.testing.assert_array_equal(blocked.filter_stats[2:], chunked.filter_stats[2:])
    np.testing.assert_allclose(blocked.filter_stats[:2], chunked.filter_stats[:2], rtol=1e-5)


# --------------------------------------------------------------------------------------------
# The accuracy contract, against the oracle
# --------------------------------------------------------------------------------------------
def _integer_problem(n=64, h=16, v=700, seed=3, factor=16.0):
    """Small-integer inputs: every float32 product and partial sum is exact, so the kernel's
    logits are the exact ones. ``factor`` (a power of 2) scales the weights: 16 makes the
    argmax class win by wide margins (10 of the 64 losses below 1e-30, the least 5e-91)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, (n, h)).astype(np.float32)
    w = (rng.integers(-2, 3, (v, h)) * factor).astype(np.float32)
    z = x.astype(np.float64) @ w.T.astype(np.float64)
    y = np.argmax(z, axis=1)  # confident and correct
    return x, w, y, z


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("chunk", [64, 333, 700])
def test_confident_rows_within_4_ulp_of_the_oracle(dtype, chunk):
    x, w, y, z = _integer_problem()
    x, w = x.astype(dtype), w.astype(dtype)
    exact = oracle.linear_cross_entropy(x, w, y)
    assert np.min(exact) < 1e-30 and np.max(exact) > 0  # the rows are confident
    loss = cs.linear_cross_entropy(x, w, y, reduction="none", chunk_size=chunk)
    assert_ulp(loss, exact, dtype, what="per-row loss")
    # torch, in the same dtype, gets every loss below 1e-20 wrong by more than 50% (0, or a
    # rounding residue of lse - z_y)
    ref = (
        F.linear_cross_entropy(
            torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(y), reduction="none"
        )
        .numpy()
        .astype(np.float64)
    )
    tiny = exact < 1e-20
    assert tiny.sum() >= 10
    rel = np.abs(ref[tiny] - exact[tiny].astype(np.float64)) / exact[tiny].astype(np.float64)
    assert np.all(rel > 0.5)


def test_confident_true_class_gradient_keeps_its_relative_accuracy():
    """grad_bias[y] sums the true-class entries -S/(1+S) of the rows whose target is y: tiny
    and exact to a few ulp, where softmax - onehot gives 0."""
    x, w, y, _ = _integer_problem(n=8, factor=4.0)
    b = np.zeros(w.shape[0], dtype=np.float32)
    _, _, _, gb = cs.linear_cross_entropy_with_grad(
        x, w, y, linear_bias=b, reduction="sum", chunk_size=100
    )
    _, _, exact_gb = oracle.linear_cross_entropy_grad(x, w, y, b)
    mine = np.unique(y)
    assert np.all(gb[mine] < 0) and np.all(exact_gb[mine] < 0)
    assert_ulp(gb[mine], exact_gb[mine], np.float32, what="true-class grad_bias")


@pytest.mark.parametrize(
    "opts", [{}, {"label_smoothing": 0.2, "weight": "random"}, {"ignore_index": 3}]
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_part_within_4_ulp_of_its_own_logits(dtype, opts):
    """Whatever the product's rounding, the loss is within 4 ulp of the exact cross-entropy of
    the logits the kernel computed (the oracle fed the kernel's chunks)."""
    x, w, b, y = _problem(n=50, h=64, v=900, seed=5, dtype=dtype, scale=30.0)
    kwargs = dict(opts)
    if kwargs.get("weight") == "random":
        kwargs["weight"] = np.random.default_rng(2).random(w.shape[0])
    if "ignore_index" in kwargs:
        y[::5] = kwargs["ignore_index"]
    chunk = 128
    loss = cs.linear_cross_entropy(
        x, w, y, linear_bias=b, reduction="none", chunk_size=chunk, **kwargs
    )

    def own(c0, c1):
        out = np.empty((x.shape[0], c1 - c0), dtype=dtype)
        kern.chunk_logits(x, w, b, c0, c1, out)
        return out

    exact_own = oracle.linear_cross_entropy(x, w, y, b, logits=own, chunk=chunk, **kwargs)
    assert_ulp(loss, exact_own, dtype, what="loss vs the exact CE of the kernel's logits")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("chunk", [1, 7])
def test_a_maximum_that_rises_at_every_chunk_keeps_the_contract(dtype, chunk):
    """Logits that grow along the vocabulary: the running maximum rises at every chunk (2000
    rescalings of S with chunk=1), and the loss stays within 4 ulp of the exact cross-entropy of
    the kernel's own logits."""
    rng = np.random.default_rng(0)
    n, h, v = 16, 8, 2000
    a = rng.standard_normal(h)
    w = (
        np.linspace(0, 1, v)[:, None] * a[None, :] * 40 + 0.01 * rng.standard_normal((v, h))
    ).astype(dtype)
    x = (a[None, :] + 0.01 * rng.standard_normal((n, h))).astype(dtype)
    y = np.full(n, v - 1)
    y[::2] = v - 5
    loss = cs.linear_cross_entropy(x, w, y, reduction="none", chunk_size=chunk)

    def own(c0, c1):
        out = np.empty((n, c1 - c0), dtype=dtype)
        kern.chunk_logits(x, w, None, c0, c1, out)
        return out

    exact_own = oracle.linear_cross_entropy(x, w, y, logits=own, chunk=chunk)
    assert_ulp(loss, exact_own, dtype, what="loss with a rising maximum")


def test_oracle_agrees_with_torch_float64():
    x, w, b, y = _problem(n=30, h=20, v=500, dtype=np.float64, scale=3.0)
    y[4] = -100
    cw = np.random.default_rng(0).random(500)
    for kw in ({}, {"label_smoothing": 0.3, "weight": cw}):
        loss, gx, gw, gb = oracle.linear_cross_entropy_and_grad(x, w, y, b, chunk=64, **kw)
        ref, (rx, rw, rb) = _torch64(x, w, y, dict(kw, linear_bias=b, reduction="none"))
        np.testing.assert_allclose(loss.astype(np.float64), ref, rtol=1e-14, atol=1e-300)
        for g, r in ((gx, rx), (gw, rw), (gb, rb)):
            assert np.max(np.abs(g - r)) <= 1e-13 * np.max(np.abs(r))


# --------------------------------------------------------------------------------------------
# float16 / bfloat16, NaN, ignored rows
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [dtypes.bfloat16, dtypes.float16])
def test_low_precision_is_the_float32_computation_rounded_once(dtype):
    x, w, b, y = _problem(n=30, h=24, v=600, seed=7)
    x, w, b = x.astype(dtype), w.astype(dtype), b.astype(dtype)
    loss, gx, gw, gb = cs.linear_cross_entropy_with_grad(x, w, y, linear_bias=b, chunk_size=100)
    up = [a.astype(np.float32) for a in (x, w, b)]
    l32, gx32, gw32, gb32 = cs.linear_cross_entropy_with_grad(
        up[0], up[1], y, linear_bias=up[2], chunk_size=100
    )
    assert np.asarray(loss).dtype == dtype and gx.dtype == dtype and gw.dtype == dtype
    assert np.asarray(loss).astype(np.float32) == np.float32(l32).astype(dtype).astype(np.float32)
    for g, g32 in ((gx, gx32), (gw, gw32), (gb, gb32)):
        np.testing.assert_array_equal(g.astype(np.float32), g32.astype(dtype).astype(np.float32))


def test_nan_rows_and_all_ignored():
    x, w, b, y = _problem(n=6, h=8, v=50)
    x[2, 3] = np.nan
    loss, gx, gw = cs.linear_cross_entropy_with_grad(x, w, y, reduction="none", chunk_size=7)
    assert np.isnan(loss[2]) and np.all(np.isfinite(np.delete(loss, 2)))
    assert np.all(np.isnan(gx[2])) and np.all(np.isfinite(np.delete(gx, 2, axis=0)))
    assert np.all(np.isnan(gw))  # every class sees the NaN row, as in torch
    ref = F.linear_cross_entropy(
        torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(y), reduction="none"
    ).numpy()
    assert np.array_equal(np.isnan(ref), np.isnan(loss))
    y_all = np.full(6, -100)
    assert np.isnan(cs.linear_cross_entropy(x[[0, 1]], w, y_all[:2]))
    loss, gx, gw = cs.linear_cross_entropy_with_grad(x[[0, 1]], w, y_all[:2], reduction="sum")
    assert loss == 0 and not gx.any() and not gw.any()


def test_inputs_are_not_modified_and_layouts_work():
    x, w, b, y = _problem(n=20, h=12, v=90)
    xf, wf = np.asfortranarray(x), np.asfortranarray(w)
    for a in (xf, wf, b):
        a.setflags(write=False)
    ref = cs.linear_cross_entropy_with_grad(x, w, y, linear_bias=b, chunk_size=16)
    got = cs.linear_cross_entropy_with_grad(xf, wf, y, linear_bias=b, chunk_size=16)
    for r, g in zip(ref, got):
        np.testing.assert_array_equal(r, g)
    wt = np.ascontiguousarray(w.T).T  # a transposed view: strided chunks
    for r, g in zip(ref, cs.linear_cross_entropy_with_grad(x, wt, y, linear_bias=b, chunk_size=16)):
        np.testing.assert_array_equal(r, g)


# --------------------------------------------------------------------------------------------
# Cut Cross-Entropy's gradient filter
# --------------------------------------------------------------------------------------------
def test_gradient_filter_drops_only_small_tiles():
    x, w, b, y = _problem(n=300, h=32, v=1000, seed=9, scale=12.0)
    full = lin.run_fused(x, w, y, chunk_size=256, with_grad=True)
    none = lin.run_fused(x, w, y, chunk_size=256, with_grad=True, filter_eps=1e-30)
    np.testing.assert_array_equal(full.grad_weight, none.grad_weight)
    assert none.filter_stats[2] == 0 and none.filter_stats[3] == 3 * 8
    eps = np.finfo(np.float32).eps / 32
    filt = lin.run_fused(x, w, y, chunk_size=256, with_grad=True, filter_eps=eps)
    dropped, seen, tiles_dropped, tiles = filt.filter_stats
    assert 0 <= dropped <= seen and 0 <= tiles_dropped <= tiles == 24
    assert filt.loss == full.loss  # the filter never touches the loss
    diff = np.abs(filt.grad_weight.astype(np.float64) - full.grad_weight)
    # a dropped entry is below eps (times 1/N, the mean's scale) and each grad_weight entry
    # sums N of them times |x| <= 5
    assert diff.max() <= eps / x.shape[0] * x.shape[0] * np.abs(x).max()
    huge = lin.run_fused(x, w, y, chunk_size=256, with_grad=True, filter_eps=10.0)
    assert huge.filter_stats[2] == huge.filter_stats[3]  # every tile below 10: all dropped
    assert not huge.grad_weight.any() and not huge.grad_input.any()


# --------------------------------------------------------------------------------------------
# Memory: O(N x chunk), measured
# --------------------------------------------------------------------------------------------
def _peak_extra(fn):
    """Peak traced bytes during ``fn()`` above what was allocated before, minus what it
    returns (the outputs are not extra memory)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    kept = sum(a.nbytes for a in out if isinstance(a, np.ndarray))
    return peak - kept, out


@pytest.mark.parametrize("dtype", [np.float32, dtypes.bfloat16])
def test_peak_memory_is_order_n_times_chunk(dtype):
    n, h, v, chunk = 256, 32, 32768, 1024
    x, w, b, y = _problem(n=n, h=h, v=v, dtype=np.float32)
    x, w = x.astype(dtype), w.astype(dtype)
    cs.linear_cross_entropy_with_grad(x[:2], w[:300], y[:2] % 300, chunk_size=128)  # compile
    extra, _ = _peak_extra(lambda: cs.linear_cross_entropy_with_grad(x, w, y, chunk_size=chunk))
    logits_bytes = n * v * 4
    # the logits buffer, (N, H) buffers, weight chunks in float32, the float64 class weights,
    # the state
    budget = n * chunk * 4 + 3 * n * h * 4 + 2 * chunk * h * 4 + v * 8 + n * 9 * 8 + (64 << 10)
    assert extra <= budget, f"{extra} bytes > {budget}"
    assert extra <= logits_bytes / 8


def test_peak_memory_of_row_blocks_is_one_block_of_logits():
    """The default path at a vocabulary whose row blocks fit: one (rows, V) logits block, the
    product buffer of the weight gradient, the class weights; 256 of 1024 rows here."""
    n, h, v = 1024, 32, 32768
    x, w, b, y = _problem(n=n, h=h, v=v, dtype=np.float32)
    rows = kern.row_block(n, v, 4)
    assert 0 < rows < n
    cs.linear_cross_entropy_with_grad(x[:2], w[:300], y[:2] % 300)  # compile
    extra, _ = _peak_extra(lambda: cs.linear_cross_entropy_with_grad(x, w, y))
    budget = rows * v * 4 + kern.ACCUMULATE_BYTES + 3 * n * h * 4 + v * 8 + (64 << 10)
    assert extra <= budget, f"{extra} bytes > {budget}"
    assert extra <= n * v * 4 / 3


# --------------------------------------------------------------------------------------------
# Errors that name the argument
# --------------------------------------------------------------------------------------------
def _good():
    x, w, b, y = _problem(n=4, h=3, v=5)
    return dict(input=x, linear_weight=w, target=y)


BAD = [
    ({"input": np.zeros((2, 2, 3), np.float32)}, ValueError, "input"),
    ({"input": np.zeros((4, 3), np.int64)}, TypeError, "input"),
    ({"linear_weight": np.zeros(3, np.float32)}, ValueError, "linear_weight"),
    ({"linear_weight": np.zeros((5, 4), np.float32)}, ValueError, "linear_weight"),
    ({"linear_weight": np.zeros((5, 3), np.float64)}, TypeError, "linear_weight"),
    ({"linear_weight": np.zeros((0, 3), np.float32)}, ValueError, "linear_weight"),
    ({"linear_bias": np.zeros(4, np.float32)}, ValueError, "linear_bias"),
    ({"linear_bias": np.zeros(5, np.float64)}, TypeError, "linear_bias"),
    ({"target": np.array([0, 1, 2])}, ValueError, "target"),
    ({"target": np.array([0, 1, 2, 5])}, ValueError, "target"),
    ({"target": np.array([0, 1, 2, -1])}, ValueError, "target"),
    ({"target": np.zeros((4, 5), np.float32) - 1}, ValueError, "target"),
    ({"target": np.zeros((4, 4), np.float32)}, ValueError, "target"),
    ({"target": np.array(["a", "b", "c", "d"])}, TypeError, "target"),
    ({"weight": -np.ones(5)}, ValueError, "weight"),
    ({"weight": np.ones(4)}, ValueError, "weight"),
    ({"reduction": "avg"}, ValueError, "reduction"),
    ({"label_smoothing": 1.5}, ValueError, "label_smoothing"),
    ({"chunk_size": 0}, ValueError, "chunk_size"),
    ({"chunk_size": 2.5}, ValueError, "chunk_size"),
    ({"ignore_index": 1.0}, TypeError, "ignore_index"),
]


@pytest.mark.parametrize("change, exc, name", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument(change, exc, name):
    args = _good()
    args.update(change)
    x, w, t = args.pop("input"), args.pop("linear_weight"), args.pop("target")
    with pytest.raises(exc, match=name):
        cs.linear_cross_entropy(x, w, t, **args)
    with pytest.raises(exc, match=name):
        cs.linear_cross_entropy_with_grad(x, w, t, **args)


def test_k_dimensional_weight_needs_a_batched_input():
    with pytest.raises(ValueError, match="batched input"):
        cs.linear_cross_entropy(
            np.zeros(3, np.float32), np.zeros((2, 4, 3), np.float32), np.array([0, 1, 2, 3])
        )


def test_exported():
    assert {"linear_cross_entropy", "linear_cross_entropy_with_grad"} <= set(cs.__all__)


# --------------------------------------------------------------------------------------------
# The study kind and its report section
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_cells():
    from cestudy.study.kinds import linear as kind

    cells = [
        dict(
            vocab=700,
            hidden=64,
            tokens=40,
            dtype=dt,
            family=fam,
            scale=sc,
            chunk=128,
            repeats=1,
            seed=0,
            skip="",
        )
        for dt, fam, sc in (("float32", "gaussian", 4.0), ("bfloat16", "confident", 30.0))
    ]
    return [(c, kind.compute(c)) for c in cells]


def test_linear_kind_measures_every_formulation(tiny_cells):
    from cestudy.study.kinds import linear as kind

    for cell, out in tiny_cells:
        u = out["unit_roundoff"]
        for f in kind.FORMULATIONS:
            assert f"{f}__loss_rel_err" in out, f
            assert out[f"{f}__seconds"] > 0
        # the cross-entropy part of the fused kernel keeps the contract on its own logits, and
        # its logits are those the error split was computed with
        assert out["fused__row_rel_err_max_ce"] <= 4 * u
        assert out["fused__loss_rel_err"] <= 4 * u
        assert out["fused__traced_peak"] > 0
        assert out["fused_filtered__loss_rel_err"] == out["fused__loss_rel_err"]
        if cell["family"] == "confident":
            # every tile of a confident bfloat16 batch is below eps/32: the filter drops all,
            # and the filtered step makes no progress
            assert out["fused_filtered__dropped_mass"] == 1.0
            assert out["fused_filtered__step_bias_rel"] == pytest.approx(1.0)
            assert out["materialised_torch__rows_zero"] > 0.5
            assert out["fused__rows_zero"] == 0


def test_linear_report_section_renders(tiny_cells, tmp_path):
    from cestudy.report.markdown import Context
    from cestudy.report.sections import linear as section

    rows = []
    for cell, out in tiny_cells:
        row = {"study": "t", "kind": "linear", "status": "ok", "message": ""}
        row.update({f"p_{k}": v for k, v in cell.items()})
        row.update(out)
        rows.append(row)
    (tmp_path / "figures").mkdir()
    part = section.render(Context(tmp_path, "t"), rows)
    assert "## Fused linear cross-entropy" in part.markdown
    assert "### Where the error comes from" in part.markdown
    assert len(part.findings) >= 3
    assert (tmp_path / "figures" / "t-linear-memory.png").exists()


def test_linear_study_file_parses_within_the_memory_limit():
    from cestudy.study import spec
    from cestudy.study.kinds import linear as kind

    cells = spec.load("linear").cells()
    assert len(cells) >= 20
    assert all(c["vocab"] * c["hidden"] <= kind.MAX_WEIGHTS for c in cells)
    assert {c["vocab"] for c in cells} >= {8192, 262144}
    assert {c["hidden"] for c in cells} >= {256, 4096}
    assert {c["dtype"] for c in cells} == {"float32", "bfloat16", "float16"}
    with pytest.raises(ValueError, match="skip"):
        kind.skipped({"skip": "fused, nope"})
