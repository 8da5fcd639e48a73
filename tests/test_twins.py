"""Each public loss and its fused ``_with_grad`` twin: the twin takes the loss's parameters (plus
``out`` for the losses on logits), shows them to ``inspect.signature``, checks a call as a ``def``
with that signature would, and computes the loss that the loss function computes."""

import inspect
import typing
import warnings

import numpy as np
import pytest

import cestudy as cs

TWINS = [name for name in cs.__all__ if name.endswith("_with_grad")]


def test_every_twin_has_its_loss():
    assert len(TWINS) == 8
    for twin in TWINS:
        assert twin.removesuffix("_with_grad") in cs.__all__


@pytest.mark.parametrize("twin", TWINS)
def test_signature_is_the_loss_signature_with_out(twin):
    loss_fn, twin_fn = getattr(cs, twin.removesuffix("_with_grad")), getattr(cs, twin)
    loss_params = list(inspect.signature(loss_fn).parameters.values())
    twin_sig = inspect.signature(twin_fn)
    params = list(twin_sig.parameters.values())
    if twin == "linear_cross_entropy_with_grad":  # three or four arrays back, no out buffer
        assert params == loss_params
        assert twin_sig.return_annotation == "tuple"
    else:
        out = inspect.Parameter(
            "out", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="Optional[np.ndarray]"
        )
        assert params == [*loss_params, out]
        assert twin_sig.return_annotation == "tuple[Loss, np.ndarray]"
    assert twin_fn.__name__ == twin_fn.__qualname__ == twin
    assert twin_fn.__module__ == loss_fn.__module__
    assert f":func:`{loss_fn.__name__}`" in twin_fn.__doc__
    hints = typing.get_type_hints(twin_fn)
    assert set(hints) == {p.name for p in params} | {"return"}


X = np.random.default_rng(0).normal(size=(3, 4))
Y = np.array([0, 3, 1])
P = np.full((3, 4), 0.25)

CALLS = {
    "cross_entropy": ((X, Y), {"weight": np.arange(1.0, 5.0), "label_smoothing": 0.1}),
    "binary_cross_entropy_with_logits": ((X, P), {"pos_weight": np.full(4, 2.0)}),
    "kl_divergence": ((X, P), {}),
    "softmax_focal_loss": ((X, Y), {"gamma": 1.5, "ignore_index": 3}),
    "sigmoid_focal_loss": ((X, P), {"alpha": 0.4, "reduction": "sum"}),
    "nll_loss": ((X, Y), {"reduction": "sum"}),
    "kl_div": ((X, P), {"reduction": "batchmean", "log_target": True}),
    "linear_cross_entropy": ((X, np.ones((5, 4)), Y), {"chunk_size": 2}),
}


@pytest.mark.parametrize("loss", sorted(CALLS))
def test_twin_loss_is_the_loss(loss):
    args, kwargs = CALLS[loss]
    expected = getattr(cs, loss)(*args, **kwargs)
    got = getattr(cs, loss + "_with_grad")(*args, **kwargs)[0]
    np.testing.assert_array_equal(got, expected)
    names = list(inspect.signature(getattr(cs, loss)).parameters)[: len(args)]
    by_name = getattr(cs, loss + "_with_grad")(**dict(zip(names, args)), **kwargs)[0]
    np.testing.assert_array_equal(by_name, expected)


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize(
    "call,words",
    [
        (lambda f, args: f(*args[:-1]), "missing"),
        (lambda f, args: f(*args, X, X, X), "too many positional"),
        (
            lambda f, args: f(*args, no_such_option=1),
            "unexpected keyword argument 'no_such_option'",
        ),
        (lambda f, args: f(*args, target=args[-1]), "multiple values for argument 'target'"),
    ],
)
def test_twin_rejects_a_bad_call_as_a_def_would(twin, call, words):
    args = CALLS[twin.removesuffix("_with_grad")][0]
    with pytest.raises(TypeError, match=f"^{twin}\\(\\) .*{words}"):
        call(getattr(cs, twin), args)


def test_kl_div_warning_points_at_the_caller():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cs.kl_div(X, P)
        cs.kl_div_with_grad(X, P)
    assert [w.filename for w in caught] == [__file__, __file__]
