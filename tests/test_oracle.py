"""The oracle itself, validated against mpmath at 60 digits, extreme cases included."""
import mpmath
import numpy as np
import pytest

from cestudy.reference import oracle

pytestmark = pytest.mark.skipif(not oracle.extended_precision_available(),
                                reason="longdouble has < 64 bits on this platform")

ROWS = [
    [0.0, 0.0, 0.0],
    [1e8, 1e8, 1e8],
    [700.0, 0.0, -5.0],
    [36.0, 0.0, 1.0, -1.0],
    [1e-3, -2e-3, 5e-4],
    [1e15 + 1.0, 1e15, 1e15 - 3.0],
    [-745.0, 0.0, -3e-300, 1e-300],
    list(np.random.default_rng(0).normal(size=50) * 30),
]


def _rel(a, b):
    a, b = mpmath.mpf(a), mpmath.mpf(b)
    return abs(a - b) / abs(b) if b != 0 else abs(a)


@pytest.mark.parametrize("row", ROWS)
def test_log_softmax_and_cross_entropy_against_mpmath(row):
    x = np.array([row])
    ref = oracle.mp_log_softmax_row(row)
    ours_nlp = -oracle.log_softmax(x)[0]
    with mpmath.workdps(60):
        for j, r in enumerate(ref):
            # 2^-60 relative: well under 0.01 ulp of float64 (2^-53 / 100 = 2^-59.6)
            assert _rel(mpmath.mpf(str(ours_nlp[j])), r) < 2.0 ** -60 or abs(r) < 1e-300
        for y in range(len(row)):
            got = oracle.cross_entropy(x, np.array([y]))[0]
            assert _rel(mpmath.mpf(str(got)), ref[y]) < 2.0 ** -60


@pytest.mark.parametrize("row", ROWS)
def test_softmax_and_gradient_against_mpmath(row):
    x = np.array([row])
    ref = oracle.mp_softmax_row(row)
    sm = oracle.softmax(x)[0]
    k = int(np.argmax(row))
    g = oracle.cross_entropy_grad(x, np.array([k]))[0]
    with mpmath.workdps(60):
        for j, r in enumerate(ref):
            if r > mpmath.mpf("1e-4000"):
                assert _rel(mpmath.mpf(str(sm[j])), r) < 2.0 ** -60
        # the true-class gradient p_k - 1, computed in mpmath at 60 digits
        assert _rel(mpmath.mpf(str(g[k])), ref[k] - 1) < 2.0 ** -60


@pytest.mark.parametrize("x,t", [(18.0, 1.0), (-18.0, 1.0), (700.0, 0.0), (-40.0, 0.0),
                                 (0.5, 0.3), (1e-8, 1.0), (36.7, 0.999)])
def test_bce_with_logits_against_mpmath(x, t):
    got = oracle.binary_cross_entropy_with_logits(np.array([x]), np.array([t]))[0]
    assert _rel(mpmath.mpf(str(got)), oracle.mp_bce_with_logits(x, t)) < 2.0 ** -60


def test_kl_against_mpmath():
    rng = np.random.default_rng(1)
    x = rng.normal(size=20) * 5
    p = rng.dirichlet(np.ones(20))
    got = oracle.kl_divergence(x[None], p[None])[0]
    assert _rel(mpmath.mpf(str(got)), oracle.mp_kl_row(x, p)) < 2.0 ** -58


def test_ulp_error_metric():
    one = np.float32(1.0)
    assert oracle.ulp_error(np.nextafter(one, np.float32(2)), 1.0, np.float32)[()] == 1.0
    assert oracle.ulp_error(np.float32(1.0), 1.0 + 2.0 ** -25, np.float32) == pytest.approx(0.25)
    assert oracle.ulp_error(np.nan, np.nan, np.float32) == 0
    assert oracle.ulp_error(np.inf, np.inf, np.float32) == 0
    assert np.isinf(oracle.ulp_error(np.nan, 1.0, np.float32))
    assert np.isinf(oracle.ulp_error(np.inf, 1.0, np.float32))
    assert np.isinf(oracle.ulp_error(1.0, np.inf, np.float32))
    # subnormal spacing: float32's smallest subnormal is 2^-149
    assert oracle.ulp_error(0.0, 2.0 ** -149, np.float32) == 1.0
    assert oracle.ulp(1.0, np.float16) == 2.0 ** -10
    assert oracle.ulp(1.0, "bfloat16" and __import__("ml_dtypes").bfloat16) == 2.0 ** -7
