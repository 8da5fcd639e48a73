"""Vectorised CPU kernels (float32 and float64): the accuracy contract of ``cpu.py`` at full
SIMD width.

numba 0.68 has no SVML, so ``math.exp`` in a jitted loop stays a scalar libm call (about 3 ns per
element). The hot loops here are written so that LLVM vectorises them (16 float32 or 8 float64
lanes with AVX-512), using error-free transformations where a plain rounding would break the
4-ulp contract:

- **The difference x_j - m** is carried exactly as a pair (``two_diff_f32`` / ``two_diff_f64``,
  Knuth's TwoSum): ``hi + lo = x_j - m``. Rounding it instead would put ``u |x_j - m|`` of
  relative error into exp (up to 64 ulp at x_j - m = -100).
- **exp** (``exp_f32_biased`` / ``exp_f64_biased``): Cody-Waite reduction d = n ln2 + r with
  ``r1 = hi - n LN2_HI`` exact (a short LN2_HI and FMA) and the small rest ``c = lo - n LN2_LO``
  kept apart. float64: a minimax polynomial of degree 12 (truncation 0.01 ulp) written
  ``(1 + r1) + (es + c + r^2 q(r))`` where ``es`` is the exact rounding error of ``1 + r1``
  (Fast2Sum), so that the only large rounding is the last addition: <= 0.55 ulp. float32: the
  exp pass is bound by instruction issue, so the polynomial has degree 6 (q of degree 4,
  truncation 0.05 ulp) and ``1 + (r1 + (c + r^2 q(r)))`` drops ``es`` (its inner sum is below
  0.42, so its rounding costs at most a quarter of an ulp): 4 instructions fewer per 16 terms,
  measured <= 0.87 ulp, bounded by 1.02 (``tests/test_fast_kernels.py``; the softmax focal
  loss's pairs keep ``es``, a degree-7 polynomial and 0.65 ulp for the high part).
  The result is scaled by 2^96 (``EXP_BIAS``) so that every term that can matter stays normal with
  full relative accuracy: a confident float32 row whose loss is a subnormal (1e-40) sums terms of
  exp(-95); flushing them, or letting them round as subnormals, would cost hundreds of ulp. Terms
  below exp(-150) (float64: exp(-770)) are 0: with C < 2^31 classes they total below half a
  subnormal ulp.
- **Sums of the exp terms** (and, for float64, of the label-smoothing and soft-target terms) are
  exact enough for the result's dtype without a serial compensated loop. float32: each term is
  converted exactly to float64 and summed in lanes (relative error C 2^-53). A loop that mixes
  float32 and float64 is vectorised at the float64 width (8 lanes, so the float32 exp would run
  at half width), so each block's terms are first written as float32 (into the gradient row, or
  a scratch row for the forward) by a float32-only loop, then summed by a float64 loop over that
  L1-resident block. float64: a plain sum in lanes has a worst-case relative error of
  (C / lanes) u, so each block is summed by splitting every term at sigma = 2^(E + 14), E the
  exponent of its largest term (Rump, Ogita & Oishi's ExtractScalar): the high parts add up
  exactly in any order and the low parts are too small to matter (``_sum_below_f64``).
- **The row is read once from memory**: its maximum first (a streaming integer-key reduction),
  then blocks of ``BLOCK`` classes from L2, exp-and-sum; float32 rows longer than
  ``PREMAX_CLASSES`` (256 KiB) are processed block by block, max then exp-and-sum, with an
  online (max, sum) state (Milakov & Gimelshein 2018): the sum of the terms below the running
  maximum and the count of terms equal to it, rescaled by exp(m_old - m_new) when the maximum
  grows. (The online form for every row was 10% slower single-threaded at 32768 classes: the
  compute phases of the blocks left the memory idle.) Rows of several blocks keep the memory
  busy while exp computes: every 256 terms, prefetch hints (``llvm.prefetch``) for as many
  elements of the next row (or, online, of the next block) (``exp_block_streaming``; float32
  2048 x 32768 forward 11.3 -> 9.6 ms). float64 rows always take the maximum first:
  a rescaling would cost float64 ulps. S = sum_{j != k} exp(x_j - m) is never formed as
  (1 + S) - 1. The fused kernels read the row once more to scale the stored terms into the
  gradient, by a / (1 + S) carried as a double-double (one rounding per entry).
- **The softmax focal loss** takes the cross-entropy's first pass, except for float32 rows:
  (1 - p_y)^gamma multiplies the relative error of S by gamma, so their terms are kept as
  float32 pairs, exp's last rounding carried exactly (``_exp_biased_pair``, 0.16 ulp a term),
  and summed exactly in float64: float32 vectors throughout, where a float64 copy of the row
  and the float64 exp took 1.8x as long (256 x 1000: 234 us to 130 us serial).
- **Per row only**: the loss (m - x_y) + log1p(S) (m - x_y exact), the cancellation-free entries
  (p_y - 1 = -S / (1 + S) when y is the argmax, the argmax entry under label smoothing or soft
  targets), in float64 scalar arithmetic.
- **Short rows** (at most ``SHORT_CLASSES`` = 32 classes): the forward of the cross-entropy
  (class indices without label smoothing, and soft targets), of the softmax focal loss and of
  KL runs ``LANES`` = 16 rows at a time, one row per lane: the rows copied by class into a
  small block, the maxima row by row, then the terms and their sums with the lanes across rows
  (each lane's sums compensated by a branch-free Fast2Sum or Neumaier step). A 10-class row
  otherwise never fills a 16-lane vector and runs the scalar remainders of three loops and a
  chain of calls: 85 ns a row at 256 x 10, 27 ns in lanes. The row path sums rows of at most
  32 classes in the same order, so forward and fused kernels give the same bits. The fused
  cross-entropy (the same cases) and KL run the same lanes, keep the group's terms by class,
  and give each row the row path's gradient formulas, bit for bit (fused 256 x 10 float32:
  127 ns a row by the row path, 46 in lanes).
- **BCE with logits and the sigmoid focal loss**: one row driver for both (``sigmoid_row``),
  the element function chosen at compile time by the type of its ``params``
  (``sigmoid_elem``); float32 rows in float64 arithmetic (exp and log1p accurate to 1e-11);
  float64 rows with the float64 exp, fdlibm's log1p on [0, 1] (``log1p_f64``, < 1 ulp) and
  split row sums. The focal loss's (1 - p_t)^gamma is a product for gamma in {0, 1, 2}
  (vectorised); any other gamma calls libm's pow per element (scalar loops: ``log_f64`` is
  within 1 ulp, but exp(gamma log b) multiplies that error by gamma log b).
- **KL divergence of softmax**: the cross-entropy's first pass for m and S, then the
  reference's per-term formula p_c ((m - x_c) + log1p(S) + log p_c) in lanes, with a float64
  log written for lanes (``log_f64``, fdlibm's, < 1 ulp) and each block's terms (of either
  sign) summed split at their largest magnitude; never H(p, q) - H(p), which cancels where p
  is close to q.

Error budget of a float32 gradient entry p_j = e_j / (1 + S): exp <= 0.87 ulp as measured (1.02
bounded), S (a sum of positive terms each within that) as much, one rounding of a float64 product to
float32 (0.5 ulp): <= 2.3 ulp from the measured exp, 2.6 from its bound (ulps of nearby binades, so
up to twice that in the worst alignment); measured <= 1.7 (rows of 10 to 5000 classes of mixed
scales, 1.68; 1.65 with the former 0.65-ulp exp). float64 entries carry in addition the rounding of
the scale's factors and of the product: measured on rows built to be hard (weights, mean scaling,
scales 1e-2..1e3, 5000+ classes) up to 3.6 ulp with class indices and 4.4 with soft targets, in ulps
of the larger of A p_j and a_j, where ``cpu.py``'s reference kernels give 4.3 and 4.7 on the same
rows; within the contract on every test row.

**In place**: every fused kernel may be given ``out_grad`` = ``logits`` (the gradient written over
the logits, as Liger-Kernel does on the GPU). Everything a row needs from the logits (x_y, the
argmax index, the label-smoothing and soft-target sums) is read before the first write to the
row, and each write goes to the element just read. A loop that reads one array and writes
another is guarded by LLVM with a runtime overlap check that, when they are the same memory,
runs it scalar; so the kernels find out once per call whether ``out_grad`` is ``logits`` and
then run loops that read and write one array (``*_inplace*``), which vectorise.

**Serial twins**: every kernel ``<k>`` has ``<k>_serial``, the same code without threads, for
calls too small to pay for starting them (``cestudy.kernels.cpu.kernel_for``).

Only ``contract`` (FMA) and ``reassoc`` (on the loops whose only reductions are sums, maxima or
counts; never on a function holding an error-free transformation, whose instructions keep their
own flags when LLVM inlines them) are used: never ``nnan``/``ninf``, which would fold away the
NaN checks.
"""

import collections
import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import cpu, scalar
from .cpu import (
    argmax_grad,
    bcast_row,
    compensated_sum,
    loss_row,
    neumaier_add,
    row_guard,
    serial_twins,
    store_row_sum,
)

_OPTS = dict(cache=True, error_model="numpy", nogil=True)
# Everything below the kernels allocates nothing, so it runs without numba's reference counting
# (``_nrt=False``): the kernel holds every array for the duration of the call, and the atomic
# increments and decrements of the array views passed down took a third of the time of a row of
# 10 classes.
_ROW = dict(_nrt=False, **_OPTS)
_FMA = dict(fastmath={"contract"}, **_ROW)
_SUM = dict(fastmath={"reassoc", "contract"}, **_ROW)
# the shared formulas again, with FMA contraction for the polynomials (not cached: a second
# cached compilation of the same source with other flags would share cpu.py's cache entries)
_F = scalar.compiled(njit(fastmath={"contract"}, error_model="numpy", nogil=True), fma=cpu.fma64)
fma64 = cpu.fma64
soft_target = _F.soft_target
exp_diff = _F.exp_diff
two_diff = _F.two_diff
two_sum = _F.two_sum
neg_log_prob = _F.neg_log_prob
focal_parts = _F.focal_parts
focal_inner = _F.focal_inner
pow_nonneg = _F.pow_nonneg
_exp_parts = _F.exp_parts
one_minus = _F.one_minus
one_minus_p_t = _F.one_minus_p_t
alpha_t_pair = _F.alpha_t_pair
times_pair = _F.times_pair
EXP_FLUSH = scalar.EXP_FLUSH

F32 = np.float32
PREMAX_CLASSES = 1 << 16  # rows up to 256 KiB of float32: the maximum first, then blocks from L2
BLOCK = 4096  # classes per block: 16 KiB of logits, in L1 with its 16 KiB of float32 terms
STREAM_STEP = 256  # elements of exp between two groups of prefetch hints (exp_block_streaming)


def _bitcast(int_type, float_type, llvm_type, doc):
    """An intrinsic that reinterprets ``int_type`` bits as ``float_type`` (no conversion)."""

    @intrinsic
    def cast(typingctx, x):
        if x != int_type:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], llvm_type)

        return float_type(int_type), codegen

    cast.__doc__ = doc
    return cast


_bits_to_float64 = _bitcast(
    types.int64,
    types.float64,
    ir.DoubleType(),
    "int64 bits as float64: how 2^n is built without ldexp.",
)
_bits_to_float32 = _bitcast(
    types.int32,
    types.float32,
    ir.FloatType(),
    "int32 bits as float32: 2^n, and the maximum back from its key.",
)


# --------------------------------------------------------------------------------------------
# float32 exp with an exact argument (hi, lo), scaled by 2^EXP_BIAS
# --------------------------------------------------------------------------------------------
EXP_BIAS = 96
BIASED_ONE = F32(2.0**EXP_BIAS)  # exp(0) * 2^EXP_BIAS: the value of a term at the maximum
UNBIAS = 2.0**-EXP_BIAS
EXP32_FLUSH = F32(-150.0)  # exp(-150) 2^96 = 2^-120.4: still a normal float32
_LOG2E = F32(1.4426950408889634)
_SHIFTER = F32(12582912.0)  # 1.5 * 2^23: adding it rounds to an integer in the low bits
_LN2_HI = F32(0.693145751953125)  # 16 significant bits: n * _LN2_HI is exact for |n| < 2^8
_LN2_LO = F32(math.log(2.0) - 0.693145751953125)  # ln 2 - _LN2_HI, rounded
_ONE = F32(1.0)
_ZERO = F32(0.0)
# q(r) ~ (exp(r) - 1 - r) / r^2 on |r| <= ln2 / 2: minimax for the relative error of exp
# (Lawson's iteration in long double; truncation 5e-11 relative, 0.001 ulp)
_Q0 = F32(0.5)
_Q1 = F32(0.1666666567325592)
_Q2 = F32(0.04166629910469055)
_Q3 = F32(0.008333495818078518)
_Q4 = F32(0.001394452410750091)
_Q5 = F32(0.00019791295926552266)
# q(r) ~ (exp(r) - 1 - r) / r^2 of degree 4 for :func:`exp_f32_biased` (not ``_Q4``, a
# coefficient of the pair's degree-5 q): minimax for the relative error of exp on
# |r| <= ln2 / 2 + 1e-3 (Lawson's iteration, coefficients rounded to float32 one by one, each
# refit after the last): truncation 3.2e-9 relative, 0.05 ulp
_QS = (F32(0.49999994), F32(0.16666521), F32(0.041668292), F32(0.008368719), F32(0.0013818726))
# the constants of :func:`_exp_biased_pair` for float32
_EXP32 = (
    _LOG2E,
    _SHIFTER,
    _LN2_HI,
    _LN2_LO,
    _ONE,
    EXP32_FLUSH,
    _ZERO,
    (_Q0, _Q1, _Q2, _Q3, _Q4, _Q5),
)


@njit(**_FMA)
def two_diff_lanes(a, b):
    """``(hi, lo)`` with ``hi = fl(a - b)`` and ``hi + lo = a - b`` exactly: ``scalar.two_sum``
    of ``a`` and ``-b`` in the arguments' float type, with no branch, so that loops over it
    vectorise (a non-finite ``hi`` gives a meaningless ``lo``; ``two_diff`` guards that with a
    branch)."""
    return two_sum(a, -b)


two_diff_f32 = two_diff_f64 = two_diff_lanes  # the names the float32 / float64 paths use


# (float type, its bits' int type, LLVM int width, LLVM float type, mantissa bits, exponent bias)
_WIDTHS = {
    types.float32: (types.int32, 32, ir.FloatType(), 23, 127),
    types.float64: (types.int64, 64, ir.DoubleType(), 52, 1023),
}


@intrinsic
def _pow2_biased(typingctx, t):
    """2^(n + EXP_BIAS) in t's type for t = fl(v + 1.5 * 2^p), p the mantissa bits (23, 52),
    n = t - 1.5 * 2^p an integer in [-222, 30] (float32) or [-1118, 927] (float64): t's low
    mantissa bits hold n, so (bits(t) << p) = n << p modulo 2^32 (2^64) (the bits of
    1.5 * 2^p shift out), and adding the biased exponent gives the float's bits."""
    if t not in _WIDTHS:
        return None
    _, width, llvm_float, mant, bias = _WIDTHS[t]

    def codegen(context, builder, signature, args):
        iw = ir.IntType(width)
        b = builder.shl(builder.bitcast(args[0], iw), ir.Constant(iw, mant))
        return builder.bitcast(
            builder.add(b, ir.Constant(iw, (bias + EXP_BIAS) << mant)), llvm_float
        )

    return t(t), codegen


@njit(**_FMA)
def _horner(r, p):
    """p_0 + r (p_1 + r (... + r p_d)) for the tuple of coefficients ``p`` (a constant of fixed
    length: the loop unrolls), each step one FMA."""
    q = p[len(p) - 1]
    for i in range(len(p) - 2, -1, -1):
        q = q * r + p[i]
    return q


@njit(**_FMA)
def _exp_reduce(hi, lo, k):
    """Cody-Waite reduction of d = hi + lo = n ln2 + r for the exps below, in the float type of
    ``hi`` and of the constants ``k`` (``_EXP32``, ``_EXP64``): ``(t, r1, c, r)`` with
    t = fl(hi log2 e + 1.5 * 2^p) holding n in its low bits (:func:`_pow2_biased`),
    ``r1 = hi - n LN2_HI`` exact (FMA, or an exact product and a Sterbenz difference), the small
    rest ``c = lo - n LN2_LO`` kept apart, and r = r1 + c rounded (the polynomial's argument)."""
    log2e, shifter, ln2_hi, ln2_lo = k[0], k[1], k[2], k[3]
    t = hi * log2e + shifter
    n = t - shifter
    r1 = hi - n * ln2_hi
    c = lo - n * ln2_lo
    return t, r1, c, r1 + c


@njit(**_FMA)
def _exp_scaled(p, t, hi, k):
    """p * 2^(n + 96) for hi at or above the flush threshold of ``k``, else 0: below it (and for
    hi = -inf or NaN) n is garbage, and the select drops it."""
    scale = _pow2_biased(t)
    if hi >= k[5]:
        return p * scale
    return k[6]


@njit(**_FMA)
def _exp_biased_pair(hi, lo, k):
    """exp(hi + lo) * 2^96 in the float type of ``hi`` and of the constants ``k`` (``_EXP32``,
    ``_EXP64``: log2 e, the shifter 1.5 * 2^p, ln 2 in a short high part and the rest, 1, the
    flush threshold, 0, the coefficients of q(r) ~ (exp(r) - 1 - r) / r^2), as an unevaluated
    pair ``(p, p_lo)``: ``p`` the rounded result, ``p_lo`` its rounding error.

    The reduction :func:`_exp_reduce` (r1 exact, the rest c apart), then the result
    ``(1 + r1) + (es + c + r^2 q(r))`` with ``es`` the rounding error of 1 + r1, exact
    (Fast2Sum, |r1| < 1), so that the only large rounding is the last addition, whose error
    ``p_lo`` is exact again (Fast2Sum: |1 + r1| > 0.7 exceeds the small part). ``p`` alone is
    within 0.65 ulp; ``p + p_lo`` within the roundings of the small part (float32: measured
    0.16 ulp)."""
    one = k[4]
    t, r1, c, r = _exp_reduce(hi, lo, k)
    q = _horner(r, k[7])
    s1 = one + r1
    es = (one - s1) + r1
    small = (r * r) * q + (es + c)
    p = s1 + small
    p_lo = (s1 - p) + small
    return _exp_scaled(p, t, hi, k), _exp_scaled(p_lo, t, hi, k)


@njit(**_FMA)
def _exp_biased(hi, lo, k):
    """exp(hi + lo) * 2^96 rounded once (:func:`_exp_biased_pair` without its low part, which
    LLVM then never computes)."""
    return _exp_biased_pair(hi, lo, k)[0]


@njit(**_FMA)
def exp_f32_biased(hi, lo):
    """exp(hi + lo) * 2^96 in float32 for hi <= 0 and |lo| <= ulp(hi), down to hi = -150:
    measured within 0.87 ulp (0.863), bounded by 1.02; 0 below (and for hi = -inf or NaN:
    callers test the row for NaN first).

    The reduction :func:`_exp_reduce` (r1 = hi - n LN2_HI exact, the rest c, below 3.2e-4, kept
    apart), then exp(r) = 1 + em1 with em1 = r1 + (c + r^2 q(r)) rounded once
    (q of degree 4, ``_QS``; |em1| < sqrt 2 - 1: its rounding is at most a quarter of an ulp
    of the result) and the last addition rounded.

    The exp pass of a float32 row is bound by instruction issue, and this form takes 4 vector
    instructions fewer per 16 terms than carrying the rounding error of 1 + r1 (Fast2Sum) with a
    degree-5 q as the pair does (0.65 ulp): the loop of :func:`_exp_block_f32`, TwoSum and tie count
    included, 106 arithmetic instructions per 64 terms instead of 122, 0.358 -> 0.314 ns a term
    serially (AMD EPYC Zen 4)."""
    t, r1, c, r = _exp_reduce(hi, lo, _EXP32)
    em1 = r1 + ((r * r) * _horner(r, _QS) + c)
    return _exp_scaled(_ONE + em1, t, hi, _EXP32)


@intrinsic
def _prefetch(typingctx, x, j):
    """A hint that the cache line of ``x``'s element ``j`` will be read soon (``llvm.prefetch``,
    read, into L2): ``j`` may lie past the end of ``x``, since a prefetch never faults."""
    if not isinstance(x, types.Array):
        return None

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), i8p)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(x, types.intp), codegen


@njit(**_ROW)
def prefetch_span(x, lo, hi):
    """Prefetch elements [lo, hi) of ``x``'s memory, one hint per 64-byte line."""
    step = max(64 // x.itemsize, 1)
    for j in range(lo, hi, step):
        _prefetch(x, j)


# --------------------------------------------------------------------------------------------
# Block primitives (each one loop LLVM vectorises)
# --------------------------------------------------------------------------------------------
def _flip_sign_bits(builder, b, width):
    """bits ^ ((bits >> (width - 1)) & (2^(width - 1) - 1)) on an int of ``width`` bits."""
    iw = ir.IntType(width)
    sign = builder.and_(
        builder.ashr(b, ir.Constant(iw, width - 1)), ir.Constant(iw, (1 << (width - 1)) - 1)
    )
    return builder.xor(b, sign)


@intrinsic
def _order_key(typingctx, x):
    """The int key of a float32 (int32) or float64 (int64) that orders as the float does (-0
    just below +0; NaNs with the sign bit clear above +inf, with it set below -inf):
    bits ^ ((bits >> 31) & 0x7fffffff) for float32. An intrinsic so that the arithmetic stays in
    int32 lanes for float32 (numba widens int32 to int64)."""
    if x not in _WIDTHS:
        return None
    int_type, width, _, _, _ = _WIDTHS[x]

    def codegen(context, builder, signature, args):
        return _flip_sign_bits(builder, builder.bitcast(args[0], ir.IntType(width)), width)

    return int_type(x), codegen


@intrinsic
def _key_value(typingctx, k):
    """The float whose :func:`_order_key` is ``k`` (the key map is its own inverse): float32
    for an int32 key, float64 for an int64 one."""
    float_type = {w[0]: f for f, w in _WIDTHS.items()}.get(k)
    if float_type is None:
        return None
    _, width, llvm_float, _, _ = _WIDTHS[float_type]

    def codegen(context, builder, signature, args):
        return builder.bitcast(_flip_sign_bits(builder, args[0], width), llvm_float)

    return float_type(k), codegen


_KEY_POSINF = np.int32(0x7F800000)  # keys above: NaNs with the sign bit clear
_KEY_NEGINF = np.int32(-0x7F800001)  # the key of -inf; keys below: NaNs with the sign bit set


@njit(**_ROW)
def _key_range(x, hi, lo):
    """(max, min) of the :func:`_order_key` keys of the row ``x`` and of the starting ``hi``,
    ``lo`` (the extreme keys of its int type): integer reductions that vectorise."""
    for j in range(x.shape[0]):
        key = _order_key(x[j])
        hi = max(hi, key)
        lo = min(lo, key)
    return hi, lo


@njit(**_ROW)
def row_max_f32(x):
    """(m, bad) of a float32 row: the maximum as float64, and whether the row holds a NaN.

    The maximum and minimum are taken over order-preserving int32 keys of the bit patterns
    (:func:`_order_key`), integer reductions that LLVM vectorises over 16 lanes without fast-math
    flags (a float max reduction would need ``nnan``); a NaN shows as a key above +inf's or
    below -inf's."""
    hi, lo = _key_range(x, np.int32(-2147483648), np.int32(2147483647))
    return np.float64(_key_value(hi)), hi > _KEY_POSINF or lo < _KEY_NEGINF


@njit(**_ROW)
def _first_equal(x, m):
    """The first j with x_j == m, or len(x) if none, for a slice of at most 2^31 elements: a
    minimum over ``j if x_j == m else len(x)``, in int32 lanes, that LLVM vectorises."""
    n = np.int32(x.shape[0])
    k = n
    for j in range(x.shape[0]):
        k = min(k, np.int32(j) if x[j] == m else n)
    return k


@njit(**_ROW)
def first_index_of(x, m):
    """The first j with x_j == m (-1 if none), 256 elements at a time (:func:`_first_equal`),
    so that a maximum near the row's start ends the search early. (A vectorised count of each
    256 and a scalar scan of the one that holds m took 125 ns of a 1000-class float32 row, a
    third of its forward; this takes 43 ns.)"""
    n = x.shape[0]
    for c0 in range(0, n, 256):
        c1 = min(c0 + 256, n)
        k = _first_equal(x[c0:c1], m)
        if k < c1 - c0:
            return c0 + k
    return -1


@njit(**_ROW)
def _store(x, out, j, v):
    """out[j] = v, or x[j] = v when ``out`` is None (a test numba prunes at compile time)."""
    if out is None:
        x[j] = v
    else:
        out[j] = v


@njit(**_SUM)
def _exp_block_f32(x, m, out):
    """out_j = exp(x_j - m) 2^96 (float32, from the exact difference) for x_j <= m; returns the
    number of terms equal to 2^96 (x_j == m, or so close that exp rounds to 1).

    ``out=None`` writes over ``x`` itself: a test numba prunes at compile time, so that the loop
    reads and writes one array. LLVM guards a loop that reads one array and writes another with
    a runtime overlap check and, when they are the same memory, runs it scalar (5x slower);
    reading and writing one array it vectorises."""
    ties = _ZERO
    for j in range(x.shape[0]):
        hi, lo = two_diff_f32(x[j], m)
        e = exp_f32_biased(hi, lo)
        _store(x, out, j, e)
        ties += _ONE if e == BIASED_ONE else _ZERO
    return np.float64(ties)


@njit(**_SUM)
def _sum_below_f32(e):
    """sum of the terms e_j < 2^96 in float64 (vectorised partial sums of exact conversions)."""
    s = 0.0
    for j in range(e.shape[0]):
        v = e[j]
        s += np.float64(v) if v < BIASED_ONE else 0.0
    return s


@njit(**_SUM)
def _exp_pair_block_f32(x, m, out, out_lo):
    """:func:`_exp_block_f32` with each term an unevaluated pair (:func:`_exp_biased_pair`):
    ``out_j + out_lo_j`` = exp(x_j - m) 2^96 within 0.2 float32 ulp; ``out=None`` writes the
    high parts over ``x``. Returns the number of terms equal to 2^96 (their low parts, of
    relative size below 2^-24, are dropped with them)."""
    ties = _ZERO
    for j in range(x.shape[0]):
        hi, lo = two_diff_f32(x[j], m)
        e, e_lo = _exp_biased_pair(hi, lo, _EXP32)
        _store(x, out, j, e)
        out_lo[j] = e_lo
        ties += _ONE if e == BIASED_ONE else _ZERO
    return np.float64(ties)


@njit(**_SUM)
def _sum_pairs_below_f32(e, e_lo):
    """sum of the pairs e_j + e_lo_j with e_j < 2^96 in float64 (each pair exact in float64)."""
    s = 0.0
    for j in range(e.shape[0]):
        v = e[j]
        s += (np.float64(v) + np.float64(e_lo[j])) if v < BIASED_ONE else 0.0
    return s


@njit(**_SUM)
def _scale_pair_block_f32(g, g_lo, f):
    """g_j = f (g_j + g_lo_j), one rounding to float32 of the exact float64 pair's product."""
    for j in range(g.shape[0]):
        g[j] = (np.float64(g[j]) + np.float64(g_lo[j])) * f


# --------------------------------------------------------------------------------------------
# float64: the same primitives (exp to 0.55 ulp, int64 keys, compensated block sums)
# --------------------------------------------------------------------------------------------
EXP64_FLUSH = -770.0  # exp(-770) 2^96 is normal; C e^-770 < 2^-1080 for C < 2^31
_SHIFTER64 = 6755399441055744.0  # 1.5 * 2^52
_LN2_HI64 = scalar.LN2_HI  # 32 significant bits: n * _LN2_HI64 is exact for |n| < 2^21
_LN2_LO64 = scalar.LN2_LO
_LOG2E64 = scalar.LOG2E
# q(r) ~ (exp(r) - 1 - r) / r^2 on |r| <= ln2 / 2 + 1e-3: minimax for the relative error of exp
# (Lawson's iteration at 50 digits; 0.009 ulp after rounding the coefficients to float64)
_P = (
    0.5,
    0.16666666666666685,
    0.04166666666666638,
    0.00833333333331668,
    0.0013888888889020035,
    0.00019841269897289941,
    2.4801587073322537e-05,
    2.7557233934438916e-06,
    2.755747686386953e-07,
    2.511236667514622e-08,
    2.0855090711960965e-09,
)
_BIASED_ONE64 = 2.0**EXP_BIAS
_EXP64 = (_LOG2E64, _SHIFTER64, _LN2_HI64, _LN2_LO64, 1.0, EXP64_FLUSH, 0.0, _P)


@njit(**_FMA)
def exp_f64_biased(hi, lo):
    """exp(hi + lo) * 2^96 in float64 for hi <= 0 and |lo| <= ulp(hi): within 0.55 ulp down to
    hi = -770, 0 below (and for -inf / NaN). The scheme of :func:`_exp_biased_pair`: r1 exact,
    the small rest c apart, the rounding error of 1 + r1 kept, a degree-12 polynomial."""
    return _exp_biased(hi, lo, _EXP64)


@intrinsic
def _bits64(typingctx, x):
    """The bits of a float64 as int64 (for x >= 0 they order as x does)."""
    if x != types.float64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


_BITS_ONE64 = np.int64(0x45F0000000000000)  # the bits of 2^96


@njit(**_ROW)
def _bits_below(e):
    """The bits of e >= 0 if e < 2^96, else 0, without a branch: (bits - bits(2^96)) >> 63 is
    all ones exactly when e < 2^96. (A second select on ``e < 2^96`` beside the tie count
    stopped LLVM from vectorising the loop.)"""
    b = _bits64(e)
    return b & ((b - _BITS_ONE64) >> 63)


_KEY64_POSINF = np.int64(0x7FF0000000000000)
_KEY64_NEGINF = np.int64(-0x7FF0000000000001)


@njit(**_ROW)
def row_max_f64(x):
    """:func:`row_max_f32` for a float64 row (int64 keys, 8 lanes)."""
    hi, lo = _key_range(x, np.int64(-9223372036854775808), np.int64(9223372036854775807))
    return _key_value(hi), hi > _KEY64_POSINF or lo < _KEY64_NEGINF


@njit(**_SUM)
def _exp_block_f64(x, m, out):
    """out_j = exp(x_j - m) 2^96 (float64, from the exact difference); returns the number of
    terms equal to 2^96 and the bits of the largest term below it (see :func:`_sum_below_f64`).
    ``out=None`` writes over ``x`` (see :func:`_exp_block_f32`)."""
    ties = 0.0
    top = np.int64(0)
    for j in range(x.shape[0]):
        hi, lo = two_diff_f64(x[j], m)
        e = exp_f64_biased(hi, lo)
        _store(x, out, j, e)
        ties += 1.0 if e >= _BIASED_ONE64 else 0.0
        top = max(top, _bits_below(e))
    return ties, top


@njit(**_FMA)
def _split(v, sigma):
    """(q, v - q) with q = (sigma + v) - sigma: v's bits above ulp(sigma), exactly (no
    ``reassoc`` here: it would fold q to v)."""
    q = (sigma + v) - sigma
    return q, v - q


@njit(**_SUM)
def _split_add(v, sigma, hi, lo):
    """One term of a split sum: (hi + q, lo + (v - q)) with q, v - q :func:`_split` at sigma."""
    q, r = _split(v, sigma)
    return hi + q, lo + r


@njit(**_SUM)
def _sum_below_f64(e, top):
    """The sum of the terms e_j < 2^96 of a block, to 2^-70 relative, vectorised.

    A float64 sum with partial sums in lanes has a worst-case relative error of (C / lanes) u,
    more than the contract allows. Instead each term is split (Rump, Ogita & Oishi's
    ExtractScalar) at sigma = 2^(E + 14), E the exponent of the largest term (``top``, its bits):
    the high parts are multiples of ulp(sigma) = 2^(E - 38) whose total stays below sigma, so
    their sum is exact in any order; the low parts are below 2^(E - 39) each, so their plain sum
    is off by at most (4096 / 8 + 5) u 4096 2^(E - 39) < 2^(E - 70), while the block's sum is
    at least 2^E. Blocks hold at most 4096 terms (BLOCK)."""
    if top == 0:
        return 0.0
    sigma = _key_value(((top >> 52) + 14) << 52)  # a positive float's key is its bits
    hi = 0.0
    lo = 0.0
    for j in range(e.shape[0]):
        v = e[j]
        hi, lo = _split_add(v if v < _BIASED_ONE64 else 0.0, sigma, hi, lo)
    return hi + lo


# --------------------------------------------------------------------------------------------
# The same names for both dtypes (chosen when a kernel is compiled for its logits' dtype)
# --------------------------------------------------------------------------------------------
def row_max(x):
    """(m as float64, whether the row holds a NaN): :func:`row_max_f32` / :func:`row_max_f64`."""


def exp_block(x, m, out):
    """(ties, hint) of :func:`_exp_block_f32` / :func:`_exp_block_f64`."""


def exp_block_inplace(x, m):
    """(ties, hint) of the in-place versions."""


def sum_below(e, hint):
    """:func:`_sum_below_f32` / :func:`_sum_below_f64` (``hint`` from :func:`exp_block`)."""


def elem(x, v):
    """``v`` in the dtype of ``x``'s elements."""


def wide(x):
    """Whether ``x`` holds float64 (a compile-time constant)."""


@overload(wide, jit_options=_ROW)
def _ov_wide(x):
    if x.dtype == types.float64:
        return lambda x: True
    return lambda x: False


@overload(row_max, jit_options=_ROW)
def _ov_row_max(x):
    if x.dtype == types.float32:
        return lambda x: row_max_f32(x)
    return lambda x: row_max_f64(x)


@overload(exp_block, jit_options=_ROW)
def _ov_exp_block(x, m, out):
    if x.dtype == types.float32:
        return lambda x, m, out: (_exp_block_f32(x, m, out), np.int64(0))
    return lambda x, m, out: _exp_block_f64(x, m, out)


@overload(exp_block_inplace, jit_options=_ROW)
def _ov_exp_block_inplace(x, m):
    if x.dtype == types.float32:
        return lambda x, m: (_exp_block_f32(x, m, None), np.int64(0))
    return lambda x, m: _exp_block_f64(x, m, None)


@overload(sum_below, jit_options=_ROW)
def _ov_sum_below(e, hint):
    if e.dtype == types.float32:
        return lambda e, hint: _sum_below_f32(e)
    return lambda e, hint: _sum_below_f64(e, hint)


@overload(elem, jit_options=_ROW)
def _ov_elem(x, v):
    if x.dtype == types.float32:
        return lambda x, v: np.float32(v)
    return lambda x, v: np.float64(v)


@njit(**_ROW)
def exp_block_streaming(x, m, out, out_lo, ahead, at):
    """:func:`exp_block` (``out`` None: :func:`exp_block_inplace`; ``out_lo`` not None: the
    float32 pairs of :func:`_exp_pair_block_f32`) STREAM_STEP elements at a time, each step
    preceded by prefetch hints for as many elements of ``ahead`` from ``at`` on (the next row's
    or the next block's logits), so that memory streams in while exp computes.

    Without the hints a core reads memory only during its rows' max passes and leaves it idle
    during the (longer) exp passes; with them the two overlap: float32 2048 x 32768 forward,
    2 threads, 11.3 -> 9.6 ms; 4096 x 131072 99 -> 77 ms; float64 2048 x 32768 29 -> 25 ms.
    One burst of 256 hints per 4096-element block was slower than none (the hints queue behind
    each other); 256-element steps did best of 128 / 256 / 512 / 1024. Rows of one block gain
    nothing (2048 x 1000 was 10% slower with hints: the hardware prefetcher keeps up). Same
    terms, and ``hint`` the maximum of the steps' own, so the same bits."""
    ties = 0.0
    hint = np.int64(0)
    n = x.shape[0]
    for s0 in range(0, n, STREAM_STEP):
        s1 = min(s0 + STREAM_STEP, n)
        prefetch_span(ahead, at + s0, at + s1)
        if out_lo is not None:
            if out is None:
                t_s = _exp_pair_block_f32(x[s0:s1], m, None, out_lo[s0:s1])
            else:
                t_s = _exp_pair_block_f32(x[s0:s1], m, out[s0:s1], out_lo[s0:s1])
            h_s = np.int64(0)
        elif out is None:
            t_s, h_s = exp_block_inplace(x[s0:s1], m)
        else:
            t_s, h_s = exp_block(x[s0:s1], m, out[s0:s1])
        ties += t_s
        hint = max(hint, h_s)
    return ties, hint


@njit(**_SUM)
def _weighted_shift_sums(x, w, m):
    """(sum w_c, sum w_c (m - x_c)) in float64 (terms >= 0; m - x_c is exact); a -inf logit
    gives +inf (NaN with w_c = 0, as the reference kernels and the oracle)."""
    a = 0.0
    t = 0.0
    for j in range(x.shape[0]):
        a += w[j]
        t += w[j] * (m - np.float64(x[j]))
    return a, t


@njit(**_SUM)
def _soft_target_sums(x, t, w, m, eps, nc):
    """(A, T) = (sum_c a_c, sum_c a_c (m - x_c)), a_c = w_c ((1 - eps) t_c + eps / C); terms with
    a_c = 0 contribute 0 (also where x_c = -inf)."""
    a_sum = 0.0
    t_sum = 0.0
    for j in range(x.shape[0]):
        a = soft_target(w[j], np.float64(t[j]), eps, nc)
        a_sum += a
        t_sum += a * (m - np.float64(x[j])) if a != 0.0 else 0.0
    return a_sum, t_sum


_BITS_INF64 = np.int64(0x7FF0000000000000)


@njit(**_ROW)
def _split_scale(top):
    """sigma = 2^(E + 14) for the largest term's bits ``top`` (see :func:`_sum_below_f64`)."""
    return _key_value(((top >> 52) + 14) << 52)


@njit(**_SUM)
def _weighted_shift_tops(x, w, m):
    a_top = np.int64(0)
    t_top = np.int64(0)
    for j in range(x.shape[0]):
        a_top = max(a_top, _bits64(w[j]))
        t_top = max(t_top, _bits64(w[j] * (m - x[j])))
    return a_top, t_top


@njit(**_SUM)
def _weighted_shift_split(x, w, m, sig_a, sig_t):
    a_hi = 0.0
    a_lo = 0.0
    t_hi = 0.0
    t_lo = 0.0
    for j in range(x.shape[0]):
        a_hi, a_lo = _split_add(w[j], sig_a, a_hi, a_lo)
        t_hi, t_lo = _split_add(w[j] * (m - x[j]), sig_t, t_hi, t_lo)
    return a_hi + a_lo, t_hi + t_lo


@njit(**_ROW)
def _weighted_shift_sums_f64(x, w, m):
    """:func:`_weighted_shift_sums` for float64 rows, each sum split at its largest term as in
    :func:`_sum_below_f64` (a plain sum in lanes could cost float64 ulps); a non-finite term
    (a -inf logit) makes the plain sum's inf or NaN the answer."""
    a_top, t_top = _weighted_shift_tops(x, w, m)
    if a_top >= _BITS_INF64 or t_top >= _BITS_INF64:
        return _weighted_shift_sums(x, w, m)
    if a_top == 0 or t_top == 0:  # all weights 0, or every x_c == m: no split needed
        return _weighted_shift_sums(x, w, m)
    return _weighted_shift_split(x, w, m, _split_scale(a_top), _split_scale(t_top))


@njit(**_SUM)
def _soft_target_tops(x, t, w, m, eps, nc):
    a_top = np.int64(0)
    t_top = np.int64(0)
    for j in range(x.shape[0]):
        a = soft_target(w[j], t[j], eps, nc)
        a_top = max(a_top, _bits64(a))
        t_top = max(t_top, _bits64(a * (m - x[j]) if a != 0.0 else 0.0))
    return a_top, t_top


@njit(**_SUM)
def _soft_target_split(x, t, w, m, eps, nc, sig_a, sig_t):
    a_hi = 0.0
    a_lo = 0.0
    t_hi = 0.0
    t_lo = 0.0
    for j in range(x.shape[0]):
        a = soft_target(w[j], t[j], eps, nc)
        a_hi, a_lo = _split_add(a, sig_a, a_hi, a_lo)
        t_hi, t_lo = _split_add(a * (m - x[j]) if a != 0.0 else 0.0, sig_t, t_hi, t_lo)
    return a_hi + a_lo, t_hi + t_lo


@njit(**_ROW)
def _soft_target_sums_f64(x, t, w, m, eps, nc):
    """:func:`_soft_target_sums` for float64 rows, split as :func:`_weighted_shift_sums_f64`."""
    a_top, t_top = _soft_target_tops(x, t, w, m, eps, nc)
    if a_top >= _BITS_INF64 or t_top >= _BITS_INF64 or a_top == 0 or t_top == 0:
        return _soft_target_sums(x, t, w, m, eps, nc)
    return _soft_target_split(x, t, w, m, eps, nc, _split_scale(a_top), _split_scale(t_top))


def weighted_shift_sums(x, w, m):
    """:func:`_weighted_shift_sums` (float32 rows) / :func:`_weighted_shift_sums_f64`."""


def soft_target_sums(x, t, w, m, eps, nc):
    """:func:`_soft_target_sums` (float32 rows) / :func:`_soft_target_sums_f64`."""


@overload(weighted_shift_sums, jit_options=_ROW)
def _ov_weighted_shift_sums(x, w, m):
    if x.dtype == types.float32:
        return lambda x, w, m: _weighted_shift_sums(x, w, m)
    return lambda x, w, m: _weighted_shift_sums_f64(x, w, m)


@overload(soft_target_sums, jit_options=_ROW)
def _ov_soft_target_sums(x, t, w, m, eps, nc):
    if x.dtype == types.float32:
        return lambda x, t, w, m, eps, nc: _soft_target_sums(x, t, w, m, eps, nc)
    return lambda x, t, w, m, eps, nc: _soft_target_sums_f64(x, t, w, m, eps, nc)


@njit(**_SUM)
def scaled_term(v, f, f_lo):
    """(f + f_lo) v for a stored term v (float64): v f + v f_lo, an FMA, so that the scale
    f + f_lo (a double-double) adds no float64 ulp. Every gradient path (rows, blocks, lanes)
    scales its terms by this and :func:`scaled_term_less`, so that they give the same bits."""
    return v * f + v * f_lo


@njit(**_SUM)
def scaled_term_less(v, f, f_lo, b, a):
    """(f + f_lo) v - b a: v f + (v f_lo - b a), two FMAs."""
    return v * f + (v * f_lo - b * a)


@njit(**_SUM)
def _scale_block(g, f, f_lo):
    """g_j = (f + f_lo) e_j for the stored terms e_j (:func:`scaled_term`), one rounding to g's
    dtype."""
    for j in range(g.shape[0]):
        g[j] = scaled_term(np.float64(g[j]), f, f_lo)


@njit(**_SUM)
def _scale_sub_block(g, f, f_lo, b, w):
    """g_j = (f + f_lo) e_j - b w_j."""
    for j in range(g.shape[0]):
        g[j] = scaled_term_less(np.float64(g[j]), f, f_lo, b, w[j])


@njit(**_SUM)
def _scale_soft_block(g, f, f_lo, b, t, w, eps, nc):
    """g_j = (f + f_lo) e_j - b a_j, a_j the smoothed, weighted soft target."""
    for j in range(g.shape[0]):
        a = soft_target(w[j], np.float64(t[j]), eps, nc)
        g[j] = scaled_term_less(np.float64(g[j]), f, f_lo, b, a)


@njit(**_FMA)
def scale_over(a, a_lo, s):
    """(a + a_lo) / (1 + S) as a double-double (hi, lo), to about 2^-104 relative: 1 + S carried
    exactly (TwoSum), the quotient corrected by its exact FMA residual. The gradient rows are
    a e_j / (1 + S); the rounding of a plain a / (1 + s) would add a float64 ulp to each."""
    z, z_lo = two_diff(1.0, -s)
    f = a / z
    return f, ((a - f * z) + (a_lo - f * z_lo)) / z


@njit(**_FMA)
def two_prod(a, b):
    """(a b, its rounding error), exact with FMA."""
    p = a * b
    return p, a * b - p


# --------------------------------------------------------------------------------------------
# One row: the online pass (max, sum, side sums) and the gradient pass
# --------------------------------------------------------------------------------------------
SIDE_NONE = 0  # no side sums
SIDE_WEIGHT = 1  # (sum w_c, sum w_c (m - x_c)): label smoothing with class indices
SIDE_SOFT = 2  # (sum a_c, sum a_c (m - x_c)): soft targets


@njit(**_ROW)
def _row_one_block(x, dst, inplace, block_max, side, want_k, t, w, eps):
    """:func:`row_online` for a row of one block (no slicing, no rescaling)."""
    m, has_nan = row_max(x)
    if has_nan or m == np.inf:
        return m, 0, 0.0, 0.0, 0.0, True
    block_max[0] = m
    if m == -np.inf:
        return m, 0, 0.0, 0.0, 0.0, False  # all -inf: a NaN row, nothing to compute
    k = max(first_index_of(x, elem(x, m)), 0) if want_k else 0
    a_sum = 0.0
    t_sum = 0.0
    if side == SIDE_WEIGHT:
        a_sum, t_sum = weighted_shift_sums(x, w, m)
    elif side == SIDE_SOFT:
        if x.shape[0] <= SHORT_CLASSES:  # the lanes' order (the same bits forward and fused)
            a_sum, t_sum = short_soft_sums(x, t, w, m, eps, x.shape[0])
        else:
            a_sum, t_sum = soft_target_sums(x, t, w, m, eps, x.shape[0])
    if inplace:
        ties, hint = exp_block_inplace(x, elem(x, m))
    else:
        ties, hint = exp_block(x, elem(x, m), dst)
    nc = x.shape[0]
    # short rows: the lanes' sum of the class-index forward (the same bits in every kernel)
    s = short_row_sum(dst[:nc], None) if nc <= SHORT_CLASSES else sum_below(dst, hint)
    return m, k, s * UNBIAS + (ties - 1.0), a_sum, t_sum, False


@njit(**_ROW)
def row_online(x, dst, at_offset, inplace, block_max, side, want_k, t, w, eps):
    """The first pass over a float32 row, block by block (each block read once from memory).

    Writes the terms e_j = exp(x_j - m_b) 2^96 into ``dst`` (at the row's offsets when
    ``at_offset``, the gradient row; else at the start of each block, a scratch row of
    ``min(C, BLOCK)``), with m_b the running maximum when block b was processed, recorded in
    ``block_max[b]`` (the gradient pass rescales by exp(m_b - m)). ``dst`` may be ``x`` itself
    (``inplace``, with ``at_offset``): each block is read (max, side sums, first index of a new
    maximum) before it is written.

    Returns ``(m, k, S, A, T, bad)``: the maximum, its first index (0 unless ``want_k``),
    S = sum_{j != k} exp(x_j - m) (float64), the side sums (``side``), and whether the row holds
    a NaN or +inf (then the other values are meaningless and the row was not finished)."""
    nc = x.shape[0]
    if nc <= BLOCK:
        return _row_one_block(x, dst, inplace, block_max, side, want_k, t, w, eps)
    m = -np.inf
    # the maximum of the whole row first, for float64 rows (a rescaling by exp(m_b - m) would
    # cost float64 ulps) and float32 rows that stay in L2 (faster: see the module docstring);
    # every block then uses the final m
    premax = wide(x) or nc <= PREMAX_CLASSES
    if premax:
        m, has_nan = row_max(x)
        if has_nan or m == np.inf:
            return m, 0, 0.0, 0.0, 0.0, True
    k = -1
    s = 0.0  # sum of the terms below m, in units of 2^-96
    ties = 0.0  # number of terms equal to 1 (x_j == m)
    a_sum = 0.0
    t_sum = 0.0
    b = 0
    for b0 in range(0, nc, BLOCK):
        b1 = min(b0 + BLOCK, nc)
        xb = x[b0:b1]
        db = dst[b0:b1] if at_offset else dst[: b1 - b0]
        if not premax:
            m_blk, has_nan = row_max(xb)
            if has_nan or m_blk == np.inf:
                return m_blk, 0, 0.0, a_sum, t_sum, True
            if m_blk > m:
                if m > -np.inf:
                    # S below the new maximum: the old terms, and the old maximum's ties, shrink
                    s = (s + ties * 2.0**EXP_BIAS) * exp_diff(m, m_blk)
                    if side != SIDE_NONE and a_sum != 0.0:
                        t_sum += (m_blk - m) * a_sum  # each earlier shift grows by m_blk - m
                ties = 0.0
                m = m_blk
                k = -1
        if want_k and k < 0 and m > -np.inf:
            kb = first_index_of(xb, elem(x, m))
            k = b0 + kb if kb >= 0 else -1
        # side sums before the block is overwritten; while m = -inf (a block of -inf only),
        # m_eff = +inf makes each shift +inf, as it is against the row's eventual maximum
        m_eff = m if m > -np.inf else np.inf
        if side == SIDE_WEIGHT:
            a_b, t_b = weighted_shift_sums(xb, w[b0:b1], m_eff)
            a_sum += a_b
            t_sum += t_b
        elif side == SIDE_SOFT:
            a_b, t_b = soft_target_sums(xb, t[b0:b1], w[b0:b1], m_eff, eps, nc)
            a_sum += a_b
            t_sum += t_b
        if m > -np.inf:
            # the next row's block (premax) or this row's next block is fetched meanwhile
            ahead = nc + b0 if premax else b0 + BLOCK
            if inplace:
                ties_b, hint = exp_block_streaming(xb, elem(x, m), None, None, x, ahead)
            else:
                ties_b, hint = exp_block_streaming(xb, elem(x, m), db, None, x, ahead)
            ties += ties_b
            s += sum_below(db, hint)
        else:
            db[:] = 0.0  # exp(-inf) = 0 against any finite maximum
        block_max[b] = m
        b += 1
    return m, max(k, 0), s * UNBIAS + (ties - 1.0), a_sum, t_sum, False


@njit(**_ROW)
def row_grad_pass(g, block_max, m, f, f_lo, side, b, t, w, eps):
    """Second pass: the stored terms of ``g`` become (f + f_lo) e_j (- b w_j, or - b a_j for
    soft targets), block by block with each block's rescaling exp(m_b - m) (1 exactly for
    float64 rows, whose blocks all use the row's maximum)."""
    nc = g.shape[0]
    blk = 0
    for b0 in range(0, nc, BLOCK):
        b1 = min(b0 + BLOCK, nc)
        r = exp_diff(block_max[blk], m) * UNBIAS  # 2^-96 exactly for the final maximum's blocks
        if side == SIDE_WEIGHT:
            _scale_sub_block(g[b0:b1], f * r, f_lo * r, b, w[b0:b1])
        elif side == SIDE_SOFT:
            _scale_soft_block(g[b0:b1], f * r, f_lo * r, b, t[b0:b1], w[b0:b1], eps, nc)
        else:
            _scale_block(g[b0:b1], f * r, f_lo * r)
        blk += 1


@njit(**_ROW)
def n_blocks(nc):
    return (nc + BLOCK - 1) // BLOCK


MAX_CHUNKS = 256
ELEMENTWISE_COST = cpu.ELEMENTWISE_COST
work = cpu.work_jit


@njit(**_ROW)
def n_chunks(n, nc, element_cost):
    """How many chunks of rows the parallel loop runs: each allocates its own work rows once, so
    small calls get one chunk, large ones at least 16K elements' work a chunk (``cpu.work``:
    each row ROW_COST elements more, each element ``element_cost``, 1 for the softmax losses and
    ELEMENTWISE_COST for the sigmoid ones) and at most MAX_CHUNKS (many more than threads, for
    balance). numba.get_num_threads() would be the natural count, but a kernel that calls it
    cannot be cached."""
    return max(1, min(n, MAX_CHUNKS, work(n, nc, element_cost) >> 14))


@njit(**_ROW)
def _chunk(c, chunks, n):
    """Rows [lo, hi) of chunk c of ``chunks``."""
    return c * n // chunks, (c + 1) * n // chunks


@njit(**_ROW)
def _first_pass(x, g, scratch, with_grad, inplace, block_max, side, want_k, t, w, eps):
    """:func:`row_online` of a softmax row, its terms into the gradient row ``g`` with
    ``with_grad``, else into ``scratch``, and the row's guard: ``(skip, fill, m, k, S, A, T)``.
    When ``skip`` (a NaN or +inf in the row) the row's loss is ``fill`` and, with ``with_grad``,
    ``g`` has been filled with it."""
    m, k, s, a_sum, t_sum, bad = row_online(
        x, g if with_grad else scratch, with_grad, inplace, block_max, side, want_k, t, w, eps
    )
    skip, fill = row_guard(False, bad, m)
    if skip and with_grad:
        g[:] = fill
    return skip, fill, m, k, s, a_sum, t_sum


# the softmax focal loss's constants: its rows are told from the cross-entropy's by this type
FocalParams = collections.namedtuple("FocalParams", "weight ignore_index gamma grad_scale")


def _is_focal(params) -> bool:
    return isinstance(params, types.BaseNamedTuple) and params.instance_class is FocalParams


def chunk_scratch(logits, params, with_grad):
    """The scratch row a chunk's rows share: the forward's block of terms in the logits' dtype
    (nothing with a gradient, whose terms go into the gradient row), or for the softmax focal
    loss of float32 logits the low parts of its terms (:func:`_focal_terms_f32`)."""


@overload(chunk_scratch, jit_options=_OPTS)
def _ov_chunk_scratch(logits, params, with_grad):
    if _is_focal(params) and logits.dtype == types.float32:
        # the low parts of the terms: a whole row with the gradient, else the forward's block
        # of high parts and one of low parts
        return lambda logits, params, with_grad: np.empty(
            logits.shape[1] if with_grad else 2 * min(logits.shape[1], BLOCK), logits.dtype
        )
    return lambda logits, params, with_grad: np.empty(
        0 if with_grad else min(logits.shape[1], BLOCK), logits.dtype
    )


@njit(**_OPTS)
def _softmax_chunk(c, chunks, logits, target, params, with_grad, inplace, out_loss, out_grad):
    """The rows of chunk ``c`` of ``chunks`` of a softmax kernel (cross-entropy or softmax focal
    loss, :func:`ce_row`), the work rows allocated once for the chunk: ``block_max`` and the
    ``scratch`` of :func:`chunk_scratch` (the forward's block of terms; empty with
    ``with_grad``, whose terms go into the gradient row; the low parts of the terms for the
    focal loss of float32 logits). ``with_grad`` and the forward's ``inplace`` are literals:
    the row is compiled for them."""
    n, nc = logits.shape
    scratch = chunk_scratch(logits, params, with_grad)
    block_max = np.empty(n_blocks(nc))
    lo, hi = _chunk(c, chunks, n)
    _softmax_rows(
        lo, hi, logits, target, params, with_grad, inplace, out_loss, out_grad, scratch, block_max
    )


@njit(**_ROW)
def _softmax_rows(
    lo, hi, logits, target, params, with_grad, inplace, out_loss, out_grad, scratch, block_max
):
    """Rows [lo, hi) of :func:`_softmax_chunk`, compiled without reference counts: in a
    function with them, each row's views cost an atomic increment and decrement apiece (a
    quarter of the time of a 10-class row: 112 ns a row before, 85 ns after, at 256 x 10)."""
    for i in range(lo, hi):
        g = out_grad[i]
        out_loss[i] = ce_row(
            logits[i], target[i], params, with_grad, inplace, g, scratch, block_max
        )


# --------------------------------------------------------------------------------------------
# Softmax cross-entropy with class indices
# --------------------------------------------------------------------------------------------
@njit(**_ROW)
def _ce_index_row(x, y, params, with_grad, inplace, g, scratch, block_max):
    """One row of the class-index cross-entropy (and its gradient into ``g``, which is ``x``
    when ``inplace``): x_y is read before anything is written. ``params`` = (weight, the sum of
    the weights, ignore_index, label smoothing, grad_scale)."""
    weight, wsum, ignore_index, eps, grad_scale = params
    if y == ignore_index:  # the row is not read
        if with_grad:
            g[:] = 0.0
        return 0.0
    nc = x.shape[0]
    x_y = np.float64(x[y])
    side = SIDE_WEIGHT if eps != 0.0 else SIDE_NONE
    want_k = with_grad and eps != 0.0
    skip, fill, m, k, s, _, t_sum = _first_pass(
        x, g, scratch, with_grad, inplace, block_max, side, want_k, weight, weight, eps
    )
    if skip:
        return fill
    L = math.log1p(s)
    loss = weight[y] * neg_log_prob(x_y, m, L)  # (m - x_y) + L, the difference exact
    if eps != 0.0:
        loss = (1.0 - eps) * loss + (eps / nc) * (t_sum + wsum * L)
    if not with_grad:
        return loss
    y_top = x_y == m  # y is (one of) the argmax: p_y - 1 = -S / (1 + S)
    z = 1.0 + s
    c_true = (1.0 - eps) * weight[y] * grad_scale
    c_smooth = (eps / nc) * grad_scale
    f, f_lo = scale_over(c_true + c_smooth * wsum, 0.0, s)
    row_grad_pass(g, block_max, m, f, f_lo, side, c_smooth, weight, weight, eps)
    # entries that the scaled row would get by cancellation, recomputed exactly
    e_y = 1.0 if y_top else exp_diff(x_y, m)
    p_y = e_y / z
    g_y = c_true * (-s / z if y_top else p_y - 1.0)
    if eps != 0.0:
        g_y += c_smooth * (argmax_grad(wsum, weight[y], s, z) if y_top else wsum * p_y - weight[y])
        if not y_top:
            g[k] = c_true / z + c_smooth * argmax_grad(wsum, weight[k], s, z)
    g[y] = g_y
    return loss


# --------------------------------------------------------------------------------------------
# Short rows: LANES rows at a time, one row per SIMD lane
# --------------------------------------------------------------------------------------------
SHORT_CLASSES = 32
"""The cross-entropy of rows of at most this many classes (class indices without label
smoothing, and soft targets; forward and fused), the softmax focal loss's forward and KL
(forward and fused) run LANES rows at a time (:func:`short_rows`): the row-by-row
path pays about 85 ns a row in calls and in the scalar remainders of its vector loops (a
10-class row never fills a 16-lane vector)."""
LANES = 16


def exp_lanes(hi, lo):
    """:func:`exp_f32_biased` / :func:`exp_f64_biased`, by the type of ``hi``."""


@overload(exp_lanes, jit_options=_FMA)
def _ov_exp_lanes(hi, lo):
    if hi == types.float32:
        return lambda hi, lo: exp_f32_biased(hi, lo)
    return lambda hi, lo: exp_f64_biased(hi, lo)


@njit(**_FMA)
def add_nonneg(s, c, v):
    """(s + v, c + the rounding error of s + v) for s, v >= 0 (Fast2Sum of the larger and the
    smaller: branch-free, so that loops over lanes vectorise)."""
    a = max(s, v)
    b = min(s, v)
    t = a + b
    return t, c + (b - (t - a))


@njit(**_FMA)
def short_row_sum(e, e_lo):
    """The sum of the terms e_j < 2^96 of a row of at most :data:`SHORT_CLASSES`, in order with
    :func:`add_nonneg`: the sum :func:`lane_sums` makes in each lane, bit for bit, so that the
    forward's lanes and the fused kernel's rows give the same loss. With ``e_lo`` not None
    (float32 pairs) each term is e_j + e_lo_j, exact in float64 (pruned at compile time)."""
    s = 0.0
    c = 0.0
    for j in range(e.shape[0]):
        v = e[j]
        term = np.float64(v) if e_lo is None else np.float64(v) + np.float64(e_lo[j])
        s, c = add_nonneg(s, c, term if v < BIASED_ONE else 0.0)
    return s + c


@njit(**_FMA)
def lane_sums(xt, mx, nc, s_hi, s_lo, ties, pairs, terms):
    """For LANES rows laid out by class (``xt[c * LANES + r]`` = x_rc) with maxima ``mx``: per
    lane r, the terms e = exp(x_rc - m_r) 2^96 below 2^96 summed in float64 with the rounding
    errors kept (Fast2Sum of the larger and the smaller: every term is >= 0), and the count of
    terms equal to 2^96. The inner loop runs over the lanes: the rows' sums never mix. With
    ``pairs`` None each term is :func:`exp_lanes` (the cross-entropy's), kept in ``terms`` by
    class when it is not None (the fused kernel's); otherwise (float32 rows only) the float32
    pair :func:`_exp_biased_pair`, e + e_lo exact in float64 (the softmax focal loss's terms,
    :func:`_focal_terms_f32`): tests numba prunes at compile time."""
    for r in range(LANES):
        s_hi[r] = 0.0
        s_lo[r] = 0.0
        ties[r] = 0.0
    for c in range(nc):
        base = c * LANES
        for r in range(LANES):
            hi, lo = two_diff_lanes(xt[base + r], mx[r])
            if pairs is None:
                e = exp_lanes(hi, lo)
                v = np.float64(e)
                if terms is not None:
                    terms[base + r] = e
            else:
                e, e_lo = _exp_biased_pair(hi, lo, _EXP32)
                v = np.float64(e) + np.float64(e_lo)
            below = e < BIASED_ONE
            s_hi[r], s_lo[r] = add_nonneg(s_hi[r], s_lo[r], v if below else 0.0)
            ties[r] += 0.0 if below else 1.0


def focal_group_sums(xt, mx, nc, s_hi, s_lo, ties):
    """The softmax focal loss's lane sums (:func:`lane_sums`): of float32 pairs for float32
    rows, of the float64 exp for float64 rows."""


@overload(focal_group_sums, jit_options=_FMA)
def _ov_focal_group_sums(xt, mx, nc, s_hi, s_lo, ties):
    if xt.dtype == types.float32:
        return lambda xt, mx, nc, s_hi, s_lo, ties: lane_sums(
            xt, mx, nc, s_hi, s_lo, ties, True, None
        )
    return lambda xt, mx, nc, s_hi, s_lo, ties: lane_sums(xt, mx, nc, s_hi, s_lo, ties, None, None)


@njit(**_FMA)
def short_soft_term(a, m, v):
    """a (m - v) of a soft target's shift sum T, 0 where a = 0 (also for v = -inf)."""
    return a * (m - np.float64(v)) if a != 0.0 else 0.0


@njit(**_FMA)
def compensated_total(s, c):
    """s + c of a compensated sum (s, c), s itself when it is not finite (c is then
    meaningless: an infinite term, as a -inf logit with mass on it, or a NaN)."""
    return s if not math.isfinite(s) else s + c


@njit(**_FMA)
def short_soft_sums(x, t, w, m, eps, nc):
    """(A, T) of :func:`_soft_target_sums` for a row of at most :data:`SHORT_CLASSES`, in order
    with :func:`add_nonneg` (every term is >= 0): the sums :func:`_short_group_soft_sums` makes
    in each lane, bit for bit."""
    a_hi = 0.0
    a_lo = 0.0
    t_hi = 0.0
    t_lo = 0.0
    for j in range(x.shape[0]):
        a = soft_target(w[j], np.float64(t[j]), eps, nc)
        a_hi, a_lo = add_nonneg(a_hi, a_lo, a)
        t_hi, t_lo = add_nonneg(t_hi, t_lo, short_soft_term(a, m, x[j]))
    return compensated_total(a_hi, a_lo), compensated_total(t_hi, t_lo)


@njit(**_FMA)
def _short_group_soft_sums(xt, tt, w, mx, nc, eps, sums):
    """:func:`short_soft_sums` of LANES rows laid out by class (``xt``, ``tt``), one per lane:
    ``sums`` rows (A hi, A lo, T hi, T lo)."""
    for r in range(LANES):
        sums[0, r] = 0.0
        sums[1, r] = 0.0
        sums[2, r] = 0.0
        sums[3, r] = 0.0
    for c in range(nc):
        base = c * LANES
        for r in range(LANES):
            a = soft_target(w[c], np.float64(tt[base + r]), eps, nc)
            sums[0, r], sums[1, r] = add_nonneg(sums[0, r], sums[1, r], a)
            term = short_soft_term(a, np.float64(mx[r]), xt[base + r])
            sums[2, r], sums[3, r] = add_nonneg(sums[2, r], sums[3, r], term)


@njit(**_ROW)
def _short_group_copy(logits, r0, nc, xt, mx):
    """Rows r0 .. r0 + LANES - 1 of ``logits`` copied by class into ``xt`` (x_rc at
    c * LANES + r), their maxima into ``mx`` (:func:`row_max`, in the logits' dtype)."""
    for r in range(LANES):
        x = logits[r0 + r]
        m, _ = row_max(x)
        mx[r] = elem(x, m)
        for c in range(nc):
            xt[c * LANES + r] = x[c]


@njit(**_ROW)
def _by_class(rows, r0, nc, out):
    """Rows r0 .. r0 + LANES - 1 of ``rows`` copied by class into ``out``."""
    for r in range(LANES):
        for c in range(nc):
            out[c * LANES + r] = rows[r0 + r, c]


@njit(**_ROW)
def _short_group_prepare(logits, target, r0, nc, work, terms):
    """The group of LANES rows from r0 laid out by class in the ``work`` arrays (xt, tt, mx,
    s_hi, s_lo, ties, ...): the logits and their maxima (:func:`_short_group_copy`), the soft
    targets when ``target`` is 2-D (:func:`_by_class`), and each lane's sum of terms
    (:func:`lane_sums`; the terms kept by class in ``terms`` unless it is None)."""
    xt, tt, mx, s_hi, s_lo, ties = work[:6]
    _short_group_copy(logits, r0, nc, xt, mx)
    if target.ndim == 2:
        _by_class(target, r0, nc, tt)
    lane_sums(xt, mx, nc, s_hi, s_lo, ties, None, terms)


@njit(**_ROW)
def lane_s(work, r):
    """S = sum_{j != k} exp(x_j - m) of lane r after :func:`_short_group_prepare`: the sum of
    the terms below the maximum and the count of those equal to it, less the one at k."""
    s_hi, s_lo, ties = work[3:6]
    return (s_hi[r] + s_lo[r]) * UNBIAS + (ties[r] - 1.0)


@njit(**_ROW)
def _ce_index_short_rows(lo, hi, logits, target, params, out_loss, work, block_max):
    """Rows [lo, hi) of the class-index forward without label smoothing, for rows of at most
    :data:`SHORT_CLASSES` classes: each group of LANES rows is copied by class into ``xt``, the
    maxima taken row by row (:func:`row_max`), then the terms and their sums computed with one
    row per lane (:func:`lane_sums`); the loss is the row path's, w_y ((m - x_y) +
    log1p(S)) with S = sum_{j != k} exp(x_j - m). Rows with a NaN or an infinite maximum, and
    the last rows that do not fill a group, take the row path (:func:`_ce_index_row`)."""
    xt, mx = work[0], work[2]
    weight = params[0]
    ignore_index = params[2]
    nc = logits.shape[1]
    r0 = lo
    while r0 + LANES <= hi:
        _short_group_prepare(logits, target, r0, nc, work, None)
        for r in range(LANES):
            i = r0 + r
            y = target[i]
            m = np.float64(mx[r])
            if y == ignore_index:
                out_loss[i] = 0.0
            elif not math.isfinite(m):  # NaN, +inf, or every class -inf: the row path's
                out_loss[i] = _ce_index_row(
                    logits[i], y, params, False, False, logits[i], xt[:nc], block_max
                )
            else:
                x_y = np.float64(logits[i, y])
                out_loss[i] = weight[y] * neg_log_prob(x_y, m, math.log1p(lane_s(work, r)))
        r0 += LANES
    for i in range(r0, hi):
        out_loss[i] = _ce_index_row(
            logits[i], target[i], params, False, False, logits[i], xt[:nc], block_max
        )


@njit(**_SUM)
def _scale_lane(g, terms, r, f, f_lo):
    """g_j = (f + f_lo) e_j for the terms of lane r kept by class (``terms[j * LANES + r]``):
    :func:`_scale_block`'s :func:`scaled_term`, so that a row gets the same bits in either
    path."""
    for j in range(g.shape[0]):
        g[j] = scaled_term(np.float64(terms[j * LANES + r]), f, f_lo)


@njit(**_ROW)
def _ce_index_short_rows_grad(
    lo, hi, logits, target, params, inplace, out_loss, out_grad, work, terms, block_max
):
    """Rows [lo, hi) of the fused class-index cross-entropy without label smoothing, for rows of
    at most :data:`SHORT_CLASSES` classes: the lanes of :func:`_ce_index_short_rows` (the same
    S, loss and bits), with the terms e_j 2^96 kept by class in ``terms``; each row's gradient
    is then :func:`_ce_index_row`'s, bit for bit: (f + f_lo) 2^-96 e_j with
    f + f_lo = w_y scale / (1 + S) (:func:`scale_over`), and at the true class
    w_y scale (p_y - 1), or -w_y scale S / (1 + S) when y is an argmax (no cancellation).

    The row path (``_ce_index_row``) takes ignored rows (zero gradient), rows with a NaN or an
    infinite maximum, and the last rows that do not fill a group; a group is read into ``xt``
    before any of its rows is written, so ``out_grad`` may be ``logits`` (``inplace``)."""
    xt, mx = work[0], work[2]
    weight, wsum, ignore_index, eps, grad_scale = params
    nc = logits.shape[1]
    no_scratch = xt[:0]  # the row path keeps its terms in the gradient row
    r0 = lo
    while r0 + LANES <= hi:
        _short_group_prepare(logits, target, r0, nc, work, terms)
        for r in range(LANES):
            i = r0 + r
            y = target[i]
            m = np.float64(mx[r])
            g = out_grad[i]
            if y == ignore_index or not math.isfinite(m):  # the row is not yet written
                out_loss[i] = _ce_index_row(
                    logits[i], y, params, True, inplace, g, no_scratch, block_max
                )
                continue
            s = lane_s(work, r)
            x_y = np.float64(xt[y * LANES + r])
            out_loss[i] = weight[y] * neg_log_prob(x_y, m, math.log1p(s))
            z = 1.0 + s
            c_true = (1.0 - eps) * weight[y] * grad_scale
            c_smooth = (eps / nc) * grad_scale
            f, f_lo = scale_over(c_true + c_smooth * wsum, 0.0, s)
            _scale_lane(g, terms, r, f * UNBIAS, f_lo * UNBIAS)
            if x_y == m:
                g[y] = c_true * (-s / z)
            else:
                g[y] = c_true * (exp_diff(x_y, m) / z - 1.0)
        r0 += LANES
    for i in range(r0, hi):
        out_loss[i] = _ce_index_row(
            logits[i], target[i], params, True, inplace, out_grad[i], no_scratch, block_max
        )


@njit(**_ROW)
def _ce_prob_short_rows(lo, hi, logits, target, params, out_loss, work, block_max):
    """Rows [lo, hi) of the soft-target forward for rows of at most :data:`SHORT_CLASSES`
    classes, LANES at a time as :func:`_ce_index_short_rows`: H = T + A log1p(S) with the
    side sums of :func:`_short_group_soft_sums`; rows with a NaN or an infinite maximum, and the
    last rows, take the row path (:func:`_ce_prob_row`)."""
    xt, tt, mx = work[:3]
    sums = work[6]
    weight, eps, _ = params
    nc = logits.shape[1]
    r0 = lo
    while r0 + LANES <= hi:
        _short_group_prepare(logits, target, r0, nc, work, None)
        _short_group_soft_sums(xt, tt, weight, mx, nc, eps, sums)
        for r in range(LANES):
            i = r0 + r
            m = np.float64(mx[r])
            if not math.isfinite(m):  # NaN, +inf, or every class -inf: the row path's
                out_loss[i] = _ce_prob_row(
                    logits[i], target[i], params, False, False, logits[i], xt[:nc], block_max
                )
            else:
                a_sum = compensated_total(sums[0, r], sums[1, r])
                t_sum = compensated_total(sums[2, r], sums[3, r])
                out_loss[i] = t_sum + a_sum * math.log1p(lane_s(work, r))
        r0 += LANES
    for i in range(r0, hi):
        out_loss[i] = _ce_prob_row(
            logits[i], target[i], params, False, False, logits[i], xt[:nc], block_max
        )


def short_rows(logits, target, params, out_loss, work, block_max, lo, hi):
    """:func:`_focal_short_rows` for :class:`FocalParams`, else :func:`_ce_index_short_rows` for
    class indices and :func:`_ce_prob_short_rows` for soft targets."""


@overload(short_rows, jit_options=_ROW)
def _ov_short_rows(logits, target, params, out_loss, work, block_max, lo, hi):
    if _is_focal(params):
        rows = _focal_short_rows
    else:
        rows = _ce_index_short_rows if target.ndim == 1 else _ce_prob_short_rows
    return lambda logits, target, params, out_loss, work, block_max, lo, hi: rows(
        lo, hi, logits, target, params, out_loss, work, block_max
    )


@njit(**_OPTS)
def short_work(logits, target):
    """The work arrays of the short rows in lanes, allocated once a chunk: the group by class
    (logits, and soft targets when ``target`` is 2-D), the maxima, the sums per lane
    (:func:`lane_sums`), the side sums per lane (soft targets: A and T with their errors; KL:
    its terms' sum and error in the first two rows), L = log1p(S) per lane (KL)."""
    nc = logits.shape[1]
    return (
        np.empty(max(nc, 1) * LANES, logits.dtype),
        np.empty(max(nc, 1) * LANES if target.ndim == 2 else 0, target.dtype),
        np.empty(LANES, logits.dtype),
        np.empty(LANES),
        np.empty(LANES),
        np.empty(LANES),
        np.empty((4, LANES)),
        np.empty(LANES),
    )


@njit(**_OPTS)
def _short_chunk(c, chunks, logits, target, params, out_loss):
    """The rows of chunk ``c`` by :func:`short_rows`."""
    lo, hi = _chunk(c, chunks, logits.shape[0])
    short_rows(logits, target, params, out_loss, short_work(logits, target), np.empty(1), lo, hi)


@njit(**_OPTS)
def _short_chunk_grad(c, chunks, logits, target, params, inplace, out_loss, out_grad):
    """The rows of chunk ``c`` of a fused cross-entropy by :func:`_ce_index_short_rows_grad`
    (class indices) or :func:`_ce_prob_short_rows_grad` (soft targets), with a group's terms."""
    lo, hi = _chunk(c, chunks, logits.shape[0])
    terms = np.empty(max(logits.shape[1], 1) * LANES, logits.dtype)
    work = short_work(logits, target)
    if target.ndim == 1:
        _ce_index_short_rows_grad(
            lo, hi, logits, target, params, inplace, out_loss, out_grad, work, terms, np.empty(1)
        )
    else:
        _ce_prob_short_rows_grad(
            lo, hi, logits, target, params, inplace, out_loss, out_grad, work, terms, np.empty(1)
        )


@njit(parallel=True, **_OPTS)
def cross_entropy_index_fwd(logits, target, weight, ignore_index, label_smoothing, out_loss):
    """:func:`cestudy.kernels.cpu.cross_entropy_index_fwd`, vectorised (same signature and
    semantics); ``logits`` float32 or float64."""
    params = (weight, compensated_sum(weight), ignore_index, label_smoothing, 1.0)
    chunks = n_chunks(logits.shape[0], logits.shape[1], 1)
    short = logits.shape[1] <= SHORT_CLASSES and label_smoothing == 0.0
    for c in prange(chunks):
        if short:
            _short_chunk(c, chunks, logits, target, params, out_loss)
        else:
            _softmax_chunk(c, chunks, logits, target, params, False, False, out_loss, logits)


@njit(parallel=True, **_OPTS)
def cross_entropy_index_fwd_grad(
    logits, target, weight, ignore_index, label_smoothing, grad_scale, out_loss, out_grad
):
    """:func:`cestudy.kernels.cpu.cross_entropy_index_fwd_grad`, vectorised;
    ``out_grad`` may be ``logits`` (the gradient overwrites the logits).

    Two passes over each row: the online pass stores exp(x_j - m_b) 2^96 in the gradient row
    while summing S, then the row is scaled into the gradient (exp 0.87 ulp, S, one rounding:
    <= 2.3 ulp). The true-class entry and, with label smoothing, the argmax entry are recomputed
    by the cancellation-free formulas. Rows of at most SHORT_CLASSES classes without label
    smoothing run LANES at a time (:func:`_ce_index_short_rows_grad`, the same bits)."""
    params = (weight, compensated_sum(weight), ignore_index, label_smoothing, grad_scale)
    inplace = out_grad.ctypes.data == logits.ctypes.data
    chunks = n_chunks(logits.shape[0], logits.shape[1], 1)
    short = logits.shape[1] <= SHORT_CLASSES and label_smoothing == 0.0
    for c in prange(chunks):
        if short:
            _short_chunk_grad(c, chunks, logits, target, params, inplace, out_loss, out_grad)
        else:
            _softmax_chunk(c, chunks, logits, target, params, True, inplace, out_loss, out_grad)


# --------------------------------------------------------------------------------------------
# Soft-target cross-entropy
# --------------------------------------------------------------------------------------------
@njit(**_SUM)
def _scale_soft_lane(g, terms, tt, r, f, f_lo, b, w, eps):
    """g_j = (f + f_lo) e_j - b a_j for the terms and targets of lane r kept by class:
    :func:`_scale_soft_block`'s :func:`scaled_term_less`, so that a row gets the same bits in
    either path."""
    nc = g.shape[0]
    for j in range(nc):
        a = soft_target(w[j], np.float64(tt[j * LANES + r]), eps, nc)
        g[j] = scaled_term_less(np.float64(terms[j * LANES + r]), f, f_lo, b, a)


@njit(**_ROW)
def _ce_prob_short_rows_grad(
    lo, hi, logits, target, params, inplace, out_loss, out_grad, work, terms, block_max
):
    """Rows [lo, hi) of the fused soft-target cross-entropy for rows of at most
    :data:`SHORT_CLASSES` classes: the lanes of :func:`_ce_prob_short_rows` (the same S, A, T
    and loss), the terms kept by class in ``terms``; each row's gradient is then
    :func:`_ce_prob_row`'s, bit for bit: (f + f_lo) 2^-96 e_j - scale a_j with
    f + f_lo = A scale / (1 + S), and at the first argmax k the cancellation-free
    (A - a_k - a_k S) scale / (1 + S). The row path takes rows with a NaN or an infinite
    maximum and the last rows; ``out_grad`` may be ``logits`` (``inplace``: a group is read
    before any of its rows is written)."""
    xt, tt, mx = work[:3]
    sums = work[6]
    weight, eps, grad_scale = params
    nc = logits.shape[1]
    no_scratch = xt[:0]  # the row path keeps its terms in the gradient row
    r0 = lo
    while r0 + LANES <= hi:
        _short_group_prepare(logits, target, r0, nc, work, terms)
        _short_group_soft_sums(xt, tt, weight, mx, nc, eps, sums)
        for r in range(LANES):
            i = r0 + r
            m = np.float64(mx[r])
            g = out_grad[i]
            if not math.isfinite(m):  # NaN, +inf, or every class -inf: the row path's
                out_loss[i] = _ce_prob_row(
                    logits[i], target[i], params, True, inplace, g, no_scratch, block_max
                )
                continue
            a_sum = compensated_total(sums[0, r], sums[1, r])
            t_sum = compensated_total(sums[2, r], sums[3, r])
            s = lane_s(work, r)
            out_loss[i] = t_sum + a_sum * math.log1p(s)
            k = max(first_index_of(logits[i], mx[r]), 0)  # before the row is written
            a_gs, a_gs_lo = two_prod(a_sum, grad_scale)
            f, f_lo = scale_over(a_gs, a_gs_lo, s)
            _scale_soft_lane(g, terms, tt, r, f * UNBIAS, f_lo * UNBIAS, grad_scale, weight, eps)
            a_k = soft_target(weight[k], np.float64(tt[k * LANES + r]), eps, nc)
            g[k] = argmax_grad(a_sum, a_k, s, 1.0 + s) * grad_scale
        r0 += LANES
    for i in range(r0, hi):
        out_loss[i] = _ce_prob_row(
            logits[i], target[i], params, True, inplace, out_grad[i], no_scratch, block_max
        )


@njit(**_ROW)
def _ce_prob_row(x, t, params, with_grad, inplace, g, scratch, block_max):
    """One row of the soft-target cross-entropy: H = T + A log1p(S) with
    A = sum a_c, T = sum a_c (m - x_c); the argmax entry of the gradient is recomputed without
    cancellation as (A - a_k - a_k S) / (1 + S). ``g`` is ``x`` when ``inplace``. ``params`` =
    (weight, label smoothing, grad_scale)."""
    weight, eps, grad_scale = params
    skip, fill, m, k, s, a_sum, t_sum = _first_pass(
        x, g, scratch, with_grad, inplace, block_max, SIDE_SOFT, with_grad, t, weight, eps
    )
    if skip:
        return fill
    if with_grad:
        z = 1.0 + s
        a_gs, a_gs_lo = two_prod(a_sum, grad_scale)
        f, f_lo = scale_over(a_gs, a_gs_lo, s)
        row_grad_pass(g, block_max, m, f, f_lo, SIDE_SOFT, grad_scale, t, weight, eps)
        a_k = soft_target(weight[k], np.float64(t[k]), eps, x.shape[0])
        g[k] = argmax_grad(a_sum, a_k, s, z) * grad_scale
    return t_sum + a_sum * math.log1p(s)


def ce_row(x, t, params, with_grad, inplace, g, scratch, block_max):
    """One row of a softmax loss: :func:`_focal_index_row` for :class:`FocalParams`, else the
    cross-entropy, :func:`_ce_index_row` for a class index ``t`` and :func:`_ce_prob_row` for a
    row of soft targets (``prefer_literal``: the row is compiled for the literal flags of the
    kernel, as when the kernels called it directly)."""


@overload(ce_row, jit_options=_ROW, prefer_literal=True)
def _ov_ce_row(x, t, params, with_grad, inplace, g, scratch, block_max):
    if _is_focal(params):
        row = _focal_index_row
    else:
        row = _ce_index_row if isinstance(t, types.Integer) else _ce_prob_row
    return lambda x, t, params, with_grad, inplace, g, scratch, block_max: row(
        x, t, params, with_grad, inplace, g, scratch, block_max
    )


@njit(parallel=True, **_OPTS)
def cross_entropy_prob_fwd(logits, target, weight, label_smoothing, out_loss):
    """:func:`cestudy.kernels.cpu.cross_entropy_prob_fwd`, vectorised."""
    params = (weight, label_smoothing, 1.0)
    chunks = n_chunks(logits.shape[0], logits.shape[1], 1)
    short = logits.shape[1] <= SHORT_CLASSES
    for c in prange(chunks):
        if short:
            _short_chunk(c, chunks, logits, target, params, out_loss)
        else:
            _softmax_chunk(c, chunks, logits, target, params, False, False, out_loss, logits)


@njit(parallel=True, **_OPTS)
def cross_entropy_prob_fwd_grad(
    logits, target, weight, label_smoothing, grad_scale, out_loss, out_grad
):
    """:func:`cestudy.kernels.cpu.cross_entropy_prob_fwd_grad`, vectorised;
    ``out_grad`` may be ``logits``. Rows of at most SHORT_CLASSES classes run LANES at a time
    (:func:`_ce_prob_short_rows_grad`, the same bits)."""
    params = (weight, label_smoothing, grad_scale)
    inplace = out_grad.ctypes.data == logits.ctypes.data
    chunks = n_chunks(logits.shape[0], logits.shape[1], 1)
    short = logits.shape[1] <= SHORT_CLASSES
    for c in prange(chunks):
        if short:
            _short_chunk_grad(c, chunks, logits, target, params, inplace, out_loss, out_grad)
        else:
            _softmax_chunk(c, chunks, logits, target, params, True, inplace, out_loss, out_grad)


# --------------------------------------------------------------------------------------------
# Softmax focal loss with class indices
# --------------------------------------------------------------------------------------------
def _focal_terms_f64(x, g, scratch, with_grad, inplace, block_max):
    """The first pass of a float64 focal row, as the cross-entropy's: ``(skip, fill, m, k, S)``
    with the terms in the gradient row ``g`` (with ``with_grad``) or ``scratch``."""
    skip, fill, m, k, s, _, _ = _first_pass(
        x, g, scratch, with_grad, inplace, block_max, SIDE_NONE, True, block_max, block_max, 0.0
    )
    return skip, fill, m, k, s


def _focal_terms_f32(x, g, scratch, with_grad, inplace, block_max):
    """The first pass of a float32 focal row with its terms as float32 pairs
    (:func:`_exp_pair_block_f32`, within 0.2 ulp each, so S within 0.2 float32 ulp): the high
    parts in the gradient row ``g`` (with ``with_grad``; ``x`` itself when ``inplace``) or
    ``scratch[:B]``, the low parts in ``scratch`` at the row's offsets (with ``with_grad``,
    :func:`_focal_grad_f32` needs them all) or ``scratch[B:2B]``, B = min(C, BLOCK). The maximum
    of the whole row first: every block uses the final m."""
    nc = x.shape[0]
    m, has_nan = row_max(x)
    skip, fill = row_guard(False, has_nan, m)
    if skip:
        if with_grad:
            g[:] = fill
        return skip, fill, m, 0, 0.0
    mf = np.float32(m)
    k = max(first_index_of(x, mf), 0)
    width = min(nc, BLOCK)
    s = 0.0  # the terms below m, in units of 2^-96
    ties = 0.0
    b = 0
    for b0 in range(0, nc, BLOCK):
        b1 = min(b0 + BLOCK, nc)
        if with_grad:
            hi = g[b0:b1]
            lo = scratch[b0:b1]
        else:
            hi = scratch[: b1 - b0]
            lo = scratch[width : width + b1 - b0]
        # the next row is fetched meanwhile (rows of one block gain nothing from the hints)
        if inplace and nc <= BLOCK:
            ties += _exp_pair_block_f32(x, mf, None, lo)
        elif nc <= BLOCK:
            ties += _exp_pair_block_f32(x, mf, hi, lo)
        elif inplace:
            ties += exp_block_streaming(x[b0:b1], mf, None, lo, x, nc + b0)[0]
        else:
            ties += exp_block_streaming(x[b0:b1], mf, hi, lo, x, nc + b0)[0]
        if nc <= SHORT_CLASSES:  # the lanes' order (the same bits forward and fused)
            s = short_row_sum(hi, lo)
        else:
            s += _sum_pairs_below_f32(hi, lo)
        block_max[b] = m
        b += 1
    return False, 0.0, m, k, s * UNBIAS + (ties - 1.0)


def _focal_grad_f64(g, scratch, block_max, m, f, f_lo):
    """The gradient pass of a float64 focal row: its terms in ``g`` scaled by (f + f_lo)."""
    row_grad_pass(g, block_max, m, f, f_lo, SIDE_NONE, 0.0, block_max, block_max, 0.0)


def _focal_grad_f32(g, scratch, block_max, m, f, f_lo):
    """The gradient pass of a float32 focal row: the pairs (high parts in ``g``, low parts in
    ``scratch``) scaled by f 2^-96 (f_lo is far below a float32 ulp), one rounding each."""
    _scale_pair_block_f32(g, scratch[: g.shape[0]], f * UNBIAS)


def focal_first_pass(x, g, scratch, with_grad, inplace, block_max):
    """:func:`_focal_terms_f32` or :func:`_focal_terms_f64`, by the row's dtype."""


def focal_grad_pass(g, scratch, block_max, m, f, f_lo):
    """:func:`_focal_grad_f32` or :func:`_focal_grad_f64`, by the row's dtype."""


@overload(focal_first_pass, jit_options=_ROW, prefer_literal=True)
def _ov_focal_first_pass(x, g, scratch, with_grad, inplace, block_max):
    return _focal_terms_f64 if x.dtype == types.float64 else _focal_terms_f32


@overload(focal_grad_pass, jit_options=_ROW)
def _ov_focal_grad_pass(g, scratch, block_max, m, f, f_lo):
    return _focal_grad_f64 if g.dtype == types.float64 else _focal_grad_f32


@njit(**_ROW)
def focal_row_factors(s, m, x_y, y_is_k):
    """(ce, a, p_y) of a softmax focal row from its S and maximum m: ce = -log p_y =
    (m - x_y) + log1p(S) and a = 1 - p_y without cancellation (``scalar.focal_parts``: S / (1 +
    S) when y is the argmax k)."""
    ce = neg_log_prob(x_y, m, math.log1p(s))
    a, p_y = focal_parts(s, 1.0 if y_is_k else exp_diff(x_y, m), y_is_k)
    return ce, a, p_y


@njit(**_ROW)
def _focal_short_rows(lo, hi, logits, target, params, out_loss, work, block_max):
    """Rows [lo, hi) of the softmax focal forward for rows of at most :data:`SHORT_CLASSES`
    classes, LANES at a time as :func:`_ce_index_short_rows` (S per lane by
    :func:`focal_group_sums`), the loss per row by :func:`focal_row_factors`; y is k when x_y is
    the maximum and no earlier class holds it. Rows with a NaN or an infinite maximum, and the
    last rows, take the row path (:func:`_focal_index_row`)."""
    xt, tt, mx, s_hi, s_lo, ties = work[:6]
    weight, ignore_index, gamma, _ = params
    nc = logits.shape[1]
    scratch = xt[: nc if wide(xt) else 2 * nc]  # the row path's (chunk_scratch)
    r0 = lo
    while r0 + LANES <= hi:
        _short_group_copy(logits, r0, nc, xt, mx)
        focal_group_sums(xt, mx, nc, s_hi, s_lo, ties)
        for r in range(LANES):
            i = r0 + r
            y = target[i]
            m = np.float64(mx[r])
            if y == ignore_index:
                out_loss[i] = 0.0
            elif not math.isfinite(m):  # NaN, +inf, or every class -inf: the row path's
                out_loss[i] = _focal_index_row(
                    logits[i], y, params, False, False, logits[i], scratch, block_max
                )
            else:
                x_y = np.float64(logits[i, y])
                y_is_k = x_y == m and first_index_of(logits[i], mx[r]) == y
                ce, a, _ = focal_row_factors(lane_s(work, r), m, x_y, y_is_k)
                out_loss[i] = weight[y] * pow_nonneg(a, gamma) * ce
        r0 += LANES
    for i in range(r0, hi):
        out_loss[i] = _focal_index_row(
            logits[i], target[i], params, False, False, logits[i], scratch, block_max
        )


@njit(**_ROW)
def _focal_index_row(x, y, params, with_grad, inplace, g, scratch, block_max):
    """One row of the softmax focal loss FL = -w_y (1 - p_y)^gamma log p_y and its gradient
    d FL / d x_j = w_y (p_j - [j == y]) a^(gamma - 1) (gamma ce p_y + a), a = 1 - p_y, by the
    formulas of ``cpu._focal_row`` (``scalar.focal_parts``: a without cancellation) on the
    terms of the cross-entropy's first pass; ``g`` is ``x`` when ``inplace``. a^gamma
    multiplies the relative error of S by gamma, which float32 terms rounded once (0.87 ulp
    each) would turn into gamma float32 ulp of the loss; so a float32 row's terms are float32
    pairs (:func:`_focal_terms_f32`, 0.2 ulp each, summed exactly in float64). Every entry but
    the true class's is a multiple of e_j: grad_scale w a^gamma inner / a / (1 + S) e_j.
    ``params``: :class:`FocalParams`. ``g`` has the logits' dtype (the float32 pass keeps the
    low parts of its terms in ``scratch``)."""
    weight, ignore_index, gamma, grad_scale = params
    if y == ignore_index:  # the row is not read
        if with_grad:
            g[:] = 0.0
        return 0.0
    x_y = np.float64(x[y])
    skip, fill, m, k, s = focal_first_pass(x, g, scratch, with_grad, inplace, block_max)
    if skip:
        return fill
    w = weight[y]
    ce, a, p_y = focal_row_factors(s, m, x_y, y == k)
    a_gamma = pow_nonneg(a, gamma)
    if with_grad:
        inner = focal_inner(gamma, ce, p_y, a)
        # a = 0: every other p_j is 0, and so is its entry
        c = 0.0 if a == 0.0 else w * a_gamma * inner * grad_scale / a
        f, f_lo = scale_over(c, 0.0, s)
        focal_grad_pass(g, scratch, block_max, m, f, f_lo)
        g[y] = -w * a_gamma * inner * grad_scale
    return w * a_gamma * ce


@njit(parallel=True, **_OPTS)
def softmax_focal_fwd(logits, target, weight, ignore_index, gamma, out_loss):
    """:func:`cestudy.kernels.cpu.softmax_focal_fwd`, vectorised (same signature and
    semantics; ``logits`` float32 or float64): FL_i = -w_y (1 - p_y)^gamma log p_y per row,
    by :func:`_focal_index_row`."""
    chunks = n_chunks(logits.shape[0], logits.shape[1], 1)
    short = logits.shape[1] <= SHORT_CLASSES
    for c in prange(chunks):
        params = FocalParams(weight, ignore_index, gamma, 1.0)
        if short:
            _short_chunk(c, chunks, logits, target, params, out_loss)
        else:
            _softmax_chunk(c, chunks, logits, target, params, False, False, out_loss, logits)


@njit(parallel=True, **_OPTS)
def softmax_focal_fwd_grad(
    logits, target, weight, ignore_index, gamma, grad_scale, out_loss, out_grad
):
    """:func:`cestudy.kernels.cpu.softmax_focal_fwd_grad`, vectorised: the losses and
    ``grad_scale`` d FL_i / d x_ij = w_y (p_j - [j == y]) a^(gamma - 1) (gamma ce p_y + a) with
    a = 1 - p_y, ce = -log p_y (:func:`_focal_index_row`); ``out_grad`` may be ``logits``."""
    inplace = out_grad.ctypes.data == logits.ctypes.data
    chunks = n_chunks(logits.shape[0], logits.shape[1], 1)
    for c in prange(chunks):
        params = FocalParams(weight, ignore_index, gamma, grad_scale)
        _softmax_chunk(c, chunks, logits, target, params, True, inplace, out_loss, out_grad)


# --------------------------------------------------------------------------------------------
# Element-wise sigmoid losses: binary cross-entropy with logits, sigmoid focal loss
# --------------------------------------------------------------------------------------------
@njit(**_FMA)
def exp_neg(d):
    """exp(d) for d <= 0 in float64, vectorisable, relative error < 7e-12; 0 for d < -708
    (and for d = -inf). NaN propagates through the polynomial."""
    p, n = _exp_parts(max(d, EXP_FLUSH))
    res = p * _bits_to_float64((np.int64(n) + 1023) << 52)
    return 0.0 if d < EXP_FLUSH else res


@njit(**_FMA)
def log1p_unit(e):
    """log1p(e) for 0 <= e <= 1 in float64, vectorisable, relative error < 1e-13:
    2 atanh(s) with s = e / (2 + e) <= 1/3, the series sum_k s^(2k+1) / (2k+1) to k = 12."""
    s = e / (2.0 + e)
    s2 = s * s
    p = 1.0 / 25.0
    p = p * s2 + 1.0 / 23.0
    p = p * s2 + 1.0 / 21.0
    p = p * s2 + 1.0 / 19.0
    p = p * s2 + 1.0 / 17.0
    p = p * s2 + 1.0 / 15.0
    p = p * s2 + 1.0 / 13.0
    p = p * s2 + 1.0 / 11.0
    p = p * s2 + 1.0 / 9.0
    p = p * s2 + 1.0 / 7.0
    p = p * s2 + 1.0 / 5.0
    p = p * s2 + 1.0 / 3.0
    p = p * s2 + 1.0
    return 2.0 * s * p


# --------------------------------------------------------------------------------------------
# The element functions of the sigmoid losses, chosen at compile time by the type of ``params``
# --------------------------------------------------------------------------------------------
# BCE with logits: the (N, C) or (1, C) weight and pos_weight of a kernel, the rows of one row,
# the slices of one block
BceParams = collections.namedtuple("BceParams", "weight pos_weight")
# the sigmoid focal loss with gamma in {0, 1, 2}: b^gamma by multiplications, vectorised
SigmoidFocalParams = collections.namedtuple("SigmoidFocalParams", "alpha gamma")
# the sigmoid focal loss with any other gamma: b^gamma by libm's pow (a scalar loop)
SigmoidFocalPowParams = collections.namedtuple("SigmoidFocalPowParams", "alpha gamma")


def _params_of(params, cls) -> bool:
    return isinstance(params, types.BaseNamedTuple) and params.instance_class is cls


@njit(**_ROW)
def _bce_loss(sp_pos, sp_neg, tj, wj, pwj):
    """w (pw t softplus(-x) + (1 - t) softplus(x)) (``scalar.bce_logits``), both terms >= 0,
    the sum an explicit FMA (:func:`fma64`: the same bits in the forward and fused loops)."""
    return wj * fma64(pwj * tj, sp_neg, (1.0 - tj) * sp_pos)


@njit(**_FMA)
def _bce_elem(sp_pos, sp_neg, sig_pos, sig_neg, tj, wj, pwj):
    """(loss, d loss / dx) of BCE with logits from softplus(+-x) and s(+-x) (``scalar.bce_logits``
    and ``bce_logits_grad``): :func:`_bce_loss` and w ((1 - t) s(x) - pw t s(-x))."""
    loss = _bce_loss(sp_pos, sp_neg, tj, wj, pwj)
    return loss, wj * ((1.0 - tj) * sig_pos - pwj * tj * sig_neg)


@njit(**_ROW)
def _focal_factors(sp_pos, sp_neg, sig_pos, sig_neg, tj, ej, alpha):
    """(ce, b, alpha_t, alpha_t_lo) of the sigmoid focal loss: ce = t softplus(-x) +
    (1 - t) softplus(x) (BCE with logits, a sum of two terms >= 0, with 1 - t = w + w_lo exact
    (``scalar.one_minus``) and explicit FMAs: :func:`fma64`, so the loss's bits do not depend on
    whether the loop also computes the gradient), b = 1 - p_t = t s(-x) + (1 - t) s(x) from
    e = exp(-|x|) by ``scalar.one_minus_p_t``: one quotient (c0 + c1 e) / (1 + e), to 1.8 ulp
    where the sum of two rounded sigmoids gave 2.9, an error that b^gamma multiplies by gamma,
    and alpha_t = alpha t + (1 - alpha)(1 - t) as an unevaluated pair
    (``scalar.alpha_t_pair``).

    float32 rows pass ``ej`` None (a test numba prunes at compile time) and get alpha_t_lo
    None: their float64 arithmetic is far within a float32 ulp with the plain sums (ce, b and
    alpha_t each an FMA of the rounded 1 - t), and the corrected forms in the loop made LLVM
    stop vectorising it (12 times slower at 256 x 1000)."""
    if ej is None:
        a_t = fma64(alpha, tj, (1.0 - alpha) * (1.0 - tj)) if alpha >= 0.0 else 1.0
        ce = fma64(tj, sp_neg, (1.0 - tj) * sp_pos)
        return ce, fma64(tj, sig_neg, (1.0 - tj) * sig_pos), a_t, None
    w, w_lo = one_minus(tj)
    lo = w_lo * sp_pos  # (1 - t) softplus(x) = w softplus(x) + lo; lo dropped where not finite
    ce = fma64(tj, sp_neg, fma64(w, sp_pos, lo if lo - lo == 0.0 else 0.0))
    pos = sig_pos >= sig_neg  # x >= 0 (where they tie, e = 1 and both forms agree)
    b = one_minus_p_t(tj, ej, pos, sig_pos if pos else sig_neg)
    a_t, a_t_lo = alpha_t_pair(tj, w, w_lo, alpha)
    return ce, b, a_t, a_t_lo


@njit(**_FMA)
def _focal_combine(ce, b, bg, bg1, sig_pos, sig_neg, tj, alpha_t, alpha_t_lo, gamma):
    """(loss, d loss / dx) of the sigmoid focal loss (``scalar.sigmoid_focal``, the same
    operations) from ce (BCE with logits), b = 1 - p_t, bg = b^gamma and bg1 = b^(gamma - 1):
    alpha_t ce b^gamma and alpha_t [(s(x) - t) b^gamma + gamma ce b^(gamma - 1) (1 - 2t) s(x)
    s(-x)], alpha_t = alpha t + (1 - alpha)(1 - t) (:func:`_focal_factors`; alpha_t ce with one
    rounding from the pair (``scalar.times_pair``) unless ``alpha_t_lo`` is None, the float32
    rows). The second term is dropped where b = 0 or gamma = 0 (a select: where b underflowed,
    b^(gamma - 1) may be inf and the term 0 * inf, while its limit is 0). (1 - t) s(x) -
    t s(-x) is s(x) or -s(-x) exactly for t in {0, 1}; for soft t it cancels, as the
    contract's measure (3) allows."""
    if alpha_t_lo is None:  # pruned at compile time
        loss = alpha_t * ce * bg
    else:
        loss = times_pair(alpha_t, alpha_t_lo, ce) * bg
    g = ((1.0 - tj) * sig_pos - tj * sig_neg) * bg
    extra = gamma * ce * bg1 * ((1.0 - 2.0 * tj) * sig_pos * sig_neg)
    return loss, alpha_t * (g + extra if b != 0.0 and gamma != 0.0 else g)


@njit(**_FMA)
def _focal_elem(sp_pos, sp_neg, sig_pos, sig_neg, tj, ej, alpha, gamma):
    """The sigmoid focal loss for gamma in {0, 1, 2} (:func:`_focal_combine`) with
    (ce, b) of :func:`_focal_factors`: b^gamma = 1, b or b b (the correctly rounded
    powers, the bits libm's pow gives: ``scalar.pow_nonneg``) and b^(gamma - 1) = b or 1 exactly,
    chosen by selects on the call's gamma: no pow, and the loop stays vectorised."""
    ce, b, alpha_t, alpha_t_lo = _focal_factors(sp_pos, sp_neg, sig_pos, sig_neg, tj, ej, alpha)
    bg = 1.0 if gamma == 0.0 else (b if gamma == 1.0 else b * b)
    bg1 = b if gamma == 2.0 else 1.0
    return _focal_combine(ce, b, bg, bg1, sig_pos, sig_neg, tj, alpha_t, alpha_t_lo, gamma)


@njit(**_FMA)
def _focal_pow_elem(sp_pos, sp_neg, sig_pos, sig_neg, tj, ej, alpha, gamma):
    """The sigmoid focal loss for any other gamma: b^gamma by ``scalar.pow_nonneg`` (libm's
    pow, < 1 ulp; 0 for b = 0) and b^(gamma - 1) = b^gamma / b as the reference kernel. There is
    no vectorised log accurate enough for exp(gamma log b) in float64 (gamma |log b| ulps of the
    log would go into the result), so the loops over this element stay scalar: a call with such
    a gamma runs at about the reference kernel's speed."""
    ce, b, alpha_t, alpha_t_lo = _focal_factors(sp_pos, sp_neg, sig_pos, sig_neg, tj, ej, alpha)
    bg = pow_nonneg(b, gamma)
    return _focal_combine(ce, b, bg, bg / b, sig_pos, sig_neg, tj, alpha_t, alpha_t_lo, gamma)


def sigmoid_elem(params, j, sp_pos, sp_neg, sig_pos, sig_neg, tj, ej):
    """(loss, d loss / dx) of element j of a sigmoid loss from softplus(+-x), s(+-x) and
    e = exp(-|x|): BCE with logits for :class:`BceParams` (element j of its weight rows), the
    sigmoid focal loss for :class:`SigmoidFocalParams` / :class:`SigmoidFocalPowParams`."""


@overload(sigmoid_elem, jit_options=_FMA)
def _ov_sigmoid_elem(params, j, sp_pos, sp_neg, sig_pos, sig_neg, tj, ej):
    if _params_of(params, BceParams):
        return lambda params, j, sp_pos, sp_neg, sig_pos, sig_neg, tj, ej: _bce_elem(
            sp_pos, sp_neg, sig_pos, sig_neg, tj, params.weight[j], params.pos_weight[j]
        )
    elem = _focal_elem if _params_of(params, SigmoidFocalParams) else _focal_pow_elem
    return lambda params, j, sp_pos, sp_neg, sig_pos, sig_neg, tj, ej: elem(
        sp_pos, sp_neg, sig_pos, sig_neg, tj, ej, params.alpha, params.gamma
    )


def row_params(params, i):
    """The ``params`` of row i: :class:`BceParams` of the rows of its (N, C) / (1, C) weights;
    the focal loss's scalars as they are."""


@overload(row_params, jit_options=_OPTS)
def _ov_row_params(params, i):
    if _params_of(params, BceParams):
        return lambda params, i: BceParams(
            bcast_row(params.weight, i), bcast_row(params.pos_weight, i)
        )
    return lambda params, i: params


@njit(**_SUM)
def _sigmoid_row_f32(x, t, params, grad_scale, lrow, g, over_x):
    """One float32 row of a sigmoid loss (:func:`sigmoid_elem`), in float64: e = exp(-|x|)
    (:func:`exp_neg`, 7e-12), lp = log1p(e) (:func:`log1p_unit`, 1e-13), softplus(+-x) =
    max(+-x, 0) + lp, s(+-x) = 1 / (1 + e) or e / (1 + e): one exp, one log1p and one division
    per element, far within a float32 ulp (the focal loss's b^2 doubles 1e-11, no more). Losses
    into ``lrow`` and gradients into ``g`` unless they are None (a test numba prunes at compile
    time: a flag tested in the loop would keep LLVM from vectorising it); with ``over_x`` not
    None (``g`` None) the gradients are written over ``x``, one array read and written, which
    LLVM vectorises (see :func:`_exp_block_f32`). Returns the row sum (float64 partial sums of
    non-negative terms: relative error <= C 2^-53, far below a float32 ulp). A NaN logit
    propagates through exp_neg; x = +-inf gives e = 0, softplus(+-x) = +inf or 0, as libm."""
    total = 0.0
    for j in range(x.shape[0]):
        v = np.float64(x[j])
        e = exp_neg(-abs(v))
        lp = log1p_unit(e)
        r = 1.0 / (1.0 + e)
        er = e * r
        pos = v >= 0.0
        loss, gj = sigmoid_elem(
            params,
            j,
            max(v, 0.0) + lp,
            max(-v, 0.0) + lp,
            r if pos else er,
            er if pos else r,
            np.float64(t[j]),
            None,
        )
        total += loss
        if lrow is not None:  # pruned at compile time when None
            lrow[j] = loss
        if g is not None:  # pruned at compile time when None
            g[j] = np.float32(gj * grad_scale)
        elif over_x is not None:  # pruned at compile time when None
            x[j] = np.float32(gj * grad_scale)
    return total


# float64: fdlibm's log1p on [0, 1] (< 1 ulp), the float64 exp, split block sums
_LG1 = 6.666666666666735130e-01
_LG2 = 3.999999999940941908e-01
_LG3 = 2.857142874366239149e-01
_LG4 = 2.222219843214978396e-01
_LG5 = 1.818357216161805012e-01
_LG6 = 1.531383769920937332e-01
_LG7 = 1.479819860511658591e-01
_SQRT2 = 1.4142135623730951


@njit(**_FMA)
def log1p_f64(e):
    """log1p(e) for 0 <= e <= 1 in float64 to < 1 ulp, without a branch: fdlibm's log1p
    restricted to this range. For 1 + e >= sqrt 2 it takes log(2 (u / 2)) with u = fl(1 + e),
    f = u / 2 - 1 exact, and c = ((1 + e) - u) / u the first-order correction for the rounding
    of u; below, f = e. Then log(1 + f) = f - (hfsq - s (hfsq + R(s^2))), s = f / (2 + f),
    hfsq = f^2 / 2, R fdlibm's Lg1..Lg7."""
    u = 1.0 + e
    big = u >= _SQRT2
    f = 0.5 * u - 1.0 if big else e
    k = 1.0 if big else 0.0
    c = (e - (u - 1.0)) / u if big else 0.0
    hfsq = 0.5 * f * f
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    r = z * (_LG1 + w * (_LG3 + w * (_LG5 + w * _LG7))) + w * (_LG2 + w * (_LG4 + w * _LG6))
    return k * _LN2_HI64 - ((hfsq - (s * (hfsq + r) + (k * _LN2_LO64 + c))) - f)


@njit(**_SUM)
def _exp_log1p_block(x, e, lp):
    """e_j = exp(-|x_j|) (one rounding into the subnormals) and lp_j = log1p(e_j), float64;
    a NaN logit gives e_j = NaN (the exp's flush select would give 0, and a finite gradient).
    Loops of their own: with the rest of the element's arithmetic in the same loop, LLVM no
    longer inlines the exp and log1p calls, and a loop with a call stays scalar; the exp and
    the log1p apart take 3/4 of the time they take in one loop (2560 elements: 2.7-3.2 us
    against 3.7-4.0)."""
    for j in range(x.shape[0]):
        v = x[j]
        ej = exp_f64_biased(-abs(v), 0.0) * UNBIAS
        e[j] = ej if v == v else v
    for j in range(x.shape[0]):
        lp[j] = log1p_f64(e[j])


@njit(**_FMA)
def _sigmoid_parts_f64(v, ej, lpj):
    """(softplus(x), softplus(-x), s(x), s(-x)) to float64 accuracy from e = exp(-|x|) and
    lp = log1p(e): max(+-x, 0) + lp, and the sigmoid 1 / (1 + e) with 1 + e carried exactly
    (Fast2Sum) and the quotient corrected to first order (``scalar.sigmoid_pair``), e / (1 + e)
    its product with e."""
    pos = v >= 0.0
    sp_pos = (v if pos else 0.0) + lpj
    sp_neg = (0.0 if pos else -v) + lpj
    z = 1.0 + ej
    z_lo = ej - (z - 1.0)
    r = 1.0 / z
    r = r - r * (r * z_lo)
    er = ej * r
    return sp_pos, sp_neg, (r if pos else er), (er if pos else r)


@njit(**_SUM)
def _sigmoid_block_f64(x, e, lp, t, params, b0, grad_scale, out, g, over_x):
    """Losses of a float64 block of a sigmoid loss into ``out`` (gradients into ``g``, or over
    ``x`` with ``over_x`` not None: both tests pruned at compile time) from its exp and log1p
    terms; returns the bits of the largest loss (losses are >= 0: their bits order as they do;
    NaN and inf come out above). ``params`` are the row's (the block starts at class ``b0``:
    row functions take no slices of them, since a function without reference counting cannot
    return a view)."""
    top = np.int64(0)
    for j in range(x.shape[0]):
        sp_pos, sp_neg, sig_pos, sig_neg = _sigmoid_parts_f64(x[j], e[j], lp[j])
        loss, gj = sigmoid_elem(params, b0 + j, sp_pos, sp_neg, sig_pos, sig_neg, t[j], e[j])
        out[j] = loss
        top = max(top, _bits64(loss))
        if g is not None:  # pruned at compile time when None
            g[j] = gj * grad_scale
        elif over_x is not None:  # pruned at compile time when None
            x[j] = gj * grad_scale
    return top


@njit(**_SUM)
def _plain_sum(e):
    s = 0.0
    for j in range(e.shape[0]):
        s += e[j]
    return s


@njit(**_SUM)
def _split_sum_f64(e, top):
    """The sum of a block of terms >= 0 to 2^-70 relative (:func:`_sum_below_f64`'s split);
    the plain sum where a term is inf or NaN."""
    if top >= _BITS_INF64:
        return _plain_sum(e)
    if top == 0:
        return 0.0
    sigma = _split_scale(top)
    hi = 0.0
    lo = 0.0
    for j in range(e.shape[0]):
        hi, lo = _split_add(e[j], sigma, hi, lo)
    return hi + lo


@njit(**_ROW)
def _sigmoid_row_f64(x, t, params, grad_scale, lrow, g, over_x, scratch):
    """One float64 row of a sigmoid loss, block by block: exp and log1p terms (into two
    thirds of ``scratch``, 3 min(C, BLOCK) long), losses (into ``lrow``, or the last third),
    gradients (into ``g``, or over ``x`` with ``over_x``), and the row's sum, each block's
    split-summed and the blocks' compensated (Neumaier)."""
    width = scratch.shape[0] // 3
    e = scratch[:width]
    lp = scratch[width : 2 * width]
    rest = scratch[2 * width :]
    total = 0.0
    comp = 0.0
    for b0 in range(0, x.shape[0], BLOCK):
        b1 = min(b0 + BLOCK, x.shape[0])
        nb = b1 - b0
        # ``lrow is None`` and ``g is None`` are decided when numba compiles the row
        if lrow is None:
            out = rest[:nb]
        else:
            out = lrow[b0:b1]
        xb = x[b0:b1]
        tb = t[b0:b1]
        _exp_log1p_block(xb, e[:nb], lp[:nb])
        if g is None:
            top = _sigmoid_block_f64(
                xb, e[:nb], lp[:nb], tb, params, b0, grad_scale, out, None, over_x
            )
        else:
            top = _sigmoid_block_f64(
                xb, e[:nb], lp[:nb], tb, params, b0, grad_scale, out, g[b0:b1], over_x
            )
        total, comp = neumaier_add(total, comp, _split_sum_f64(out, top))
    return total + comp


def sigmoid_row(x, t, params, grad_scale, lrow, g, scratch):
    """A row of a sigmoid loss (:func:`sigmoid_elem`): :func:`_sigmoid_row_f32` for float32
    rows (float64 arithmetic at 8 lanes; its exp and log1p are accurate to 1e-11, plenty for a
    float32 result), :func:`_sigmoid_row_f64` for float64 rows."""


def sigmoid_row_inplace(x, t, params, grad_scale, lrow, scratch):
    """:func:`sigmoid_row` with the gradient written over ``x``."""


@overload(sigmoid_row, jit_options=_ROW)
def _ov_sigmoid_row(x, t, params, grad_scale, lrow, g, scratch):
    if x.dtype == types.float32:
        return lambda x, t, params, grad_scale, lrow, g, scratch: _sigmoid_row_f32(
            x, t, params, grad_scale, lrow, g, None
        )
    return lambda x, t, params, grad_scale, lrow, g, scratch: _sigmoid_row_f64(
        x, t, params, grad_scale, lrow, g, None, scratch
    )


@overload(sigmoid_row_inplace, jit_options=_ROW)
def _ov_sigmoid_row_inplace(x, t, params, grad_scale, lrow, scratch):
    if x.dtype == types.float32:
        return lambda x, t, params, grad_scale, lrow, scratch: _sigmoid_row_f32(
            x, t, params, grad_scale, lrow, None, True
        )
    return lambda x, t, params, grad_scale, lrow, scratch: _sigmoid_row_f64(
        x, t, params, grad_scale, lrow, None, True, scratch
    )


def grad_row(out_grad, i):
    """Row i of ``out_grad``, or None when it is None (a forward kernel)."""


@overload(grad_row, jit_options=_OPTS)
def _ov_grad_row(out_grad, i):
    if out_grad is types.none:
        return lambda out_grad, i: None
    return lambda out_grad, i: out_grad[i]


@njit(**_OPTS)
def _sigmoid_chunk(c, chunks, logits, target, params, grad_scale, inplace, out_loss, out_grad):
    """The rows of chunk ``c`` of ``chunks`` of a sigmoid loss (``params``: :class:`BceParams`,
    :class:`SigmoidFocalParams` or :class:`SigmoidFocalPowParams`; one scratch of
    3 min(C, BLOCK) float64 for the chunk's float64 rows): losses into ``out_loss`` (per
    element, or the row sums), gradients into ``out_grad`` unless it is None (the forward), over
    the logits when ``inplace``."""
    n, nc = logits.shape
    scratch = np.empty(3 * min(nc, BLOCK) if wide(logits) else 0)
    lo, hi = _chunk(c, chunks, n)
    for i in range(lo, hi):
        x = logits[i]
        t = target[i]
        p = row_params(params, i)
        lrow = loss_row(out_loss, i)
        if inplace:
            total = sigmoid_row_inplace(x, t, p, grad_scale, lrow, scratch)
        else:
            total = sigmoid_row(x, t, p, grad_scale, lrow, grad_row(out_grad, i), scratch)
        store_row_sum(out_loss, i, total)


@njit(parallel=True, **_OPTS)
def bce_with_logits_fwd(logits, target, weight, pos_weight, out_loss):
    """:func:`cestudy.kernels.cpu.bce_with_logits_fwd`, vectorised. ``weight`` and
    ``pos_weight`` are (N, C) or, when the same for every row, (1, C): contiguous rows keep the
    loop vectorised (zero-stride broadcast views made it 6x slower). ``out_loss`` (N, C) for
    per-element losses, (N,) for row sums."""
    chunks = n_chunks(logits.shape[0], logits.shape[1], ELEMENTWISE_COST)
    for c in prange(chunks):
        params = BceParams(weight, pos_weight)
        _sigmoid_chunk(c, chunks, logits, target, params, 1.0, False, out_loss, None)


@njit(parallel=True, **_OPTS)
def bce_with_logits_fwd_grad(logits, target, weight, pos_weight, grad_scale, out_loss, out_grad):
    """:func:`cestudy.kernels.cpu.bce_with_logits_fwd_grad`, vectorised (weights and
    ``out_loss`` as in :func:`bce_with_logits_fwd`); ``out_grad`` may be ``logits``."""
    inplace = out_grad.ctypes.data == logits.ctypes.data
    chunks = n_chunks(logits.shape[0], logits.shape[1], ELEMENTWISE_COST)
    for c in prange(chunks):
        params = BceParams(weight, pos_weight)
        _sigmoid_chunk(c, chunks, logits, target, params, grad_scale, inplace, out_loss, out_grad)


# --------------------------------------------------------------------------------------------
# Sigmoid focal loss (torchvision.ops.sigmoid_focal_loss): BCE's rows with another element
# --------------------------------------------------------------------------------------------
@njit(**_ROW)
def pow_free(gamma):
    """Whether b^gamma is a product of b's (gamma in {0, 1, 2}: :class:`SigmoidFocalParams`)."""
    return gamma == 0.0 or gamma == 1.0 or gamma == 2.0


@njit(parallel=True, **_OPTS)
def sigmoid_focal_fwd(logits, target, alpha, gamma, out_loss):
    """:func:`cestudy.kernels.cpu.sigmoid_focal_fwd`, vectorised (same signature and
    semantics; ``logits`` float32 or float64): FL = alpha_t ce (1 - p_t)^gamma per element with
    ce the BCE with logits, 1 - p_t = t s(-x) + (1 - t) s(x) (:func:`_focal_combine`), on the
    rows of BCE with logits (:func:`_sigmoid_row_f32`, :func:`_sigmoid_row_f64`). gamma in
    {0, 1, 2} (torchvision's default 2) runs vectorised (:func:`_focal_elem`); any other gamma
    calls libm's pow per element (:func:`_focal_pow_elem`, scalar). ``out_loss`` (N, C) for
    per-element losses, (N,) for row sums."""
    chunks = n_chunks(logits.shape[0], logits.shape[1], ELEMENTWISE_COST)
    vectorised = pow_free(gamma)
    for c in prange(chunks):
        if vectorised:
            params = SigmoidFocalParams(alpha, gamma)
            _sigmoid_chunk(c, chunks, logits, target, params, 1.0, False, out_loss, None)
        else:
            params_pow = SigmoidFocalPowParams(alpha, gamma)
            _sigmoid_chunk(c, chunks, logits, target, params_pow, 1.0, False, out_loss, None)


@njit(parallel=True, **_OPTS)
def sigmoid_focal_fwd_grad(logits, target, alpha, gamma, grad_scale, out_loss, out_grad):
    """:func:`cestudy.kernels.cpu.sigmoid_focal_fwd_grad`, vectorised (as
    :func:`sigmoid_focal_fwd`): the losses and ``grad_scale`` alpha_t [(s(x) - t) b^gamma +
    gamma ce b^(gamma - 1) (1 - 2t) s(x) s(-x)], b = 1 - p_t; ``out_grad`` may be ``logits``."""
    inplace = out_grad.ctypes.data == logits.ctypes.data
    chunks = n_chunks(logits.shape[0], logits.shape[1], ELEMENTWISE_COST)
    vectorised = pow_free(gamma)
    for c in prange(chunks):
        if vectorised:
            params = SigmoidFocalParams(alpha, gamma)
            _sigmoid_chunk(
                c, chunks, logits, target, params, grad_scale, inplace, out_loss, out_grad
            )
        else:
            params_pow = SigmoidFocalPowParams(alpha, gamma)
            _sigmoid_chunk(
                c, chunks, logits, target, params_pow, grad_scale, inplace, out_loss, out_grad
            )


# --------------------------------------------------------------------------------------------
# KL divergence of softmax: KL(p || softmax(x))
# --------------------------------------------------------------------------------------------
# KL(p || softmax(x)) = sum_c p_c ((m - x_c) + L + log p_c), L = log1p(S), the reference's
# per-term formula (``scalar.kl_term``) in lanes: a float64 log written here (``log_f64``), the
# difference m - x_c as a pair, each block's terms summed split at their largest magnitude.
_TWO54 = 18014398509481984.0  # 2^54: scales a subnormal argument to a normal one
_MIN_NORMAL64 = 2.2250738585072014e-308
_LOW32 = np.int64(0xFFFFFFFF)
_MAGIC_K = np.int64(0x4338000000000000)  # the bits of 1.5 * 2^52: + k, minus 1.5 * 2^52, is k
_ABS64 = np.int64(0x7FFFFFFFFFFFFFFF)
# log_f64 and _kl_elem are inlined by numba (``inline="always"``) into the block loops, which
# carry the same flags (contract only, no reassoc): as calls, LLVM judged them too large to
# inline, and a loop around a call does not vectorise (6.4 ns per log, twice libm's).
_INLINE = dict(inline="always", **_FMA)


@njit(**_INLINE)
def log_f64(x):
    """log(x) in float64 to < 1 ulp: fdlibm's __ieee754_log without a branch, so that loops
    over it vectorise. x = 2^k (1 + f) with sqrt(2)/2 <= 1 + f < sqrt(2) (exponent and mantissa
    by bit operations on the high word, a subnormal x scaled by 2^54 first), then
    log(1 + f) = f - (hfsq - s (hfsq + R(s^2))), s = f / (2 + f), hfsq = f^2 / 2, or for small
    f (fdlibm's ``i <= 0`` case) f - s (f - R); plus k ln2 in two parts. The k == 0 forms of
    fdlibm are the same expressions with k = 0 (0 - (a - f) = f - a exactly). Special values as
    math.log: log(0) = -inf, log(inf) = inf, NaN for NaN and x < 0."""
    sub = x < _MIN_NORMAL64
    xs = x * _TWO54 if sub else x
    bits = _bits64(xs)
    hx = bits >> 32
    k = (hx >> 20) - (1023 + 54 if sub else 1023)
    hx = hx & 0x000FFFFF
    i = (hx + 0x95F64) & 0x100000
    # 1 + f: the mantissa with the exponent of 1 (or of 1/2 when the mantissa is >= sqrt 2)
    y = _bits_to_float64(((hx | (i ^ 0x3FF00000)) << 32) | (bits & _LOW32))
    k = k + (i >> 20)
    f = y - 1.0
    dk = _bits_to_float64(_MAGIC_K + k) - 6755399441055744.0  # float(k), no int64 conversion
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * (_LG2 + w * (_LG4 + w * _LG6))
    t2 = z * (_LG1 + w * (_LG3 + w * (_LG5 + w * _LG7)))
    r = t2 + t1
    hfsq = 0.5 * f * f
    big = ((hx - 0x6147A) | (0x6B851 - hx)) > 0
    a = (hfsq - (s * (hfsq + r) + dk * _LN2_LO64)) if big else (s * (f - r) - dk * _LN2_LO64)
    out = dk * _LN2_HI64 - (a - f)
    out = out if x < np.inf else x + x  # inf, NaN
    out = -np.inf if x == 0.0 else out
    return np.nan if x < 0.0 else out


@njit(**_INLINE)
def _kl_elem(p, hi, lo, L):
    """p ((hi + L) + (log p + lo)) with hi + lo = m - x_c exactly: ``scalar.kl_term`` (the same
    order of additions); 0 where p == 0 (0 log 0 = 0, also for x_c = -inf). For x_c = -inf,
    hi = +inf and TwoSum's lo is NaN: lo is taken as 0 then, as the reference's two_diff does,
    so the term is +inf."""
    lo = lo if hi < np.inf else 0.0
    term = p * ((hi + L) + (log_f64(p) + lo))
    return term if p != 0.0 else 0.0


@njit(**_SUM)
def _kl_abs_top(v):
    """The largest |v_j| as bits (the bits of a non-negative float order as it does); a NaN
    gives bits above those of inf."""
    top = np.int64(0)
    for j in range(v.shape[0]):
        top = max(top, _bits64(np.float64(v[j])) & _ABS64)
    return top


@njit(**_SUM)
def _kl_split_sum(v, sigma):
    """sum_j v_j split at sigma (:func:`_split_add`): the high parts add exactly in any order."""
    hi = 0.0
    lo = 0.0
    for j in range(v.shape[0]):
        hi, lo = _split_add(np.float64(v[j]), sigma, hi, lo)
    return hi + lo


@njit(**_ROW)
def _kl_block_sum(v, top):
    """The sum of a block of at most BLOCK terms of either sign, ``top`` the bits of the largest
    |v_j|: split at sigma = 2^(E + 14) as in :func:`_sum_below_f64` (the high parts' total stays
    below 2^(E + 13), a multiple of ulp(sigma) / 2: exact; the error of the low parts is below
    2^(E - 69)). Non-finite terms (inf, NaN) and terms so large that sigma would overflow take
    the reference's Neumaier sum (its inf / NaN)."""
    if top == 0:
        return 0.0
    if top >= np.int64(2033) << 52:  # sigma's exponent field would pass 2046
        return compensated_sum(v)
    return _kl_split_sum(v, _split_scale(top))


@njit(**_ROW)
def _kl_row_sum(t):
    """P = sum_c p_c (the target row, any float dtype) in float64, split per block, the block
    sums compensated: the factor of softmax in the gradient P q_j - p_j."""
    nc = t.shape[0]
    s = 0.0
    c = 0.0
    for b0 in range(0, nc, BLOCK):
        tb = t[b0 : min(b0 + BLOCK, nc)]
        s, c = neumaier_add(s, c, _kl_block_sum(tb, _kl_abs_top(tb)))
    return s + c


@njit(**_FMA)
def _kl_terms_block(x, t, m, L, terms):
    """terms_j = p_j log(p_j / q_j) (:func:`_kl_elem`) for a block; returns the bits of the
    largest |term|. No ``reassoc`` (the inlined log and term keep their order): the only
    reduction is an integer maximum, which vectorises without it."""
    top = np.int64(0)
    for j in range(x.shape[0]):
        hi, lo = two_diff_f64(m, np.float64(x[j]))
        e = _kl_elem(np.float64(t[j]), hi, lo, L)
        terms[j] = e
        top = max(top, _bits64(e) & _ABS64)
    return top


@njit(**_FMA)
def _kl_grad_block(x, t, m, L, terms, f, f_lo, gs, g):
    """:func:`_kl_terms_block` and the gradient of the block in the same loop:
    g_j = (f + f_lo) e_j - gs p_j with e_j = exp(x_j - m) 2^96 (float64 exp of the exact
    difference), f + f_lo = P gs / (1 + S) 2^-96 as a double-double. ``g=None`` writes over
    ``x`` (each element after it is read; one array read and written: the loop vectorises)."""
    top = np.int64(0)
    for j in range(x.shape[0]):
        v = np.float64(x[j])
        p = np.float64(t[j])
        hi, lo = two_diff_f64(m, v)
        e = _kl_elem(p, hi, lo, L)
        terms[j] = e
        top = max(top, _bits64(e) & _ABS64)
        ex = exp_f64_biased(-hi, -lo)  # 0 for x_j = -inf (hi = +inf)
        _store(x, g, j, scaled_term_less(ex, f, f_lo, gs, p))
    return top


@njit(**_ROW)
def _kl_row(x, t, grad_scale, with_grad, inplace, g, scratch, terms, block_max):
    """One row of KL(p || softmax(x)) (and its gradient into ``g``, which is ``x`` when
    ``inplace``). Pass 1: the softmax machinery's online maximum and S (:func:`_first_pass`,
    its terms into ``scratch``, the argmax index with the gradient); L = log1p(S). Pass 2, block
    by block: the terms p_c ((m - x_c) + L + log p_c) into ``terms`` (float64, one block) and
    their split sum, compensated over blocks; with the gradient, in the same loop,
    g_j = (P q_j - p_j) gs, P = sum p, and then the argmax entry recomputed without cancellation
    as (P - p_k - p_k S) / (1 + S) gs (``argmax_grad``, as the reference)."""
    skip, fill, m, k, s, _, _ = _first_pass(
        x, x, scratch, False, False, block_max, SIDE_NONE, with_grad, t, t, 0.0
    )
    if skip:
        if with_grad:
            g[:] = fill
        return fill
    L = math.log1p(s)
    nc = x.shape[0]
    z = 1.0 + s
    p_sum = 0.0
    f = 0.0
    f_lo = 0.0
    p_k = 0.0
    if with_grad:
        p_k = np.float64(t[k])  # before the row is written (t is never written)
        p_sum = _kl_row_sum(t)
        if math.isfinite(p_sum):
            a_gs, a_gs_lo = two_prod(p_sum, grad_scale)
            f, f_lo = scale_over(a_gs, a_gs_lo, s)
        else:  # P = inf or NaN: the reference's P (e_j / z) - p_j gives inf / NaN entries
            f = p_sum * grad_scale / z
        f *= UNBIAS
        f_lo *= UNBIAS
    ks = 0.0
    kc = 0.0
    for b0 in range(0, nc, BLOCK):
        b1 = min(b0 + BLOCK, nc)
        tb = terms[: b1 - b0]
        if not with_grad:
            top = _kl_terms_block(x[b0:b1], t[b0:b1], m, L, tb)
        elif inplace:
            top = _kl_grad_block(x[b0:b1], t[b0:b1], m, L, tb, f, f_lo, grad_scale, None)
        else:
            top = _kl_grad_block(x[b0:b1], t[b0:b1], m, L, tb, f, f_lo, grad_scale, g[b0:b1])
        if nc <= SHORT_CLASSES:  # the lanes' order (the same bits forward and fused)
            ks = short_signed_sum(tb)
        else:
            ks, kc = neumaier_add(ks, kc, _kl_block_sum(tb, top))
    if with_grad:
        g[k] = argmax_grad(p_sum, p_k, s, z) * grad_scale
    return ks + kc


@njit(**_FMA)
def add_signed(s, c, v):
    """(s + v, c + the rounding error of s + v) for terms of either sign (Neumaier's step,
    branch-free: the larger magnitude first), for loops over lanes."""
    t = s + v
    big = s if abs(s) >= abs(v) else v
    small = v if abs(s) >= abs(v) else s
    return t, c + ((big - t) + small)


@njit(**_FMA)
def short_signed_sum(e):
    """The compensated sum of a short row's KL terms in order (:func:`add_signed`): the sum
    :func:`_short_group_kl_sums` makes in each lane, bit for bit; +inf and NaN as the terms
    give them."""
    s = 0.0
    c = 0.0
    for j in range(e.shape[0]):
        s, c = add_signed(s, c, e[j])
    return compensated_total(s, c)


@njit(**_FMA)
def _short_group_kl_sums(xt, tt, mx, logs, nc, sums):
    """Per lane r: the KL terms p_c ((m_r - x_rc) + L_r + log p_c) (:func:`_kl_elem`) of LANES
    rows laid out by class, summed by :func:`add_signed` into ``sums[0]`` (and the errors into
    ``sums[1]``)."""
    for r in range(LANES):
        sums[0, r] = 0.0
        sums[1, r] = 0.0
    for c in range(nc):
        base = c * LANES
        for r in range(LANES):
            hi, lo = two_diff_f64(np.float64(mx[r]), np.float64(xt[base + r]))
            e = _kl_elem(np.float64(tt[base + r]), hi, lo, logs[r])
            sums[0, r], sums[1, r] = add_signed(sums[0, r], sums[1, r], e)


@njit(**_ROW)
def _kl_group(logits, target, r0, nc, work):
    """The group of LANES rows from r0 in the ``work`` arrays of :func:`short_work`: S per lane
    as the cross-entropy's (:func:`_short_group_prepare`), L = log1p(S) per lane, then each
    lane's sum of KL terms (:func:`_short_group_kl_sums`)."""
    _short_group_prepare(logits, target, r0, nc, work, None)
    logs = work[7]
    for r in range(LANES):
        logs[r] = math.log1p(lane_s(work, r))
    _short_group_kl_sums(work[0], work[1], work[2], logs, nc, work[6])


@njit(**_ROW)
def _kl_short_rows(lo, hi, logits, target, out_loss, work, terms, block_max):
    """Rows [lo, hi) of the KL forward for rows of at most :data:`SHORT_CLASSES` classes, LANES
    at a time: S per lane as the cross-entropy's (:func:`lane_sums`), L = log1p(S) per
    row, then the terms per lane (:func:`_short_group_kl_sums`); rows with a NaN or an infinite
    maximum, and the last rows, take the row path (:func:`_kl_row`)."""
    xt, mx, sums = work[0], work[2], work[6]
    nc = logits.shape[1]
    r0 = lo
    while r0 + LANES <= hi:
        _kl_group(logits, target, r0, nc, work)
        for r in range(LANES):
            i = r0 + r
            m = np.float64(mx[r])
            if not math.isfinite(m):  # NaN, +inf, or every class -inf: the row path's
                out_loss[i] = _kl_row(
                    logits[i], target[i], 1.0, False, False, logits[i], xt[:nc], terms, block_max
                )
            else:
                out_loss[i] = compensated_total(sums[0, r], sums[1, r])
        r0 += LANES
    for i in range(r0, hi):
        out_loss[i] = _kl_row(
            logits[i], target[i], 1.0, False, False, logits[i], xt[:nc], terms, block_max
        )


@njit(**_FMA)
def _kl_group_grad(xt, tt, mx, f, f_lo, gs, nc, gt):
    """gt[c * LANES + r] = (f_r + f_lo_r) e_rc - gs p_rc for LANES rows laid out by class, with
    e_rc = exp(x_rc - m_r) 2^96: :func:`_kl_grad_block`'s formula (float64), one row per
    lane."""
    for c in range(nc):
        base = c * LANES
        for r in range(LANES):
            hi, lo = two_diff_f64(np.float64(mx[r]), np.float64(xt[base + r]))
            ex = exp_f64_biased(-hi, -lo)  # 0 for x = -inf (hi = +inf)
            gt[base + r] = scaled_term_less(ex, f[r], f_lo[r], gs, np.float64(tt[base + r]))


@njit(**_ROW)
def _kl_short_rows_grad(lo, hi, logits, target, grad_scale, inplace, out_loss, out_grad, work):
    """Rows [lo, hi) of the fused KL for rows of at most :data:`SHORT_CLASSES` classes, LANES at
    a time: the forward's lanes (:func:`_kl_short_rows`, the same loss), then per lane
    P = sum p, the first argmax k and f + f_lo = P gs / (1 + S) 2^-96 as :func:`_kl_row` takes
    them, the group's gradient by class (:func:`_kl_group_grad`), and each row copied out with
    its argmax entry (P - p_k - p_k S) gs / (1 + S): :func:`_kl_row`'s bits. Rows with a NaN
    or an infinite maximum and the last rows take the row path; a group is read before any of
    its rows is written, so ``out_grad`` may be ``logits`` (``inplace``)."""
    group, terms, block_max, gt, f, f_lo, p_sum, p_k, k = work
    xt, tt, mx = group[:3]
    sums = group[6]
    nc = logits.shape[1]
    r0 = lo
    while r0 + LANES <= hi:
        _kl_group(logits, target, r0, nc, group)
        for r in range(LANES):
            f[r] = 0.0
            f_lo[r] = 0.0
            m = np.float64(mx[r])
            if not math.isfinite(m):
                continue
            i = r0 + r
            k[r] = max(first_index_of(logits[i], mx[r]), 0)
            p_k[r] = np.float64(target[i, k[r]])
            p_sum[r] = _kl_row_sum(target[i])
            s = lane_s(group, r)
            if math.isfinite(p_sum[r]):
                a_gs, a_gs_lo = two_prod(p_sum[r], grad_scale)
                f[r], f_lo[r] = scale_over(a_gs, a_gs_lo, s)
            else:  # P = inf or NaN: inf / NaN entries, as the row path gives
                f[r] = p_sum[r] * grad_scale / (1.0 + s)
            f[r] *= UNBIAS
            f_lo[r] *= UNBIAS
        _kl_group_grad(xt, tt, mx, f, f_lo, grad_scale, nc, gt)
        for r in range(LANES):
            i = r0 + r
            m = np.float64(mx[r])
            g = out_grad[i]
            if not math.isfinite(m):  # NaN, +inf, or every class -inf: the row path's
                out_loss[i] = _kl_row(
                    logits[i], target[i], grad_scale, True, inplace, g, xt[:nc], terms, block_max
                )
                continue
            out_loss[i] = compensated_total(sums[0, r], sums[1, r])
            for j in range(nc):
                g[j] = gt[j * LANES + r]
            s = lane_s(group, r)
            g[k[r]] = argmax_grad(p_sum[r], p_k[r], s, 1.0 + s) * grad_scale
        r0 += LANES
    for i in range(r0, hi):
        out_loss[i] = _kl_row(
            logits[i], target[i], grad_scale, True, inplace, out_grad[i], xt[:nc], terms, block_max
        )


@njit(**_OPTS)
def _kl_short_chunk_grad(c, chunks, logits, target, grad_scale, inplace, out_loss, out_grad):
    """The rows of chunk ``c`` by :func:`_kl_short_rows_grad`, its work arrays allocated once:
    the forward's, the row path's, the group's gradient by class, and per lane f, f_lo, P,
    p_k, k."""
    nc = logits.shape[1]
    work = (
        short_work(logits, target),
        np.empty(max(nc, 1)),  # the row path's terms and block maximum
        np.empty(1),
        np.empty(max(nc, 1) * LANES),
        np.empty(LANES),
        np.empty(LANES),
        np.empty(LANES),
        np.empty(LANES),
        np.zeros(LANES, np.int64),
    )
    lo, hi = _chunk(c, chunks, logits.shape[0])
    _kl_short_rows_grad(lo, hi, logits, target, grad_scale, inplace, out_loss, out_grad, work)


@njit(**_OPTS)
def _kl_short_chunk(c, chunks, logits, target, out_loss):
    """The rows of chunk ``c`` by :func:`_kl_short_rows`, its work arrays allocated once."""
    n, nc = logits.shape
    terms = np.empty(max(nc, 1))
    lo, hi = _chunk(c, chunks, n)
    _kl_short_rows(lo, hi, logits, target, out_loss, short_work(logits, target), terms, np.empty(1))


@njit(**_OPTS)
def _kl_chunk(c, chunks, logits, target, grad_scale, with_grad, inplace, out_loss, out_grad):
    """The rows of chunk ``c`` of a KL kernel, its work rows allocated once: the block of exp
    terms of pass 1 (logits' dtype), the block of KL terms (float64), the block maxima."""
    n, nc = logits.shape
    scratch = np.empty(min(nc, BLOCK), logits.dtype)
    terms = np.empty(min(nc, BLOCK))
    block_max = np.empty(n_blocks(nc))
    lo, hi = _chunk(c, chunks, n)
    work = (scratch, terms, block_max)
    _kl_rows(lo, hi, logits, target, grad_scale, with_grad, inplace, out_loss, out_grad, work)


@njit(**_ROW)
def _kl_rows(lo, hi, logits, target, grad_scale, with_grad, inplace, out_loss, out_grad, work):
    """Rows [lo, hi) of :func:`_kl_chunk` (``work``: its scratch, terms and block maxima),
    without reference counts (see :func:`_softmax_rows`)."""
    scratch, terms, block_max = work
    for i in range(lo, hi):
        x = logits[i]
        g = out_grad[i]
        out_loss[i] = _kl_row(
            x, target[i], grad_scale, with_grad, inplace, g, scratch, terms, block_max
        )


@njit(parallel=True, **_OPTS)
def kl_divergence_fwd(logits, target, out_loss):
    """:func:`cestudy.kernels.cpu.kl_divergence_fwd`, vectorised: per-row
    KL(p || softmax(x)) = sum_c p_c ((m - x_c) + log1p(S) + log p_c), 0 log 0 = 0 (the
    reference's per-term formula, never H(p, q) - H(p), which cancels where p is close to q)."""
    chunks = n_chunks(logits.shape[0], logits.shape[1], 1)
    short = logits.shape[1] <= SHORT_CLASSES
    for c in prange(chunks):
        if short:
            _kl_short_chunk(c, chunks, logits, target, out_loss)
        else:
            _kl_chunk(c, chunks, logits, target, 1.0, False, False, out_loss, logits)


@njit(parallel=True, **_OPTS)
def kl_divergence_fwd_grad(logits, target, grad_scale, out_loss, out_grad):
    """:func:`cestudy.kernels.cpu.kl_divergence_fwd_grad`, vectorised: the loss and
    d KL_i / d x_ij = (P q_j - p_j) * grad_scale, P = sum_c p_c; ``out_grad`` may be
    ``logits``."""
    inplace = out_grad.ctypes.data == logits.ctypes.data
    chunks = n_chunks(logits.shape[0], logits.shape[1], 1)
    short = logits.shape[1] <= SHORT_CLASSES
    for c in prange(chunks):
        if short:
            _kl_short_chunk_grad(c, chunks, logits, target, grad_scale, inplace, out_loss, out_grad)
        else:
            _kl_chunk(c, chunks, logits, target, grad_scale, True, inplace, out_loss, out_grad)


# --------------------------------------------------------------------------------------------
# Serial twins (no thread start-up: for small calls)
# --------------------------------------------------------------------------------------------
# this module's kernels: the cross-entropy, focal, BCE-with-logits and KL ones of cpu.KERNELS
KERNELS = tuple(
    k
    for k in cpu.KERNELS
    if k.startswith(
        (
            "cross_entropy_",
            "softmax_focal_",
            "bce_with_logits_",
            "sigmoid_focal_",
            "kl_divergence_",
        )
    )
)
serial_twins(globals(), KERNELS)
