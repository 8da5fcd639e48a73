"""Bad input gets a clear error naming the argument; inputs are never modified."""

import numpy as np
import pytest

import cestudy as cs

X = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
Y = np.array([0, 1, 2, 3])


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: cs.cross_entropy(X, Y[:3]), ValueError, "target"),
        (lambda: cs.cross_entropy(X, np.array([0, 1, 2, 5])), ValueError, "target[3] = 5"),
        (lambda: cs.cross_entropy(X, np.array([0, 1, 2, -1])), ValueError, "out of range"),
        (lambda: cs.cross_entropy(X.astype(int), Y), TypeError, "logits"),
        (lambda: cs.cross_entropy(X.astype(complex), Y), TypeError, "complex"),
        (lambda: cs.cross_entropy(X, Y, reduction="avg"), ValueError, "reduction"),
        (lambda: cs.cross_entropy(X, Y, backend="tpu"), ValueError, "backend"),
        (lambda: cs.cross_entropy(X, Y, weight=np.ones(4)), ValueError, "weight"),
        (lambda: cs.cross_entropy(X, Y, weight=-np.ones(5)), ValueError, "non-negative"),
        (lambda: cs.cross_entropy(X, -np.ones((4, 5), np.float32)), ValueError, "non-negative"),
        (lambda: cs.cross_entropy(X, np.ones((4, 4), np.float32)), ValueError, "shape"),
        (lambda: cs.cross_entropy(X, Y, label_smoothing=1.5), ValueError, "label_smoothing"),
        (lambda: cs.cross_entropy(X[None], Y), ValueError, "logits"),
        (lambda: cs.binary_cross_entropy_with_logits(X, X[:2]), ValueError, "target"),
        (
            lambda: cs.binary_cross_entropy_with_logits(X, X, pos_weight=np.ones(3)),
            ValueError,
            "pos_weight",
        ),
        (lambda: cs.binary_cross_entropy(X, X), ValueError, "probs"),
        (lambda: cs.softmax_focal_loss(X, Y, gamma=-1), ValueError, "gamma"),
        (lambda: cs.kl_divergence(X, Y), TypeError, "target"),
        (lambda: cs.entropy(-np.ones(3)), ValueError, "p"),
    ],
)
def test_bad_input_names_the_argument(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    assert words in str(info.value)


def test_cuda_backend_without_gpu_says_what_is_missing():
    from cestudy import backends

    ok, why = backends.cuda_status()
    if ok:
        pytest.skip("a CUDA device or the simulator is available here")
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        cs.cross_entropy(X, Y, backend="cuda")


def test_inputs_are_never_modified_and_odd_layouts_work():
    x = np.asfortranarray(np.random.default_rng(1).normal(size=(6, 9)))
    x_copy = x.copy()
    x.setflags(write=False)
    y = np.arange(6) % 9
    y.setflags(write=False)
    a = cs.cross_entropy_with_grad(x, y, reduction="none")
    b = cs.cross_entropy_with_grad(np.ascontiguousarray(x), y, reduction="none")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(x, x_copy)
    strided = np.random.default_rng(2).normal(size=(6, 18))[:, ::2]
    np.testing.assert_array_equal(
        cs.cross_entropy(strided, y, reduction="none"),
        cs.cross_entropy(strided.copy(), y, reduction="none"),
    )
    # read-only probability targets and element-wise weights, Fortran-ordered logits: the
    # results equal those of contiguous writable copies, and nothing is written
    p = np.full((6, 9), 1 / 9)
    p.setflags(write=False)
    ref = cs.cross_entropy_with_grad(np.ascontiguousarray(x), p.copy(), reduction="none")
    got = cs.cross_entropy_with_grad(x, p, reduction="none")
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_array_equal(p, np.full((6, 9), 1 / 9))
    t = np.zeros_like(x)
    t.setflags(write=False)
    w = np.linspace(0.5, 2, 9)
    w.setflags(write=False)
    got = cs.binary_cross_entropy_with_logits_with_grad(x, t, weight=w, reduction="none")
    ref = cs.binary_cross_entropy_with_logits_with_grad(
        np.ascontiguousarray(x), t.copy(), weight=w.copy(), reduction="none"
    )
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_array_equal(x, x_copy)
    np.testing.assert_array_equal(w, np.linspace(0.5, 2, 9))
    assert got[0].shape == x.shape and np.all(got[0] > 0) and np.all(got[1] * w > 0)
