"""cestudy.buffers: a fused call hands a gradient array out again only once nobody holds it."""

import threading
import weakref

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


def test_same_size_other_shape_or_dtype_gets_its_own_array(inputs):
    """An idle array is handed out only for its own shape and dtype: the kernels index the
    gradient by the logits' shape, so a (1024, 512) call must not get a (512, 1024) array."""
    x, t = inputs
    cs.cross_entropy_with_grad(x, t)
    (pooled,) = buffers._pool()
    first = weakref.ref(pooled)
    del pooled
    xt = np.ascontiguousarray(x.reshape(C, N))
    tt = t.repeat(2) % N
    _, g_other = cs.cross_entropy_with_grad(xt, tt)
    assert g_other.shape == (C, N) and first() is None  # dropped, not handed out
    np.testing.assert_array_equal(g_other, _expected(xt, tt)[1])
    x64 = x.astype(np.float64)
    _, g64 = cs.cross_entropy_with_grad(x64, t)
    assert g64.dtype == np.float64
    np.testing.assert_array_equal(g64, _expected(x64, t)[1])


def test_a_miss_drops_the_idle_arrays_so_varying_shapes_keep_no_dead_memory(inputs):
    x, t = inputs
    for rows in (N, N - 64, N - 128, N - 192):
        cs.cross_entropy_with_grad(x[:rows], t[:rows])  # each gradient dropped at once
        assert len(buffers._pool()) == 1  # only the array of the last call
    _, held = cs.cross_entropy_with_grad(x, t)
    cs.cross_entropy_with_grad(x[: 64 * 5], t[: 64 * 5])
    assert any(a is held.base for a in buffers._pool())  # a held array is not dropped


def test_a_read_only_array_is_not_handed_out_again(inputs):
    x, t = inputs
    _, g = cs.cross_entropy_with_grad(x, t)
    g.base.flags.writeable = False  # the returned array is a view of the pooled one
    read_only = weakref.ref(g.base)
    del g
    _, g2 = cs.cross_entropy_with_grad(x, t)
    assert g2.base is not read_only() and g2.flags.writeable


def test_the_oldest_array_is_evicted_first(inputs):
    x, t = inputs
    held = [cs.cross_entropy_with_grad(x, t)[1] for _ in range(buffers.KEEP)]
    newest = cs.cross_entropy_with_grad(x, t)[1]
    pool = buffers._pool()
    expected = [g.base for g in held[1:]] + [newest.base]
    assert len(pool) == len(expected) and all(a is b for a, b in zip(pool, expected))


@pytest.mark.parametrize("case", ["elementwise", "k_dim", "float16"])
def test_reused_arrays_give_the_gradient_of_the_new_call(case):
    """Element-wise losses (rows merged into one kernel row), K-d input (the gradient moved back
    to classes on axis 1) and float16 (computed in a float32 scratch): the second call, on the
    first call's dropped array, gives what a call with out= gives."""
    rng = np.random.default_rng(1)
    if case == "elementwise":
        fn = cs.binary_cross_entropy_with_logits_with_grad
        x = rng.normal(size=(N, C)).astype(np.float32)
        t = rng.random((N, C)).astype(np.float32)
    elif case == "k_dim":
        fn = cs.cross_entropy_with_grad
        x = rng.normal(size=(8, 64, 32, 32)).astype(np.float32)  # 2 MiB
        t = rng.integers(0, 64, (8, 32, 32))
    else:
        fn = cs.cross_entropy_with_grad
        x = rng.normal(size=(N, C)).astype(np.float16)
        t = rng.integers(0, C, N)
    fn(x, t)  # its gradient (or float32 scratch) dropped: pooled and idle
    assert len(buffers._pool()) == 1
    first = buffers._pool()[0].ctypes.data
    loss, grad = fn(x * 2, t)
    assert buffers._pool()[0].ctypes.data == first  # the same memory served the second call
    want = np.empty_like(x)
    want_loss, _ = fn(x * 2, t, out=want)
    assert loss == want_loss
    np.testing.assert_array_equal(grad, want)


def test_the_import_probe_finds_that_refcounts_tell_held_from_idle():
    assert buffers.POOLING


def test_a_float32_array_is_not_handed_to_a_float64_call_of_the_same_shape(inputs):
    x, t = inputs
    cs.cross_entropy_with_grad(x, t)
    (pooled,) = buffers._pool()
    f32 = weakref.ref(pooled)
    del pooled
    x64 = x.astype(np.float64)
    _, g64 = cs.cross_entropy_with_grad(x64, t)
    assert g64.base is not f32() and g64.dtype == np.float64
    np.testing.assert_array_equal(g64, _expected(x64, t)[1])


def test_a_reused_array_counts_as_the_newest_for_eviction(inputs):
    x, t = inputs
    held = [cs.cross_entropy_with_grad(x, t)[1] for _ in range(buffers.KEEP)]
    oldest = weakref.ref(held.pop(0).base)
    again = cs.cross_entropy_with_grad(x, t)[1]  # the oldest array, idle: handed out again
    assert again.base is oldest()
    cs.cross_entropy_with_grad(x, t)  # every array held: a new one evicts the least recent
    assert any(a is oldest() for a in buffers._pool())
    assert not any(a is held[0].base for a in buffers._pool())
