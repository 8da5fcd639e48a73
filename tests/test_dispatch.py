"""The dispatch layer's fast paths change no result: element-wise losses run with consecutive
short rows merged into one kernel row (``dispatch.merge_factor``), and class-index targets are
checked by their minimum and maximum first. Each case compares against the same call with the
fast path turned off, and against torch."""

from __future__ import annotations

import re

import numpy as np
import pytest

import cestudy as cs
from cestudy import dispatch

torch = pytest.importorskip("torch")

SHAPES = [(256, 10), (300, 7), (2048, 1000), (3, 5, 4), (6,), (1, 1), (7, 1)]


def _weights(kind, shape, rng):
    if kind is None:
        return None
    if kind == "class":
        return rng.random(shape[-1]) + 0.5
    return rng.random(shape) + 0.5  # one per element: rows merged by viewing them


def _call(name, x, t, reduction, weight, pos_weight):
    if name == "binary_cross_entropy_with_logits":
        return cs.binary_cross_entropy_with_logits_with_grad(
            x, t, reduction=reduction, weight=weight, pos_weight=pos_weight
        )
    if name == "binary_cross_entropy":
        p = (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)
        return cs.binary_cross_entropy(p, t, reduction=reduction, weight=weight), None
    if name == "sigmoid_focal_loss":
        return cs.sigmoid_focal_loss_with_grad(x, t, reduction=reduction)
    return cs.kl_div_with_grad(-np.abs(x), t, reduction=reduction)


WEIGHTED = ("binary_cross_entropy_with_logits", "binary_cross_entropy")
CASES = [
    (name, weighted)
    for name in (*WEIGHTED, "sigmoid_focal_loss", "kl_div")
    for weighted in (None, "class", "element")
    if weighted is None or name in WEIGHTED
]


@pytest.mark.filterwarnings("ignore:reduction")  # kl_div's warning on 'mean', as torch's
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name, weighted", CASES)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_merged_rows_change_no_result(monkeypatch, shape, name, weighted, reduction):
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 6).astype(np.float32)
    t = (rng.random(shape) < 0.4).astype(np.float32)
    w = _weights(weighted, shape, rng)
    pw = _weights("class", shape, rng) if weighted == "class" else None
    loss, grad = _call(name, x, t, reduction, w, pw)
    monkeypatch.setattr(dispatch, "MERGED_ROW", 1)  # one kernel row per logits row
    ref_loss, ref_grad = _call(name, x, t, reduction, w, pw)
    if grad is not None:
        np.testing.assert_array_equal(grad, ref_grad)
    if reduction == "none":
        np.testing.assert_array_equal(loss, ref_loss)
    else:  # the same compensated sum of other partial sums: within an ulp
        np.testing.assert_allclose(loss, ref_loss, rtol=2 * np.finfo(np.float32).eps)
    if name == "binary_cross_entropy_with_logits":
        tw = None if w is None else torch.from_numpy(np.asarray(w))
        tpw = None if pw is None else torch.from_numpy(np.asarray(pw))
        ref = torch.nn.functional.binary_cross_entropy_with_logits(
            torch.from_numpy(x).double(),
            torch.from_numpy(t).double(),
            weight=tw,
            pos_weight=tpw,
            reduction=reduction,
        )
        # torch's float64 formula loses the relative accuracy of tiny losses (x = -24, t = 0:
        # 2e-5 off): compared to the largest loss
        ref = ref.numpy()
        np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-6 * np.max(np.abs(ref)))


def test_merge_factor_takes_whole_small_calls_and_powers_of_two():
    assert dispatch.merge_factor(256, 10) == 256  # one row of 2560
    assert dispatch.merge_factor(2048, 1000) == 4  # rows of 4000
    assert dispatch.merge_factor(4097, 3) == 1  # odd N: rows stay apart
    assert dispatch.merge_factor(8, 8192) == 1  # long rows stay apart
    assert dispatch.merge_factor(0, 10) == 1


@pytest.mark.parametrize(
    "target, ignore_index, message",
    [
        ([0, 3, 1], -100, None),
        ([0, -100, 1], -100, None),
        ([0, 4, 1], -100, "target[1] = 4 is out of range"),
        ([0, -1, 1], -100, "target[1] = -1 is out of range"),
        ([0, 4, 1], 4, None),
    ],
)
def test_index_targets_are_checked_with_and_without_the_min_max_path(target, ignore_index, message):
    t = np.array(target)
    if message is None:
        out = dispatch.index_target(t, (3,), 4, ignore_index)
        np.testing.assert_array_equal(out, t)
        assert out.dtype == np.int64
    else:
        with pytest.raises(ValueError, match=re.escape(message)):
            dispatch.index_target(t, (3,), 4, ignore_index)


@pytest.mark.parametrize(
    "values",
    [
        [],
        [0],
        [3],
        [4],
        [-1],
        [0, 1, 2, 3] * 100,
        [0, 1, 2, 3] * 100 + [4],  # the one bad entry last, past every vector block
        [-(2**63), 3],
        [2**63 - 1, 0],
    ],
    ids=lambda v: f"{len(v)} entries",
)
def test_the_index_range_scan_agrees_with_numpy(values):
    t = np.array(values, dtype=np.int64)
    expected = t.size == 0 or bool(t.min() >= 0 and t.max() < 4)
    assert dispatch.cpu.indices_in_range(t, 4) is expected


class _Subclass(np.ndarray):
    pass


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_working_layout_logits_and_targets_are_taken_without_a_copy_and_others_are_converted(
    dtype,
):
    x = np.arange(12, dtype=dtype).reshape(3, 4)
    arr, x2, lead = dispatch.class_rows("logits", x)
    assert x2.ctypes.data == x.ctypes.data and lead == (3,)
    # a view of every other column, float16, and a subclass: through the general path
    for other in (x[:, ::2], x.astype(np.float16), x.view(_Subclass)):
        arr, x2, lead = dispatch.class_rows("logits", other)
        assert x2.flags.c_contiguous and x2.dtype in (np.float32, np.float64) and lead == (3,)
        np.testing.assert_array_equal(x2, np.asarray(other, dtype=x2.dtype))
    t = np.array([0, 3, 1])
    assert dispatch.index_target(t, (3,), 4, -100).ctypes.data == t.ctypes.data
    # the fast path still checks the range, and the shape
    with pytest.raises(ValueError, match=re.escape("target[1] = 4 is out of range")):
        dispatch.index_target(np.array([0, 4, 1]), (3,), 4, -100)
    with pytest.raises(ValueError, match="must have shape"):
        dispatch.index_target(t, (2,), 4, -100)
    np.testing.assert_array_equal(dispatch.index_target(t[::-1], (3,), 4, -100), [1, 3, 0])
