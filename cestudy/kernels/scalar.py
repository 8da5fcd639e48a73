"""Every formula the CPU and CUDA kernels share, written once.

This module holds plain Python functions on floats that use only ``math``; ``cpu.py`` /
``cpu_fast.py`` compile them with ``numba.njit`` and ``cuda.py`` with ``cuda.jit(device=True)``,
both through :func:`compiled`. It must not import numba or numpy, so that one source serves both
targets and can be unit-tested as plain Python. It must not hold loops over arrays or anything
that knows a variant's name: those are the kernels'.

Numerical conventions:
- ``two_diff(a, b)`` is Knuth's TwoSum applied to ``a - b``: ``hi + lo == a - b`` exactly for
  finite inputs. The kernels use it so that ``exp(x_j - m)`` sees the exact difference; the
  rounding of ``x_j - m`` alone would put ``u * |x_j - m|`` of relative error into each term
  (Blanchard, Higham & Higham 2021, section 3).
- ``exp_dd(hi, lo) = exp(hi) * (1 + lo)`` is exp of a double-double argument to first order, which
  is exact to ``lo**2 / 2 <= u**2 |hi|**2 / 2``.
- ``softplus(x) = log(1 + e^x)`` and ``sigmoid(x)`` are evaluated on the side where ``e^{-|x|}``
  cannot overflow, so both keep full relative accuracy for every finite x.
- ``exp_parts(d)`` is the vectorisable exp of the float32 fast paths: Cody-Waite range reduction
  and a degree-9 Taylor polynomial; each target builds the power of two its own way.
"""

import math
import types
from fractions import Fraction

# exp(d) underflows to zero in float64 for d < -745.14; skipping such terms also skips -inf logits
# (for which the two-sum would produce inf - inf = NaN).
EXP_UNDERFLOW = -746.0

# Constants of exp_parts (Cody-Waite reduction d = n ln2 + r, |r| <= ln2 / 2).
LOG2E = 1.4426950408889634
LN2_HI = 6.93147180369123816490e-01  # fdlibm: 32 significant bits, so n * LN2_HI is exact
LN2_LO = 1.90821492927058770002e-10
SHIFTER = 6755399441055744.0  # 1.5 * 2^52: adding it rounds to an integer in the low bits
EXP_FLUSH = -708.0  # below this, exp(d) < 3.3e-308: 0 for any float32 result


def fma(a, b, c):
    """a b + c rounded once. :func:`compiled` puts in the target's FMA instruction (the
    caller's ``fma``: ``llvm.fma.f64`` on the CPU, ``cuda.fma`` on the GPU); this Python
    version, for uncompiled calls and the CUDA simulator, rounds the exact rational result of
    finite arguments (a result beyond the float64 range raises OverflowError, an exact zero is
    +0)."""
    if not (math.isfinite(a) and math.isfinite(b) and math.isfinite(c)):
        return a * b + c
    return float(Fraction(a) * Fraction(b) + Fraction(c))


def two_sum(a, b):
    """Return ``(s, err)`` with ``s = fl(a + b)`` and ``s + err = a + b`` exactly for finite
    ``a``, ``b`` (Knuth's TwoSum: six operations, no branch, any order of magnitudes; for a
    non-finite ``s`` the error is meaningless: :func:`two_diff` guards it)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def two_diff(a, b):
    """Return ``(hi, lo)`` with ``hi = fl(a - b)`` and ``hi + lo = a - b`` exactly
    (:func:`two_sum` of ``a`` and ``-b``).

    For a non-finite ``hi`` the error term is meaningless (inf - inf); it is set to 0 so that
    ``hi + lo`` keeps the IEEE value of ``a - b``.
    """
    s = a - b
    if not math.isfinite(s):
        return s, 0.0
    return two_sum(a, -b)


def exp_dd(hi, lo):
    """exp(hi + lo) for a double-double argument, to relative error ~ 1 ulp of float64."""
    e = math.exp(hi)
    return e + e * lo


def exp_diff(a, b):
    """exp(a - b) for a <= b from the exact difference; 0 below underflow (and for a = -inf)."""
    hi, lo = two_diff(a, b)
    if hi < EXP_UNDERFLOW:
        return 0.0
    return exp_dd(hi, lo)


def exp_parts(d):
    """``(p, n)`` with exp(d) = p * 2^n for finite d >= EXP_FLUSH: relative error < 7e-12.

    Cody-Waite reduction r = d - n ln2 (n ln2 in two parts, the first exact), then the degree-9
    Taylor polynomial on |r| <= ln2 / 2 (truncation < 7e-12 relative, 1e-4 of a float32 ulp).
    No branches and no libm call, so LLVM vectorises a loop over it; the caller clamps d and
    builds 2^n (a bitcast on the CPU, ldexp on the GPU)."""
    t = d * LOG2E + SHIFTER
    n = t - SHIFTER
    r = (d - n * LN2_HI) - n * LN2_LO
    p = 2.7557319223985893e-06  # 1/9!
    p = p * r + 2.48015873015873e-05  # 1/8!
    p = p * r + 0.0001984126984126984  # 1/7!
    p = p * r + 0.001388888888888889  # 1/6!
    p = p * r + 0.008333333333333333  # 1/5!
    p = p * r + 0.041666666666666664  # 1/4!
    p = p * r + 0.16666666666666666  # 1/3!
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    return p, n


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


def sigmoid_pair(x):
    """``(s(x), s(-x), log1p(exp(-|x|)), exp(-|x|))`` from one exp: the two tails of
    :func:`sigmoid`, the common part of softplus(x) = max(x, 0) + log1p(exp(-|x|)) and
    softplus(-x), and the exp itself. The same operations as :func:`sigmoid` and :func:`softplus`
    on e = exp(-|x|), so the same bits, with one exp, one log1p and one division instead of four,
    two and four."""
    e = math.exp(-abs(x))
    z = 1.0 + e
    z_lo = e - (z - 1.0)
    r = 1.0 / z
    r = r - r * (z_lo / z)
    l1p = math.log1p(e)
    if x >= 0.0:
        return r, e * r, l1p, e
    return e * r, r, l1p, e


def one_minus(t):
    """(w, w_lo) with w = fl(1 - t) and w + w_lo = 1 - t exactly for |t| <= 1 (Fast2Sum): a
    soft target's complement, whose rounding (half an ulp for t < 1/2) would otherwise go into
    every term it weighs."""
    w = 1.0 - t
    return w, (1.0 - w) - t


def alpha_t_pair(t, w, w_lo, alpha):
    """(a, a_lo) with a + a_lo = alpha t + (1 - alpha)(1 - t) to about 2^-100 relative, the
    focal loss's class weight, from 1 - t = w + w_lo (:func:`one_minus`); (1, 0) for alpha < 0
    (no weighting). 1 - alpha is carried exactly too, the products as exact FMA pairs, their
    sum (two terms >= 0) with its TwoSum error. Rounded to one float64 it was up to 1 ulp off,
    and the loss alpha_t ce took that ulp: 4.03 ulp at gamma 0 on soft targets, past the
    contract's 4; :func:`times_pair` multiplies by the pair with one rounding."""
    if not alpha >= 0.0:
        return 1.0, 0.0
    a1, a1_lo = one_minus(alpha)
    p = alpha * t
    p_lo = fma(alpha, t, -p)
    q = a1 * w
    q_lo = fma(a1, w, -q)
    s, s_lo = two_sum(p, q)
    lo = s_lo + ((p_lo + q_lo) + (a1 * w_lo + a1_lo * w))
    a = s + lo
    return a, lo - (a - s)


def times_pair(a, a_lo, v):
    """(a + a_lo) v rounded once (one FMA); a v where a_lo v is not finite (v = inf or NaN:
    0 inf would be NaN)."""
    lo = a_lo * v
    return fma(a, v, lo if lo - lo == 0.0 else 0.0)


def one_minus_p_t(t, e, x_nonneg, r):
    """b = 1 - p_t = t s(-x) + (1 - t) s(x) of the sigmoid focal loss from e = exp(-|x|) and
    r = s(|x|) (:func:`sigmoid`, the corrected reciprocal of 1 + e), to 1.8 ulp where the sum of
    two rounded sigmoids gives 2.9 (b alone, in a float64 simulation of 2e6 soft targets; loss
    errors were measured on 2e5): b = (c0 + c1 e) / (1 + e),
    (c0, c1) = (1 - t, t) for x >= 0 and (t, 1 - t) below. 1 - t = w + w_lo exactly
    (:func:`one_minus`); c1 e = p + p_lo exactly (:func:`fma`); c0 + p with its TwoSum error and
    the low parts; the quotient n r corrected by the remainder n - q z (one FMA, nearly exact:
    q is within a few ulps of n / z) and by 1 + e = z + z_lo, without a second division. The
    focal loss raises b to the power gamma, which multiplies b's error by gamma: on soft targets
    the sum of sigmoids went past the contract's float64 focal exception 2 gamma + 4 (13.6 ulp
    at gamma 3.5, 18.2 at gamma 5). Targets outside [0, 1] are not supported (w_lo is exact only
    for |t| <= 2). On a GPU, NVVM's FMA contraction may fuse c1 e into the sums that follow and
    count p_lo twice (up to half an ulp more in b); not measured there."""
    w, w_lo = one_minus(t)
    if x_nonneg:
        c0, c0_lo, c1, c1_lo = w, w_lo, t, 0.0
    else:
        c0, c0_lo, c1, c1_lo = t, 0.0, w, w_lo
    p = c1 * e
    p_lo = fma(c1, e, -p)
    s, s_lo = two_sum(c0, p)
    n = s + ((s_lo + p_lo) + (c0_lo + c1_lo * e))
    z = 1.0 + e
    z_lo = e - (z - 1.0)
    q = n * r
    return fma(fma(-q, z, n) - q * z_lo, r, q)


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
    """base**gamma for base >= 0, with 0**0 = 1 and 0**gamma = 0 for gamma > 0.

    gamma = 1 and 2 (the focal losses' usual values) skip libm's pow: base and base * base are
    the correctly rounded results, the same bits pow gives (checked on 7e6 values, subnormal
    results included), at a fraction of its cost."""
    if gamma == 0.0:
        return 1.0
    if base == 0.0:
        return 0.0
    if gamma == 2.0:
        return base * base
    if gamma == 1.0:
        return base
    return math.pow(base, gamma)


# --------------------------------------------------------------------------------------------
# Row losses (softmax family)
# --------------------------------------------------------------------------------------------
def row_guard(ignored, has_nan, m):
    """``(skip, fill)``: whether a row's loss and gradient are a constant instead of computed,
    and that constant: 0 for an ignored row (its target is ``ignore_index``), NaN for a row that
    holds a NaN or whose maximum is +inf or -inf (all classes masked), as torch gives."""
    if ignored:
        return True, 0.0
    if has_nan or not math.isfinite(m):
        return True, math.nan
    return False, 0.0


def neg_log_prob(v, m, L):
    """-log softmax(x)_c = (m - x_c) + L for v = x_c, with the difference in double-double."""
    hi, lo = two_diff(m, v)
    return hi + (L + lo)


def argmax_grad(a_sum, a_k, s, z):
    """A q_k - a_k at the argmax, where q_k = 1 / z rounds close to 1:
    (A - a_k - a_k s) / z, with A - a_k formed first (a sum of the other, non-negative terms
    when the caller's A is compensated), so the cancellation is confined to the small a_k s."""
    return ((a_sum - a_k) - a_k * s) / z


def soft_target(w, t, eps, nc):
    """a_c = w_c ((1 - eps) t_c + eps / C): torch's smoothed, class-weighted soft target."""
    return w * ((1.0 - eps) * t + eps / nc)


def kl_term(p, v, m, L):
    """p log(p / q) for p > 0, q = softmax(x)_c, v = x_c: p ((m - v) + L + log p), larger terms
    first, the difference in double-double."""
    hi, lo = two_diff(m, v)
    return p * ((hi + L) + (math.log(p) + lo))


def focal_parts(s, e_y, y_top):
    """``(a, p_y)`` of the softmax focal loss from S, e_y = exp(x_y - m) and whether y is the
    argmax: a = 1 - p_y as S / (1 + S) or (1 + S - e_y) / (1 + S) (z >= 2 e_y then), both
    without cancellation."""
    z = 1.0 + s
    a = s / z if y_top else (z - e_y) / z
    return a, e_y / z


def focal_inner(gamma, ce, p_y, a):
    """gamma ce p_y + a, the factor every softmax focal gradient entry shares. ce p_y =
    -p_y log p_y is taken as its limit 0 where p_y = 0, also when ce = +inf (x_y = -inf, a
    masked true class), where 0 * inf would make the whole row NaN."""
    return (gamma * ce * p_y if p_y > 0.0 else 0.0) + a


def focal_grad(j_is_y, p, a, a_gamma, inner, w):
    """One softmax focal gradient entry, with inner = gamma ce p_y + a:
    -w a^gamma inner for the true class, else w p_j a^(gamma - 1) inner written as
    (p_j / a) a^gamma so that a -> 0 gives 0 rather than 0 * inf."""
    if j_is_y:
        return -w * a_gamma * inner
    if p == 0.0:
        return 0.0
    return w * (p / a) * a_gamma * inner


# --------------------------------------------------------------------------------------------
# Element-wise losses
# --------------------------------------------------------------------------------------------
def bce_logits(x, t, pw):
    """pw t softplus(-x) + (1 - t) softplus(x) = -[pw t log s(x) + (1 - t) log(1 - s(x))].

    Both terms are >= 0 for t in [0, 1], so no cancellation, unlike torch's
    (1 - t) x + (1 + (pw - 1) t) (log1p(exp(-|x|)) + max(-x, 0))."""
    return pw * t * softplus(-x) + (1.0 - t) * softplus(x)


def bce_logits_grad(x, t, pw):
    """d/dx of :func:`bce_logits`: (1 - t) s(x) - pw t s(-x)."""
    return (1.0 - t) * sigmoid(x) - pw * t * sigmoid(-x)


def sigmoid_focal(x, t, alpha, gamma):
    """torchvision.ops.sigmoid_focal_loss for one element, returns (loss, dloss/dx).

    b = 1 - p_t = t s(-x) + (1 - t) s(x) (:func:`one_minus_p_t`), ce = BCE with logits,
    loss = alpha_t ce b^gamma,
    d/dx = alpha_t [(s(x) - t) b^gamma + gamma ce b^(gamma-1) (1 - 2t) s(x) s(-x)].
    """
    sp, sn, l1p, e = sigmoid_pair(x)
    b = one_minus_p_t(t, e, x >= 0.0, sp if x >= 0.0 else sn)
    # bce_logits(x, t, 1) with softplus(-x) and softplus(x) from the shared log1p
    sp_neg = -x + l1p if x < 0.0 else l1p
    sp_pos = x + l1p if x > 0.0 else l1p
    w, w_lo = one_minus(t)
    lo = w_lo * sp_pos  # (1 - t) softplus(x) = w softplus(x) + lo; lo dropped where not finite
    ce = fma(t, sp_neg, fma(w, sp_pos, lo if lo - lo == 0.0 else 0.0))
    bg = pow_nonneg(b, gamma)
    alpha_t, alpha_t_lo = alpha_t_pair(t, w, w_lo, alpha)
    loss = times_pair(alpha_t, alpha_t_lo, ce) * bg
    g = ((1.0 - t) * sp - t * sn) * bg
    if b != 0.0 and gamma != 0.0:
        # b^(gamma - 1) * db, written so that b -> 0 does not produce 0 * inf
        g += gamma * ce * (bg / b) * ((1.0 - 2.0 * t) * sp * sn)
    return loss, alpha_t * g


# --------------------------------------------------------------------------------------------
# Compilation for a target
# --------------------------------------------------------------------------------------------
FUNCTIONS = (
    "two_sum",
    "two_diff",
    "exp_dd",
    "exp_diff",
    "exp_parts",
    "softplus",
    "sigmoid",
    "sigmoid_pair",
    "one_minus",
    "alpha_t_pair",
    "times_pair",
    "one_minus_p_t",
    "neumaier_add",
    "pow_nonneg",
    "row_guard",
    "neg_log_prob",
    "argmax_grad",
    "soft_target",
    "kl_term",
    "focal_parts",
    "focal_inner",
    "focal_grad",
    "bce_logits",
    "bce_logits_grad",
    "sigmoid_focal",
)


def compiled(jit, fma):
    """This module's functions compiled with ``jit`` (``numba.njit(...)`` or
    ``cuda.jit(device=True)``), as a namespace; ``fma`` is the target's fused multiply-add
    (``cpu.fma64``, ``cuda.fma``), which :func:`fma` stands for.

    Each function is rebuilt over a globals dict in which the other functions' names point to
    their compiled versions, so that ``sigmoid_focal`` calls the compiled ``sigmoid`` of the same
    target (numba resolves global names when it compiles, lazily, after this returns)."""
    namespace = dict(globals())
    namespace["fma"] = fma
    out = types.SimpleNamespace()
    for name in FUNCTIONS:
        f = globals()[name]
        g = types.FunctionType(f.__code__, namespace, name, f.__defaults__, f.__closure__)
        g.__doc__ = f.__doc__
        g.__qualname__ = f.__qualname__
        namespace[name] = jit(g)
        setattr(out, name, namespace[name])
    return out
