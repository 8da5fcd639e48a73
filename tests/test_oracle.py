"""The oracle itself, checked against the mpmath references of ``tests/mp_reference.py``.

Every function of ``cestudy.reference.oracle`` is compared, on extreme rows, with a textbook
formula evaluated at as many digits as the row needs (``mp_reference.digits_for``: 400+ where a
loss is below 1e-300). The oracle's results are converted to mpmath exactly.

Its contract, the bar every test here holds it to: an error of at most ``ORACLE_TOL`` = 2^-60
(8.7e-19, under 0.008 ulp of float64) measured as the accuracy contract measures the kernels
(see ``tests/helpers.py``): relative to the exact value for losses, log_softmax, logsumexp,
softmax and hard-target gradients; relative to the row's largest exact entry for soft-target
softmax gradients (probability targets, label smoothing, KL); relative to the larger of the two
terms it subtracts for a soft-target BCE gradient, and to the sum of its terms' magnitudes for a
soft-target sigmoid-focal gradient; for KL, relative to H(p, q) (its terms' scale: KL of nearly
equal distributions cancels). Exact zeros, infinities and NaNs must match exactly. Scales below
``TINY`` = 2^-1100, 40 binades under float64's smallest subnormal, count as TINY: such values
(e^-2e300 is one; longdouble underflows to 0 there) are checked to 2^-1160 absolute.
"""

import mp_reference as ref
import mpmath
import numpy as np
import pytest

from cestudy.reference import oracle

pytestmark = pytest.mark.skipif(
    not oracle.extended_precision_available(), reason="longdouble has < 64 bits on this platform"
)

ORACLE_TOL = 2.0**-60
TINY = mpmath.mpf(2) ** -1100  # scales below this are taken as this: 40 binades under float64
INF = np.inf

ROWS = {
    "zeros": [0.0, 0.0, 0.0],
    "offset_1e8": [1e8, 1e8, 1e8],
    "loss_1e-304": [700.0, 0.0, -5.0],  # -log p_0 = e^-700 + e^-705
    "loss_1e-348": [800.0, 0.0, -3.0],  # below float64's range, in longdouble's
    "subnormal_loss": [745.0, 1.0, 0.0],  # e^-744: a float64 subnormal
    "margin_36": [36.0, 0.0, 1.0, -1.0],
    "small": [1e-3, -2e-3, 5e-4],
    "offset_1e15": [1e15 + 1.0, 1e15, 1e15 - 3.0],
    "offset_1e300": [1e300, 1e300, -1e300],
    "tiny_entries": [-745.0, 0.0, -3e-300, 1e-300],
    "masked": [2.0, -INF, 0.5, -INF],
    "masked_confident": [60.0, -INF, 0.0, -INF, -1.0],
    "random_30": list(np.random.default_rng(0).normal(size=30) * 30),
}
BAD_ROWS = {
    "all_masked": [-INF, -INF, -INF],
    "plus_inf": [INF, 0.0, 1.0],
    "nan": [np.nan, 1.0, 2.0],
    "nan_and_masked": [np.nan, -INF, 2.0],
}
ALL_ROWS = {**ROWS, **BAD_ROWS}
LARGE_C = list(np.random.default_rng(5).normal(size=4096) * 8) + [90.0]  # C = 4097, confident


# --------------------------------------------------------------------------------------------
# measures
# --------------------------------------------------------------------------------------------
def _err(got, exact, scale=None):
    """|got - exact| / scale (scale: |exact|); 0 where both are the same zero, infinity or NaN,
    inf where exactly one of them is non-finite or exact is 0 and got is not."""
    g = ref.from_longdouble(got)
    with mpmath.workdps(30):
        if mpmath.isnan(exact) or mpmath.isnan(g):
            return 0.0 if (mpmath.isnan(exact) and mpmath.isnan(g)) else np.inf
        if mpmath.isinf(exact) or mpmath.isinf(g):
            return 0.0 if g == exact else np.inf
        if g == exact:
            return 0.0
        s = abs(exact) if scale is None else scale
        s = max(s, TINY)
        return float(abs(g - exact) / s)


def check(got, exact, what, scale=None):
    """Assert every element of ``got`` (longdouble) is within ORACLE_TOL of ``exact`` (mpmath)
    relative to ``scale`` (per element, a number for all, or None: the element itself)."""
    got = np.ravel(np.asarray(got))
    exact = exact if isinstance(exact, list) else [exact]
    assert len(got) == len(exact), what
    scales = scale if isinstance(scale, list) else [scale] * len(exact)
    errs = [_err(g, e, s) for g, e, s in zip(got, exact, scales)]
    worst = int(np.argmax(errs))
    assert errs[worst] <= ORACLE_TOL, (
        f"{what}: element {worst}: oracle {got[worst]!r}, mpmath {mpmath.nstr(exact[worst], 25)}"
        f", error {errs[worst]:.3g} > 2^-60"
    )


# --------------------------------------------------------------------------------------------
# log_softmax, logsumexp, softmax
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_ROWS)
def test_log_softmax_logsumexp_softmax(name):
    row = ALL_ROWS[name]
    x = np.array([row])
    check(oracle.log_softmax(x)[0], ref.log_softmax_row(row), f"log_softmax {name}")
    check(oracle.logsumexp(x), ref.logsumexp_row(row), f"logsumexp {name}")
    check(oracle.softmax(x)[0], ref.softmax_row(row), f"softmax {name}")


def test_large_c_row():
    x = np.array([LARGE_C])
    check(oracle.log_softmax(x)[0], ref.log_softmax_row(LARGE_C), "log_softmax")
    check(oracle.logsumexp(x), ref.logsumexp_row(LARGE_C), "logsumexp")
    y = np.array([4096])  # the confident class: loss ~ 1e-36
    check(oracle.cross_entropy(x, y), ref.cross_entropy_row(LARGE_C, 4096), "CE")
    check(oracle.cross_entropy_grad(x, y)[0], ref.cross_entropy_grad_row(LARGE_C, 4096), "grad")
    w = np.random.default_rng(6).uniform(0.1, 3.0, len(LARGE_C))
    g = ref.cross_entropy_grad_row(LARGE_C, 17, weight=w, label_smoothing=0.1)
    scale = ref.soft_grad_scale_row(LARGE_C, ref.smoothed_index_target(len(w), 17, w, 0.1))
    check(
        oracle.cross_entropy_grad(x, np.array([17]), w, label_smoothing=0.1)[0],
        g,
        "smoothed weighted grad",
        scale,
    )


# --------------------------------------------------------------------------------------------
# cross-entropy with class indices: weights, label smoothing, ignore_index
# --------------------------------------------------------------------------------------------
def _targets(row, masked=True):
    """The first, last and argmax classes (without -inf ones unless ``masked``)."""
    xs = np.where(np.isnan(row), -np.inf, row)
    ys = sorted({0, int(np.argmax(xs)), len(row) - 1})
    return [y for y in ys if masked or row[y] != -np.inf]


@pytest.mark.parametrize("name", ALL_ROWS)
@pytest.mark.parametrize(
    "opts",
    [{}, {"weight": "w"}, {"label_smoothing": 0.1}, {"label_smoothing": 0.3, "weight": "w"}],
    ids=["plain", "weight", "smooth", "smooth_weight"],
)
def test_cross_entropy_and_gradient(name, opts):
    row = ALL_ROWS[name]
    c = len(row)
    opts = dict(opts)
    if "weight" in opts:
        opts["weight"] = np.linspace(0.25, 2.0, c)
    x = np.array([row])
    for y in _targets(row):
        t = np.array([y])
        check(
            oracle.cross_entropy(x, t, **opts),
            ref.cross_entropy_row(row, y, **opts),
            f"loss {name} y={y} {opts}",
        )
        exact = ref.cross_entropy_grad_row(row, y, **opts)
        # hard targets: element-wise; smoothed rows cancel (p_j ~ w_j / sum w): relative to the
        # larger term of sum(a) p_j - a_j
        scale = None
        if opts.get("label_smoothing") and not np.isnan(row).any():
            a = ref.smoothed_index_target(c, y, opts.get("weight"), opts["label_smoothing"])
            scale = ref.soft_grad_scale_row(row, a)
        check(oracle.cross_entropy_grad(x, t, **opts)[0], exact, f"grad {name} y={y} {opts}", scale)


def test_ignored_rows_give_zero_loss_and_gradient():
    x = np.array([[1.0, 2.0, 3.0], [700.0, 0.0, -5.0]])
    y = np.array([1, 7])
    loss = oracle.cross_entropy(x, y, ignore_index=7, label_smoothing=0.2)
    assert loss[1] == 0 and loss[0] != 0
    assert np.all(oracle.cross_entropy_grad(x, y, ignore_index=7)[1] == 0)
    assert np.all(oracle.softmax_focal_loss_grad(x, y, ignore_index=7)[1] == 0)


def test_smoothing_with_masked_classes_inf_loss_finite_gradient_nan_with_zero_weight():
    row = [2.0, -INF, 0.5]
    x = np.array([row])
    check(
        oracle.cross_entropy(x, np.array([0]), label_smoothing=0.1),
        ref.cross_entropy_row(row, 0, label_smoothing=0.1),
        "inf loss",
    )
    w = np.array([1.0, 0.0, 2.0])
    assert np.isnan(oracle.cross_entropy(x, np.array([0]), w, label_smoothing=0.1)[0])
    exact = ref.cross_entropy_grad_row(row, 0, weight=w, label_smoothing=0.1)
    scale = ref.soft_grad_scale_row(row, ref.smoothed_index_target(3, 0, w, 0.1))
    check(
        oracle.cross_entropy_grad(x, np.array([0]), w, label_smoothing=0.1)[0],
        exact,
        "grad of a smoothed masked row",
        scale,
    )


# --------------------------------------------------------------------------------------------
# probability targets: cross-entropy, KL, entropy
# --------------------------------------------------------------------------------------------
def _prob_targets(row):
    c = len(row)
    rng = np.random.default_rng(c)
    p = rng.dirichlet(np.full(c, 0.5))
    sparse = np.zeros(c)
    sparse[0], sparse[-1] = 0.75, 0.25
    xs = np.asarray(row, float)
    close = np.asarray(oracle.softmax(xs[None])[0], dtype=np.float64)  # q ~ p: KL cancels
    out = [p, sparse]
    if np.isfinite(close).all():
        out.append(close)
    return out


@pytest.mark.parametrize("name", ALL_ROWS)
def test_probability_targets_cross_entropy_kl_entropy(name):
    row = ALL_ROWS[name]
    c = len(row)
    x = np.array([row])
    w = np.linspace(0.5, 1.5, c)
    bad = name in BAD_ROWS
    for k, p in enumerate(_prob_targets(row)):
        pt = p[None]
        for opts in ({}, {"weight": w, "label_smoothing": 0.2}):
            what = f"{name} target {k} {sorted(opts)}"
            h = ref.cross_entropy_probs_row(row, p, **opts)
            check(oracle.cross_entropy_probs(x, pt, **opts), h, f"CE {what}")
            g = ref.cross_entropy_probs_grad_row(row, p, **opts)
            scale = None if bad else ref.soft_grad_scale_row(row, ref.probs_target(p, **opts))
            check(oracle.cross_entropy_probs_grad(x, pt, **opts)[0], g, f"CE grad {what}", scale)
        h = ref.cross_entropy_probs_row(row, p)
        scale = abs(h) if mpmath.isfinite(h) else None
        check(
            oracle.kl_divergence(x, pt),
            ref.kl_divergence_row(row, p),
            f"KL {name} {k}",
            scale=scale,
        )
        g = ref.kl_divergence_grad_row(row, p)
        scale = None if bad else ref.soft_grad_scale_row(row, ref.probs_target(p))
        check(oracle.kl_divergence_grad(x, pt)[0], g, f"KL grad {name} {k}", scale)
        check(oracle.entropy(pt), ref.entropy_row(p), f"entropy {k}")


# --------------------------------------------------------------------------------------------
# softmax focal loss
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_ROWS)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
def test_softmax_focal_loss_and_gradient(name, gamma):
    row = ALL_ROWS[name]
    x = np.array([row])
    for weight in (None, np.linspace(0.25, 2.0, len(row))):
        for y in _targets(row, masked=False):  # a masked target's loss is inf
            t = np.array([y])
            what = f"{name} y={y} gamma={gamma} weight={weight is not None}"
            check(
                oracle.softmax_focal_loss(x, t, gamma, weight),
                ref.softmax_focal_loss_row(row, y, gamma, weight),
                f"loss {what}",
            )
            check(
                oracle.softmax_focal_loss_grad(x, t, gamma, weight)[0],
                ref.softmax_focal_loss_grad_row(row, y, gamma, weight),
                f"grad {what}",
            )


# --------------------------------------------------------------------------------------------
# element-wise sigmoid losses
# --------------------------------------------------------------------------------------------
LOGITS = [
    0.0,
    1e-8,
    -1e-300,
    0.5,
    -3.0,
    18.0,
    -18.0,
    40.0,
    -40.0,
    120.0,
    -120.0,
    700.0,
    -700.0,
    745.0,
    800.0,
    -800.0,
    np.nan,
]
TARGETS = [0.0, 1.0, 0.3, 0.999]


@pytest.mark.parametrize("weight,pos_weight", [(1.0, 1.0), (0.25, 1.0), (1.0, 3.0), (2.5, 0.5)])
def test_binary_cross_entropy_with_logits_and_gradient(weight, pos_weight):
    for x in LOGITS:
        for t in TARGETS:
            args = (np.array([x]), np.array([t]), np.array([weight]), np.array([pos_weight]))
            what = f"x={x} t={t} w={weight} pw={pos_weight}"
            check(
                oracle.binary_cross_entropy_with_logits(*args),
                ref.binary_cross_entropy_with_logits(x, t, weight, pos_weight),
                f"loss {what}",
            )
            hard = t in (0.0, 1.0)
            scale = (
                None
                if hard or np.isnan(x)
                else ref.binary_cross_entropy_with_logits_grad_scale(x, t, weight, pos_weight)
            )
            check(
                oracle.binary_cross_entropy_with_logits_grad(*args),
                ref.binary_cross_entropy_with_logits_grad(x, t, weight, pos_weight),
                f"grad {what}",
                scale,
            )


@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_binary_cross_entropy_on_probabilities(weight):
    probs = [0.0, 1e-300, 1e-44, 1e-10, 0.25, 0.5, 1 - 2.0**-53, 1 - 1e-10, 1.0]
    for p in probs:
        for t in TARGETS:
            check(
                oracle.binary_cross_entropy(np.array([p]), np.array([t]), np.array([weight])),
                ref.binary_cross_entropy(p, t, weight),
                f"p={p} t={t} w={weight}",
            )


@pytest.mark.parametrize("alpha", [0.25, 0.9, 0.0, -1.0])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
def test_sigmoid_focal_loss_and_gradient(alpha, gamma):
    for x in LOGITS:
        if abs(x) > 700:
            continue  # b^gamma underflows longdouble's range only beyond what float64 can hold
        for t in TARGETS:
            xa, ta = np.array([x]), np.array([t])
            what = f"x={x} t={t} alpha={alpha} gamma={gamma}"
            check(
                oracle.sigmoid_focal_loss(xa, ta, alpha, gamma),
                ref.sigmoid_focal_loss(x, t, alpha, gamma),
                f"loss {what}",
            )
            hard = t in (0.0, 1.0)
            scale = (
                None
                if hard or np.isnan(x)
                else ref.sigmoid_focal_loss_grad_scale(x, t, alpha, gamma)
            )
            check(
                oracle.sigmoid_focal_loss_grad(xa, ta, alpha, gamma),
                ref.sigmoid_focal_loss_grad(x, t, alpha, gamma),
                f"grad {what}",
                scale,
            )


# --------------------------------------------------------------------------------------------
# the references themselves: converged, and their gradients the derivatives of their losses
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "loss_1e-304",
        "loss_1e-348",
        "offset_1e300",
        "offset_1e15",
        "tiny_entries",
        "masked_confident",
    ],
)
def test_mp_reference_has_converged(name):
    """digits_for(row) digits agree with 60 more to 2^-100: the reference is not itself
    cancelled away (at 60 digits, -log p_0 of [700, 0, -5] comes out exactly 0)."""
    row = ROWS[name]
    d = ref.digits_for(row)
    assert name != "loss_1e-304" or d >= 340
    k = int(np.argmax(row))
    pairs = [
        (ref.cross_entropy_row(row, k, dps=d), ref.cross_entropy_row(row, k, dps=d + 60)),
        (
            ref.softmax_focal_loss_row(row, k, 2.0, dps=d),
            ref.softmax_focal_loss_row(row, k, 2.0, dps=d + 60),
        ),
        (
            ref.cross_entropy_grad_row(row, k, dps=d)[k],
            ref.cross_entropy_grad_row(row, k, dps=d + 60)[k],
        ),
    ]
    for a, b in pairs:
        assert b != 0 and abs(a - b) <= abs(b) * mpmath.mpf(2) ** -100
    with mpmath.workdps(60):
        assert mpmath.mpf(ref.cross_entropy_row([700.0, 0.0, -5.0], 0, dps=60)) == 0


def test_mp_reference_gradients_are_derivatives_of_its_losses():
    row = [0.7, -1.2, 2.5, 0.1]
    w = [0.5, 1.0, 2.0, 1.5]
    p = [0.1, 0.2, 0.3, 0.4]
    cases = [
        (
            lambda r: ref.cross_entropy_row(r, 2, w, label_smoothing=0.2, dps=200),
            ref.cross_entropy_grad_row(row, 2, w, label_smoothing=0.2, dps=200),
        ),
        (
            lambda r: ref.cross_entropy_probs_row(r, p, w, 0.1, dps=200),
            ref.cross_entropy_probs_grad_row(row, p, w, 0.1, dps=200),
        ),
        (lambda r: ref.kl_divergence_row(r, p, dps=200), ref.kl_divergence_grad_row(row, p, 200)),
        (
            lambda r: ref.softmax_focal_loss_row(r, 1, 0.5, w, dps=200),
            ref.softmax_focal_loss_grad_row(row, 1, 0.5, w, dps=200),
        ),
        (
            lambda r: ref.softmax_focal_loss_row(r, 2, 2.0, dps=200),
            ref.softmax_focal_loss_grad_row(row, 2, 2.0, dps=200),
        ),
    ]
    with mpmath.workdps(50):
        for f, g in cases:
            for j in range(len(row)):
                d = mpmath.diff(
                    lambda h, j=j: f(
                        [v + h if i == j else mpmath.mpf(v) for i, v in enumerate(row)]
                    ),
                    0,
                )
                assert abs(d - g[j]) < mpmath.mpf(10) ** -30, (j, d, g[j])
        for x, t in [(0.3, 0.2), (-2.0, 1.0), (4.0, 0.0)]:
            for alpha, gamma in [(0.25, 2.0), (-1.0, 0.5), (0.9, 1.0)]:
                d = mpmath.diff(lambda v: ref.sigmoid_focal_loss(v, t, alpha, gamma, dps=200), x)
                assert abs(d - ref.sigmoid_focal_loss_grad(x, t, alpha, gamma)) < 1e-30
            d = mpmath.diff(lambda v: ref.binary_cross_entropy_with_logits(v, t, 0.5, 3.0, 200), x)
            assert abs(d - ref.binary_cross_entropy_with_logits_grad(x, t, 0.5, 3.0)) < 1e-30


# --------------------------------------------------------------------------------------------
# lookup by variant name, and the ulp metric
# --------------------------------------------------------------------------------------------
def test_lookup_by_variant_name_is_the_named_function():
    x = np.array([ROWS["random_30"][:6], ROWS["margin_36"] + [0.0, 1.0]])
    y = np.array([1, 0])
    p = np.full((2, 6), 1 / 6)
    np.testing.assert_array_equal(
        oracle.loss("cross_entropy", x, y, label_smoothing=0.1),
        oracle.cross_entropy(x, y, label_smoothing=0.1),
    )
    np.testing.assert_array_equal(
        oracle.grad("cross_entropy_probs", x, p), oracle.cross_entropy_probs_grad(x, p)
    )
    np.testing.assert_array_equal(
        oracle.loss("softmax_focal_loss", x, y, gamma=3.0), oracle.softmax_focal_loss(x, y, 3.0)
    )
    np.testing.assert_array_equal(
        oracle.grad("sigmoid_focal_loss", x, p, alpha=0.6),
        oracle.sigmoid_focal_loss_grad(x, p, 0.6),
    )


def test_ulp_error_metric():
    one = np.float32(1.0)
    assert oracle.ulp_error(np.nextafter(one, np.float32(2)), 1.0, np.float32)[()] == 1.0
    assert oracle.ulp_error(np.float32(1.0), 1.0 + 2.0**-25, np.float32) == pytest.approx(0.25)
    assert oracle.ulp_error(np.nan, np.nan, np.float32) == 0
    assert oracle.ulp_error(np.inf, np.inf, np.float32) == 0
    assert np.isinf(oracle.ulp_error(np.nan, 1.0, np.float32))
    assert np.isinf(oracle.ulp_error(np.inf, 1.0, np.float32))
    assert np.isinf(oracle.ulp_error(1.0, np.inf, np.float32))
    assert np.isinf(oracle.ulp_error(-np.inf, np.inf, np.float32))
    # subnormal spacing: float32's smallest subnormal is 2^-149
    assert oracle.ulp_error(0.0, 2.0**-149, np.float32) == 1.0
    assert oracle.ulp(1.0, np.float16) == 2.0**-10
    assert oracle.ulp(1.0, __import__("ml_dtypes").bfloat16) == 2.0**-7
    assert oracle.ulp(np.longdouble(2.0) ** 200, np.float32) == 2.0**104  # top binade
    # grad_ulp_error: the smaller of element-relative and row-max-relative
    exact = np.array([[1.0, 2.0**-30]])
    got = exact + np.array([[0.0, 2.0**-52]])
    assert oracle.ulp_error(got, exact, np.float64)[0, 1] == 2.0**30
    assert oracle.grad_ulp_error(got, exact, np.float64)[0, 1] == 1.0
