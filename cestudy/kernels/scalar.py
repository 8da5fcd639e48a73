"""Scalar building blocks shared by the CPU (``numba.njit``) and CUDA (``cuda.jit(device=True)``)
kernels.

This module holds plain Python functions on floats that use only ``math``; ``cpu.py`` and
``cuda.py`` compile them for their target. It must not import numba or numpy, so that the same
source serves both targets and can be unit-tested as plain Python.

Numerical conventions (see ``docs`` in the kernels' modules):
- ``two_diff(a, b)`` is Knuth's TwoSum applied to ``a - b``: ``hi + lo == a - b`` exactly for
  finite inputs. The kernels use it so that ``exp(x_j - m)`` sees the exact difference; the
  rounding of ``x_j - m`` alone would put ``u * |x_j - m|`` of relative error into each term
  (Blanchard, Higham & Higham 2021, section 3).
- ``exp_dd(hi, lo) = exp(hi) * (1 + lo)`` is exp of a double-double argument to first order, which
  is exact to ``lo**2 / 2 <= u**2 |hi|**2 / 2``.
- ``softplus(x) = log(1 + e^x)`` and ``sigmoid(x)`` are evaluated on the side where ``e^{-|x|}``
  cannot overflow, so both keep full relative accuracy for every finite x.
"""
import math

# exp(d) underflows to zero in float64 for d < -745.14; skipping such terms also skips -inf logits
# (for which the two-sum would produce inf - inf = NaN).
EXP_UNDERFLOW = -746.0


def two_diff(a, b):
    """Return ``(hi, lo)`` with ``hi = fl(a - b)`` and ``hi + lo = a - b`` exactly (Knuth TwoSum).

    For a non-finite ``hi`` the error term is meaningless (inf - inf); it is set to 0 so that
    ``hi + lo`` keeps the IEEE value of ``a - b``.
    """
    s = a - b
    if not math.isfinite(s):
        return s, 0.0
    nb = -b
    bb = s - a
    err = (a - (s - bb)) + (nb - bb)
    return s, err


def exp_dd(hi, lo):
    """exp(hi + lo) for a double-double argument, to relative error ~ 1 ulp of float64."""
    e = math.exp(hi)
    return e + e * lo


def softplus(x):
    """log(1 + exp(x)) with full relative accuracy: max(x, 0) + log1p(exp(-|x|))."""
    if x > 0.0:
        return x + math.log1p(math.exp(-x))
    return math.log1p(math.exp(x))


def sigmoid(x):
    """1 / (1 + exp(-x)) with full relative accuracy on both tails (no 1 - sigmoid cancellation).

    With e = exp(-|x|) <= 1, the denominator 1 + e is carried as hi + lo (Fast2Sum) and the
    division corrected to first order, so only the rounding of exp and of the final operations
    remain (about 1 ulp); the focal losses raise sigmoid to the power gamma, which multiplies its
    error by gamma.
    """
    e = math.exp(-abs(x))
    z = 1.0 + e
    z_lo = e - (z - 1.0)
    r = 1.0 / z
    r = r - r * (z_lo / z)
    if x >= 0.0:
        return r
    return e * r


def neumaier_add(s, c, v):
    """One step of Neumaier's compensated summation: returns the new (sum, compensation)."""
    t = s + v
    if not math.isfinite(t):  # inf/NaN: keep c finite so that s + c keeps the IEEE value
        return t, c
    if abs(s) >= abs(v):
        c += (s - t) + v
    else:
        c += (v - t) + s
    return t, c


def pow_nonneg(base, gamma):
    """base**gamma for base >= 0, with 0**0 = 1 and 0**gamma = 0 for gamma > 0."""
    if gamma == 0.0:
        return 1.0
    if base == 0.0:
        return 0.0
    return math.pow(base, gamma)
