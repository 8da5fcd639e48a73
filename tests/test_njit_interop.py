"""The kernels are plain njit functions: other projects call them from their own jitted code.

This is the example the README shows."""
import numpy as np
from numba import njit

import cestudy as cs
from cestudy.kernels import cpu


@njit
def training_step_loss(logits, labels, weight):
    """A user's jitted function that calls cestudy's kernel directly (no Python round trip)."""
    n, c = logits.shape
    per_row = np.empty(n)
    grad = np.empty_like(logits)
    cpu.cross_entropy_index_fwd_grad(logits, labels, weight, -100, 0.0, 1.0 / n, per_row, grad)
    return per_row.sum() / n, grad


def test_kernel_called_from_user_njit_code():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 5))
    y = rng.integers(0, 5, 8)
    loss, grad = training_step_loss(x, y, np.ones(5))
    ref_loss, ref_grad = cs.cross_entropy_with_grad(x, y)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-15)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-15)
