"""The other frameworks as peers: JAX/optax, TensorFlow/Keras and scikit-learn.

Two kinds of evidence. On benign inputs (logits of a few units, targets well inside (0, 1)) every
peer of every variant agrees with cestudy's kernels, loss and gradient, to a loose relative
tolerance per dtype: a wrong convention (smoothing, weights, ignored rows, reduction) shows up as
an O(1) relative gap, rounding does not. On the inputs where a peer's formula is documented to
fail (``cestudy/reference/peers.py``), it fails exactly as documented: these are the failures the
studies measure, pinned here so that a change of library version that fixes or moves them is
seen. Every test that needs a peer is skipped, with the reason and the install command, where
the peer is not installed (``pip install 'cestudy[peers]'``).
"""

import math

import numpy as np
import pytest

import cestudy as cs
from cestudy import dtypes, variants
from cestudy.backends import Skip
from cestudy.reference import implementations, peers

NEW_PEERS = ("jax", "tensorflow", "sklearn")
PAIRS = [
    (peer, v.name) for v in variants.VARIANTS.values() for peer in v.peers if peer in NEW_PEERS
]
# loose relative tolerances on benign inputs (several ulp of each dtype, and more for the
# low precisions, where peers and cestudy round intermediate results differently)
RTOL = {"float64": 1e-9, "float32": 2e-5, "float16": 1e-2, "bfloat16": 5e-2}
# sklearn's log_loss works in float64/float32/float16 only (bfloat16 goes to float64)
DTYPES = {"jax": tuple(RTOL), "tensorflow": tuple(RTOL), "sklearn": tuple(RTOL)}


def need(peer):
    ok, why = peers.available(peer)
    if not ok:
        pytest.skip(f"peer {peer!r} is not installed: {why}")


def _inputs(v, dtype, n=6, c=5, seed=0):
    """(what the implementation takes, target) for variant ``v``: benign values."""
    rng = np.random.default_rng(seed)
    dt = dtypes.dtype_from_name(dtype)
    x = (rng.standard_normal((n, c)) * 2).astype(dt)
    if v.target == "index":
        t = rng.integers(0, c, n)
    elif v.target == "probs":
        e = np.exp(rng.standard_normal((n, c)))
        t = (e / e.sum(axis=1, keepdims=True)).astype(dt)
    else:
        t = (rng.random((n, c)) < 0.5).astype(dt)
    if v.input == "probs":
        x = (1 / (1 + np.exp(-x.astype(np.float64)))).astype(dt)
    return x, t


def _close(got, ref, rtol, what):
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    assert np.isfinite(got).all(), f"{what}: non-finite at {np.argwhere(~np.isfinite(got))[:5]}"
    # per-sample losses relative to themselves; (N, C) arrays relative to each row's largest
    # element, so that gradient entries that cancel are not held to their own size
    scale = np.max(np.abs(ref), axis=-1, keepdims=True) if ref.ndim == 2 else np.abs(ref)
    gap = np.abs(got - ref) / np.maximum(scale, np.finfo(np.float64).tiny)
    bad = gap > rtol
    assert not bad.any(), (
        f"{what}: relative gap {gap.max():.3g} > {rtol} at {np.argwhere(bad)[:5].tolist()}"
    )


def _compare(peer, name, dtype, **options):
    v = variants.get(name)
    x, t = _inputs(v, dtype)
    loss, grad = implementations.get(name, peer).fn(x, t, **options)
    ours, our_grad = implementations.get(name, "numba").fn(x, t, **options)
    assert loss.dtype == x.dtype, f"{peer} {name}: loss dtype {loss.dtype}, input {x.dtype}"
    _close(loss, ours, RTOL[dtype], f"{peer} {name} {dtype} loss")
    if peer == "sklearn" or not v.has_grad:
        assert grad is None
        return
    assert grad.dtype == x.dtype and grad.shape == x.shape
    _close(grad, our_grad, RTOL[dtype], f"{peer} {name} {dtype} gradient")


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------
def test_every_registered_peer_has_its_function():
    for v in variants.VARIANTS.values():
        for peer in v.peers:
            assert peer in peers.PACKAGES and peer in peers.DESCRIPTIONS
            assert callable(getattr(peers, f"{peer}_{v.name}")), (peer, v.name)
    assert set(NEW_PEERS) <= set(implementations.IMPLEMENTATION_NAMES)


def test_which_variants_each_peer_has():
    has = {p: {name for q, name in PAIRS if q == p} for p in NEW_PEERS}
    assert has["jax"] == {
        "cross_entropy",
        "cross_entropy_probs",
        "kl_divergence",
        "softmax_focal_loss",
        "binary_cross_entropy_with_logits",
        "sigmoid_focal_loss",
    }
    assert has["tensorflow"] == has["jax"] | {"binary_cross_entropy"}
    assert has["sklearn"] == {"cross_entropy", "binary_cross_entropy"}


def test_unavailable_peer_is_a_skip_with_the_install_command(monkeypatch):
    real = peers.importlib.util.find_spec
    monkeypatch.setattr(
        peers.importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("jax", "optax") else real(name, *a),
    )
    ok, why = peers.available("jax")
    assert not ok and why == "jax is not installed (pip install 'cestudy[peers]')"
    from cestudy.study import compute
    from cestudy.study.kinds import accuracy

    cell = {k: key.default for k, key in accuracy.KEYS.items()}
    cell.update(kind="accuracy", variant="cross_entropy", implementation="jax")
    with pytest.raises(Skip, match="jax is not installed"):
        compute.compute_cell(accuracy.normalise(cell))


def test_limitations_are_stated_without_computing():
    w = np.ones(3)
    assert peers.limitation("jax", "cross_entropy") == ""
    assert peers.limitation("jax", "cross_entropy", label_smoothing=0.1) == ""
    assert "optax has no class" in peers.limitation("jax", "cross_entropy", weight=w)
    assert "optax has no pos_weight" in peers.limitation(
        "jax", "binary_cross_entropy_with_logits", pos_weight=w
    )
    assert peers.limitation("jax", "softmax_focal_loss", weight=w) == ""
    assert peers.limitation("tensorflow", "softmax_focal_loss", weight=w) == ""
    assert peers.limitation("tensorflow", "binary_cross_entropy_with_logits", pos_weight=w) == ""
    assert "no class or element weights" in peers.limitation(
        "tensorflow", "cross_entropy", weight=w
    )
    assert "no label smoothing" in peers.limitation("sklearn", "cross_entropy", label_smoothing=0.1)
    assert issubclass(peers.Unsupported, Skip) and issubclass(
        peers.Unsupported, NotImplementedError
    )


# --------------------------------------------------------------------------------------------
# Benign inputs: every peer of every variant agrees with cestudy
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("peer,name", PAIRS)
@pytest.mark.parametrize("dtype", tuple(RTOL))
def test_peer_agrees_with_cestudy_on_benign_inputs(peer, name, dtype):
    need(peer)
    _compare(peer, name, dtype)


@pytest.mark.parametrize("peer", ["jax", "tensorflow"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    "name,options",
    [
        ("cross_entropy", {"label_smoothing": 0.1}),
        ("cross_entropy_probs", {"label_smoothing": 0.2}),
        ("softmax_focal_loss", {"gamma": 1.5, "weight": np.array([0.5, 1.0, 2.0, 1.5, 0.25])}),
        ("sigmoid_focal_loss", {"alpha": -1.0, "gamma": 1.0}),
        ("sigmoid_focal_loss", {"alpha": 0.75, "gamma": 3.0}),
    ],
)
def test_peer_options_agree_with_cestudy(peer, dtype, name, options):
    need(peer)
    _compare(peer, name, dtype, **options)


@pytest.mark.parametrize("peer", ["jax", "tensorflow"])
@pytest.mark.parametrize("name", ["cross_entropy", "softmax_focal_loss"])
def test_ignored_rows_give_zero_loss_and_gradient(peer, name):
    need(peer)
    x, t = _inputs(variants.get(name), "float64")
    t[[1, 4]] = -100
    loss, grad = implementations.get(name, peer).fn(x, t, ignore_index=-100)
    ours, our_grad = implementations.get(name, "numba").fn(x, t, ignore_index=-100)
    assert (loss[[1, 4]] == 0).all() and (grad[[1, 4]] == 0).all()
    _close(loss, ours, RTOL["float64"], "loss")
    _close(grad, our_grad, RTOL["float64"], "gradient")


def test_tensorflow_pos_weight_is_torchs():
    need("tensorflow")
    name = "binary_cross_entropy_with_logits"
    for dtype in ("float64", "float32"):
        _compare("tensorflow", name, dtype, pos_weight=np.array([3.0, 1.0, 0.5, 2.0, 1.0]))


@pytest.mark.parametrize(
    "peer,name,options",
    [
        ("jax", "cross_entropy", {"weight": np.ones(5)}),
        ("jax", "cross_entropy_probs", {"weight": np.ones(5)}),
        ("jax", "binary_cross_entropy_with_logits", {"pos_weight": np.ones(5)}),
        ("tensorflow", "cross_entropy", {"weight": np.ones(5)}),
        ("tensorflow", "binary_cross_entropy", {"weight": np.ones((6, 5))}),
        ("sklearn", "cross_entropy", {"label_smoothing": 0.1}),
    ],
)
def test_options_a_library_lacks_raise_unsupported(peer, name, options):
    need(peer)
    x, t = _inputs(variants.get(name), "float32")
    with pytest.raises(peers.Unsupported) as info:
        implementations.get(name, peer).fn(x, t, **options)
    assert str(info.value) == peers.limitation(peer, name, **options)


def test_data_dependent_limitations():
    need("tensorflow")
    v = variants.get("cross_entropy")
    x, t = _inputs(v, "float32")
    t[0] = -100
    with pytest.raises(peers.Unsupported, match="label smoothing and ignored rows"):
        peers.tensorflow_cross_entropy(x, t, label_smoothing=0.1)
    need("sklearn")
    with pytest.raises(peers.Unsupported, match="no ignored rows"):
        peers.sklearn_cross_entropy(x, t)
    p = np.full((2, 3), 0.5, np.float32)
    with pytest.raises(peers.Unsupported, match="not soft targets"):
        peers.sklearn_binary_cross_entropy(p, np.full((2, 3), 0.3, np.float32))


def test_a_weighted_cell_is_not_in_the_grid_and_computing_it_says_why():
    """optax has no class weights: such a cell is left out of a study's grid (a permanent
    limitation, not something to retry), and computing it anyway raises Skip with the reason."""
    need("jax")
    from cestudy.study import compute
    from cestudy.study.kinds import accuracy

    cell = {k: key.default for k, key in accuracy.KEYS.items()}
    cell.update(
        kind="accuracy",
        variant="cross_entropy",
        implementation="jax",
        class_weight="inverse",
        imbalance=10.0,
    )
    assert accuracy.normalise(dict(cell)) is None
    with pytest.raises(Skip, match="optax has no class"):
        compute.compute_cell(cell)
    cell.update(class_weight="none")
    out = compute.compute_cell(accuracy.normalise(cell))
    assert out["fwd_max_ulp"] < 16 and out["grad_max_ulp"] < 16


# --------------------------------------------------------------------------------------------
# The documented failure modes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("peer", ["jax", "tensorflow"])
def test_lse_form_returns_zero_for_a_confident_float32_row(peer):
    """-log p_y of a row with margin 40 is 9 e^-40 = 3.8e-17; lse - x_y rounds it to 0, and
    the true-class gradient p_y - 1 = -3.8e-17 to 0 with it."""
    need(peer)
    x = np.zeros((1, 10), np.float32)
    x[0, 0] = 40
    y = np.array([0])
    loss, grad = getattr(peers, f"{peer}_cross_entropy")(x, y)
    ours, our_grad = cs.cross_entropy_with_grad(x, y, reduction="none")
    exact = 9 * math.exp(-40)
    assert loss[0] == 0 and grad[0, 0] == 0
    assert ours[0] == pytest.approx(exact, rel=1e-6)
    assert our_grad[0, 0] == pytest.approx(-exact, rel=1e-6)


def test_optax_loses_equal_logits_at_a_large_offset_where_tensorflow_does_not():
    """Equal logits at 1e8 (true loss log 3): optax's logsumexp(x) - x_y rounds 1e8 + log 3 to
    1e8 and returns 0; TensorFlow's kernel subtracts the maximum first and keeps log 3."""
    x = np.full((1, 3), 1e8, np.float32)
    y = np.array([0])
    need("jax")
    assert peers.jax_cross_entropy(x, y)[0][0] == 0
    need("tensorflow")
    assert peers.tensorflow_cross_entropy(x, y)[0][0] == pytest.approx(math.log(3), rel=1e-6)


def test_jax_float64_cells_compute_in_float64():
    """x64 is switched on: the loss of margin 20, log1p(e^-20) = 2.06e-9, survives lse - x_y in
    float64 (it is below float32's resolution at 20)."""
    need("jax")
    x = np.array([[20.0, 0.0]])
    loss, grad = peers.jax_cross_entropy(x, np.array([0]))
    assert loss.dtype == np.float64 and grad.dtype == np.float64
    assert loss[0] == pytest.approx(math.log1p(math.exp(-20)), rel=1e-5)


def test_keras_binary_cross_entropy_clips_probabilities_at_1e_7():
    need("tensorflow")
    p = np.array([[0.0, 1.0, 1.0]], np.float32)
    t = np.array([[1.0, 0.0, 1.0]], np.float32)
    loss, grad = peers.tensorflow_binary_cross_entropy(p, t)
    assert grad is None
    assert loss[0, 0] == pytest.approx(-math.log(np.float32(1e-7)), rel=1e-6)  # 16.12
    assert loss[0, 1] == pytest.approx(-math.log(2.0**-23), rel=1e-6)  # 15.94
    assert loss[0, 2] == pytest.approx(-math.log1p(-1e-7), rel=0.3)  # ~1e-7
    # in float16, 1 - 1e-7 rounds to 1: the right answer p = 1, t = 1 gives 0 * log(0) = NaN
    loss16, _ = peers.tensorflow_binary_cross_entropy(p.astype(np.float16), t.astype(np.float16))
    assert np.isnan(loss16[0, 2])


@pytest.mark.parametrize(
    "dtype,cap",
    [
        ("float64", -math.log(2.0**-52)),
        ("float32", -math.log(2.0**-23)),
        ("float16", -math.log(2.0**-10)),
    ],
)
def test_sklearn_log_loss_clips_at_the_dtype_eps(dtype, cap):
    need("sklearn")
    from sklearn.metrics import log_loss

    dt = dtypes.dtype_from_name(dtype)
    p = np.array([[1.0, 0.0, 0.25, 0.75]], dt)
    t = np.array([[0.0, 1.0, 1.0, 0.0]], dt)
    loss, grad = peers.sklearn_binary_cross_entropy(p, t)
    assert grad is None and loss.dtype == dt
    assert loss[0, 0] == pytest.approx(cap, rel=1e-3) and loss[0, 1] == pytest.approx(cap, rel=1e-3)
    # the per-sample terms are log_loss's own, before it averages them
    whole = log_loss(t.ravel(), p.ravel(), labels=[0, 1], normalize=False)
    assert float(np.sum(loss.astype(np.float64))) == pytest.approx(whole, rel=1e-3)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.filterwarnings("ignore:The y_prob values do not sum to one")
def test_sklearn_cross_entropy_is_log_loss_of_predict_proba(dtype):
    need("sklearn")
    from sklearn.metrics import log_loss
    from sklearn.utils.extmath import softmax

    x, y = _inputs(variants.get("cross_entropy"), dtype, n=40, c=4)
    x[0] = np.array([60, 0, 0, 0], np.float32).astype(x.dtype)  # a confident row: clipped
    y[0] = 0
    loss, _ = peers.sklearn_cross_entropy(x, y)
    whole = log_loss(y, softmax(x.copy()), labels=range(4), normalize=False)
    assert float(np.sum(loss.astype(np.float64))) == pytest.approx(whole, rel=RTOL[dtype])
    eps = np.finfo(peers._log_loss_dtype(x.dtype)).eps
    assert float(loss[0]) == pytest.approx(-math.log1p(-eps), rel=RTOL[dtype])


def test_keras_kl_divergence_clips_both_distributions():
    """p = (1, 0), q = (1/2, 1/2): KL = log 2; Keras clips p's 0 to 1e-7 and adds
    1e-7 log(1e-7 / 0.5)."""
    need("tensorflow")
    loss, _ = peers.tensorflow_kl_divergence(np.zeros((1, 2)), np.array([[1.0, 0.0]]))
    assert loss[0] == pytest.approx(math.log(2) + 1e-7 * math.log(1e-7 / 0.5), rel=1e-12)
    assert loss[0] != pytest.approx(math.log(2), rel=1e-9)


def test_keras_softmax_focal_loss_has_a_floor_from_its_clip():
    """A confident row (margin 40): the exact focal loss is about 6e-52; Keras clips p_y to
    1 - 1e-7 and returns (1e-7)^2 * -log(1 - 1e-7) = 1e-21."""
    need("tensorflow")
    x = np.array([[40.0, 0.0, 0.0]])
    loss, _ = peers.tensorflow_softmax_focal_loss(x, np.array([0]))
    ours = cs.softmax_focal_loss(x, np.array([0]), reduction="none")
    assert loss[0] == pytest.approx(1e-14 * -math.log1p(-1e-7), rel=1e-6)
    assert ours[0] < 1e-50


@pytest.mark.parametrize("peer", ["jax", "tensorflow"])
def test_sigmoid_focal_loss_at_extreme_logits_is_finite_and_torchvisions(peer):
    """optax >= 0.2.5 computes (1 - p_t)^gamma in log space (optax#1267 gave NaN gradients);
    Keras recovers the logits for its BCE. Both match torchvision's values at |x| = 40, 100."""
    need(peer)
    x = np.array([[100.0, -100.0, -40.0, 40.0]], np.float32)
    t = np.array([[0.0, 1.0, 1.0, 1.0]], np.float32)
    loss, grad = getattr(peers, f"{peer}_sigmoid_focal_loss")(x, t)
    ours, our_grad = cs.sigmoid_focal_loss_with_grad(x, t, reduction="none")
    assert np.isfinite(loss).all() and np.isfinite(grad).all()
    np.testing.assert_allclose(loss[0, :3], ours[0, :3], rtol=1e-6)
    np.testing.assert_allclose(grad[0, :3], our_grad[0, :3], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Timing callables and the reports' colours
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("peer,name", [(p, v) for p, vs in peers.TIMED.items() for v in vs])
@pytest.mark.parametrize("mode", ["forward", "forward_grad"])
def test_timed_callable_computes_the_mean_loss_and_its_gradient(peer, name, mode):
    need(peer)
    x, t = _inputs(variants.get(name), "float32", n=16, c=7)
    if peer == "sklearn" and mode == "forward_grad":
        with pytest.raises(KeyError, match="no gradient"):
            peers.timed_callable(name, peer, mode, x, t)
        return
    f = peers.timed_callable(name, peer, mode, x, t)
    loss, grad = f()
    assert f()[0] == loss  # a second call (compiled) gives the same
    ours, our_grad = implementations.get(name, "numba").fn(x, t)
    count = ours.size
    assert loss == pytest.approx(float(np.sum(ours.astype(np.float64))) / count, rel=1e-5)
    if mode == "forward":
        assert grad is None
    else:
        _close(grad, our_grad / count, 1e-5, f"{peer} {name} timed gradient")


def test_timed_callable_refuses_what_it_does_not_time():
    x, t = _inputs(variants.get("kl_divergence"), "float32")
    with pytest.raises(KeyError, match="not timed"):
        peers.timed_callable("kl_divergence", "sklearn", "forward", x, t)


def test_every_implementation_has_a_fixed_colour_and_place():
    from cestudy.report import figures

    for name in implementations.IMPLEMENTATION_NAMES:
        assert name in figures.COLOURS and name in figures.IMPL_ORDER, name
    assert len(set(figures.COLOURS.values())) == len(figures.COLOURS)
