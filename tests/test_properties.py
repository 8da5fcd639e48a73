"""hypothesis properties: shift invariance, gradient rows summing to 0, the KL decomposition,
non-negative losses."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import cestudy as cs

finite = st.floats(-300, 300, allow_nan=False, width=64)


def logits_and_target(draw, max_c=12):
    n = draw(st.integers(1, 6))
    c = draw(st.integers(2, max_c))
    x = draw(hnp.arrays(np.float64, (n, c), elements=finite))
    y = draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, c - 1)))
    return x, y


@st.composite
def batch(draw):
    return logits_and_target(draw)


@settings(max_examples=60, deadline=None)
@given(batch(), st.sampled_from([1.0, 2.0**20, -(2.0**30)]))
def test_shift_invariance(b, shift):
    x, y = b
    # a power-of-two shift far above the spread keeps x_j - m exact only if no bits are lost:
    # use shifts whose sum with x is exact (x has at most 2^-20 resolution here)
    x = np.round(x * 2**10) / 2**10
    a = cs.cross_entropy(x, y, reduction="none")
    b2 = cs.cross_entropy(x + shift, y, reduction="none")
    np.testing.assert_allclose(a, b2, rtol=8 * np.finfo(float).eps, atol=0)


@settings(max_examples=60, deadline=None)
@given(batch(), st.floats(0, 0.5))
def test_gradient_rows_sum_to_zero_and_loss_is_non_negative(b, smoothing):
    x, y = b
    loss, grad = cs.cross_entropy_with_grad(x, y, reduction="none", label_smoothing=smoothing)
    assert np.all(loss >= 0)
    scale = np.abs(grad).max(axis=1) * x.shape[1]
    assert np.all(np.abs(grad.sum(axis=1)) <= 8 * np.finfo(float).eps * np.maximum(scale, 1e-300))


@st.composite
def soft_batch(draw):
    x, _ = logits_and_target(draw)
    w = draw(hnp.arrays(np.float64, x.shape, elements=st.floats(0, 1)))
    w[:, 0] += 1e-3
    return x, w / w.sum(axis=1, keepdims=True)


@settings(max_examples=60, deadline=None)
@given(soft_batch())
def test_kl_decomposition_h_p_q_equals_h_p_plus_kl(b):
    x, p = b
    ce = cs.cross_entropy(x, p, reduction="none")
    h = cs.entropy(p)
    kl = cs.kl_divergence(x, p, reduction="none")
    assert np.all(kl >= -8 * np.finfo(float).eps * ce)
    np.testing.assert_allclose(h + kl, ce, rtol=8 * np.finfo(float).eps, atol=1e-300)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.float64, (5, 3), elements=finite),
    hnp.arrays(np.float64, (5, 3), elements=st.floats(0, 1)),
)
def test_binary_losses_are_non_negative(x, t):
    assert np.all(cs.binary_cross_entropy_with_logits(x, t, reduction="none") >= 0)
    assert np.all(cs.sigmoid_focal_loss(x, t) >= 0)
