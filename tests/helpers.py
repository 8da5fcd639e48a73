"""ULP assertions shared by the test modules; they print the first bad indices and report
NaN/inf mismatches separately from finite errors."""
import numpy as np

from cestudy.reference import oracle

# The accuracy contract of the public kernels, in ulps of the working dtype.
CONTRACT_ULP = 4.0


def assert_ulp(value, exact, dtype, tol=CONTRACT_ULP, what="value"):
    """Assert every element of ``value`` is within ``tol`` ulp of ``exact``; NaN/inf mismatches
    are reported separately from finite errors."""
    err = oracle.ulp_error(value, exact, dtype)
    _report(err, value, exact, tol, what)


def assert_grad_ulp(value, exact, dtype, tol=CONTRACT_ULP, what="grad"):
    err = oracle.grad_ulp_error(value, exact, dtype)
    _report(err, value, exact, tol, what)


def _report(err, value, exact, tol, what):
    value = np.asarray(value)
    exact = np.asarray(exact)
    nonfinite = np.isinf(err)
    if nonfinite.any():
        idx = np.argwhere(nonfinite)[:5]
        raise AssertionError(f"{what}: NaN/inf mismatch at {idx.tolist()}: got "
                             f"{[value[tuple(i)] for i in idx]}, exact "
                             f"{[float(exact[tuple(i)]) for i in idx]}")
    bad = err > tol
    if bad.any():
        idx = np.argwhere(bad)[:5]
        raise AssertionError(f"{what}: max error {err.max():.3g} ulp > {tol} at {idx.tolist()}: "
                             f"got {[value[tuple(i)] for i in idx]}, exact "
                             f"{[float(exact[tuple(i)]) for i in idx]}")
