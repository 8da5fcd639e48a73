"""cestudy.buffers: a fused call hands a gradient array out again only once nobody holds it."""

import threading

import numpy as np
import pytest

import cestudy as cs
from cestudy import buffers

# 512 x 1024 float32: 2 MiB, above buffers.MIN_BYTES
N, C = 512, 1024


@pytest.fixture(autouse=True)
def _own_pool():
    buffers.release()
    yield
    buffers.release()


@pytest.fixture
def inputs():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(N, C)) * 3).astype(np.float32)
    t = rng.integers(0, C, N)
    return x, t


def _expected(x, t):
    g = np.empty_like(x)
    loss, _ = cs.cross_entropy_with_grad(x, t, out=g)
    return loss, g


def test_dropped_gradient_is_reused_with_the_right_values(inputs):
    x, t = inputs
    loss0, g0 = _expected(x, t)
    _, g1 = cs.cross_entropy_with_grad(x, t)
    address = g1.ctypes.data
    del g1
    loss2, g2 = cs.cross_entropy_with_grad(x * 0.5, t)
    assert g2.ctypes.data == address
    loss_half, g_half = _expected(x * 0.5, t)
    assert loss2 == loss_half
    np.testing.assert_array_equal(g2, g_half)
    assert loss0 != loss_half


def test_held_gradient_is_never_overwritten(inputs):
    x, t = inputs
    _, g1 = cs.cross_entropy_with_grad(x, t)
    kept = g1.copy()
    _, g2 = cs.cross_entropy_with_grad(x * 0.5, t)
    assert not np.shares_memory(g1, g2)
    np.testing.assert_array_equal(g1, kept)


@pytest.mark.parametrize(
    "hold",
    [lambda g: g[:, :3], lambda g: g.reshape(-1), lambda g: memoryview(g), lambda g: g.T],
    ids=["slice", "reshape", "memoryview", "transpose"],
)
def test_a_view_of_a_dropped_gradient_keeps_it_out_of_the_pool(inputs, hold):
    x, t = inputs
    _, g1 = cs.cross_entropy_with_grad(x, t)
    view = hold(g1)
    kept = np.array(view, copy=True)
    del g1
    _, g2 = cs.cross_entropy_with_grad(x * 0.5, t)
    assert not np.shares_memory(np.asarray(view), g2)
    np.testing.assert_array_equal(np.asarray(view), kept)


def test_a_training_loop_alternates_between_two_arrays(inputs):
    x, t = inputs
    addresses = set()
    for step in range(6):
        loss, grad = cs.cross_entropy_with_grad(x + step, t)
        addresses.add(grad.ctypes.data)
    assert len(addresses) == 2


def test_small_gradients_are_not_pooled():
    x = np.zeros((4, 10), dtype=np.float32)
    cs.cross_entropy_with_grad(x, np.zeros(4, dtype=np.int64))
    assert buffers._pool() == []


def test_pool_keeps_at_most_keep_arrays_and_max_bytes(inputs, monkeypatch):
    x, t = inputs
    held = [cs.cross_entropy_with_grad(x, t)[1] for _ in range(buffers.KEEP + 2)]
    assert len(buffers._pool()) == buffers.KEEP
    monkeypatch.setattr(buffers, "MAX_BYTES", 3 * x.nbytes)
    held.append(cs.cross_entropy_with_grad(x, t)[1])
    assert sum(a.nbytes for a in buffers._pool()) <= 3 * x.nbytes
    monkeypatch.setattr(buffers, "MAX_BYTES", x.nbytes - 1)
    _, too_large = cs.cross_entropy_with_grad(x, t)
    assert not any(a is too_large for a in buffers._pool())


def test_each_thread_has_its_own_pool(inputs):
    x, t = inputs
    _, g1 = cs.cross_entropy_with_grad(x, t)
    address = g1.ctypes.data
    del g1
    seen = []
    worker = threading.Thread(
        target=lambda: seen.append(cs.cross_entropy_with_grad(x, t)[1].ctypes.data)
    )
    worker.start()
    worker.join()
    assert seen and seen[0] != address
    assert len(buffers._pool()) == 1


def test_release_drops_the_pool(inputs):
    x, t = inputs
    cs.cross_entropy_with_grad(x, t)
    assert len(buffers._pool()) == 1
    buffers.release()
    assert buffers._pool() == []


def test_float16_out_goes_through_a_pooled_scratch_that_is_idle_after_the_call(inputs):
    x, t = inputs
    x16 = x.astype(np.float16)
    out = np.empty_like(x16)
    _, got = cs.cross_entropy_with_grad(x16, t, out=out)
    assert got is out
    (scratch,) = buffers._pool()
    assert scratch.dtype == np.float32 and not np.shares_memory(scratch, out)
    del scratch
    _, plain = cs.cross_entropy_with_grad(x16, t)
    assert plain.dtype == np.float16
    np.testing.assert_array_equal(out, plain)
    assert len(buffers._pool()) == 1  # the same scratch served the second call
