"""The kernels are plain njit functions: other projects call them from their own jitted code.

This is the example the README shows."""

import numpy as np
from numba import njit

import cestudy as cs
from cestudy.kernels import cpu, cpu_fast


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


@njit
def training_step_in_place(logits, labels, weight):
    """The vectorised kernels from user code, the gradient written over the logits (no
    N x C buffer per step): the serial twin, as a user's own parallel loop would call it."""
    n = logits.shape[0]
    per_row = np.empty(n)
    cpu_fast.cross_entropy_index_fwd_grad_serial(
        logits, labels, weight, -100, 0.0, 1.0 / n, per_row, logits
    )
    return per_row.sum() / n


def test_fast_kernel_in_place_from_user_njit_code():
    rng = np.random.default_rng(1)
    for dtype in (np.float32, np.float64):
        x = rng.normal(size=(8, 5)).astype(dtype)
        y = rng.integers(0, 5, 8)
        ref_loss, ref_grad = cs.cross_entropy_with_grad(x, y)
        work = x.copy()
        loss = training_step_in_place(work, y, np.ones(5))
        np.testing.assert_allclose(loss, ref_loss, rtol=4 * np.finfo(dtype).eps)
        np.testing.assert_allclose(
            work,
            ref_grad,
            rtol=4 * np.finfo(dtype).eps,
            atol=4 * np.finfo(dtype).eps * np.abs(ref_grad).max(),
        )
