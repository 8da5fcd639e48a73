"""Fast float32 CPU kernels: the accuracy contract of ``cpu.py`` in float32 arithmetic at full
SIMD width.

numba 0.68 has no SVML, so ``math.exp`` in a jitted loop stays a scalar libm call (about 3 ns per
element). The hot loops here are written so that LLVM vectorises them over 16 float32 lanes
(AVX-512; 8 with AVX2), using error-free transformations where float32 rounding would otherwise
break the 4-ulp contract:

- **The difference x_j - m** is carried exactly as a float32 pair (``two_diff_f32``, Knuth's
  TwoSum): ``hi + lo = x_j - m``. Rounding it instead would put ``u |x_j - m|`` of relative error
  into exp (up to 64 ulp at x_j - m = -100).
- **exp** (``exp_f32_biased``): Cody-Waite reduction d = n ln2 + r with ``r1 = hi - n LN2_HI``
  exact (a 16-bit LN2_HI and FMA) and the small rest ``c = lo - n LN2_LO`` kept apart; a degree-7
  polynomial (minimax, 0.001 ulp of truncation) written ``(1 + r1) + (es + c + r^2 q(r))`` where
  ``es`` is the exact rounding error of ``1 + r1`` (Fast2Sum), so that the only large rounding is
  the last addition: measured <= 0.65 ulp over [-150, 0] (``tests/test_fast_kernels.py``). The
  result is scaled by 2^96 (``EXP_BIAS``) so that every term down to exp(-150) is a normal
  float32 with full relative accuracy: a confident row whose loss is a float32 subnormal (1e-40)
  sums terms of exp(-95); flushing them, or letting them round as subnormals, would cost
  hundreds of ulp. Terms below exp(-150) are 0: with C < 2^31 classes they total below
  2^-170, far under half a subnormal ulp.
- **Sums of the exp terms** are float64 (each float32 term converted exactly): a float32 sum of
  C terms has a worst-case relative error of (C / lanes) u, which no 4-ulp budget survives. A
  loop that mixes float32 and float64 is vectorised by LLVM at the float64 width (8 lanes, so the
  float32 exp would run at half width), so each block's terms are first written as float32 (into
  the gradient row, or a scratch row for the forward) by a float32-only loop, then summed by a
  float64 loop over that L1-resident block.
- **The row is read once from memory**: blocks of ``BLOCK`` classes (16 KiB) are processed in
  turn, max then exp-and-sum, with an online (max, sum) state (Milakov & Gimelshein 2018): the sum
  of the terms below the running maximum and the count of terms equal to it, rescaled by
  exp(m_old - m_new) in float64 when the maximum grows. S = sum_{j != k} exp(x_j - m) is never
  formed as (1 + S) - 1. The fused kernels read the row a second time (from L2 for rows up to
  ~200K classes) to scale the stored terms into the gradient.
- **float64 only per row**: the loss (m - x_y) + log1p(S) (m - x_y is exact in float64), the
  scale of the gradient row, the cancellation-free entries (p_y - 1 = -S / (1 + S) when y is the
  argmax, the argmax entry under label smoothing or soft targets) and the label-smoothing and
  soft-target sums (float64 terms that are all >= 0, merged across blocks with the shift of the
  running maximum), where float32 would cost accuracy for no speed.

Error budget of a gradient entry p_j = e_j / (1 + S): exp <= 0.65 ulp, S (a sum of positive terms
each within 0.65 ulp, summed in float64) within 0.65 ulp so 1 + S within 0.65 ulp, one float64
product and one rounding to float32 (0.5 ulp): <= 1.8 ulp. The loss: log1p(S) within 0.65 ulp
plus the final rounding.

**In place**: every fused kernel may be given ``out_grad`` = ``logits`` (the gradient written over
the logits, as Liger-Kernel does on the GPU). Everything a row needs from the logits (x_y, the
argmax index, the label-smoothing and soft-target sums) is read before the first write to the
row, and each write goes to the element just read.

**Serial twins**: every kernel ``<k>`` has ``<k>_serial``, the same code without threads, for
calls too small to pay for starting them (see ``cestudy.kernels.cpu.SERIAL_BELOW``).

Only ``contract`` (FMA) and ``reassoc`` (on the loops whose only reductions are sums, maxima or
counts) are used: never ``nnan``/``ninf``, which would fold away the NaN checks.
"""
import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from . import scalar
from .cpu import argmax_grad, bcast_row, compensated_sum, loss_row, row_guard, serial_twin
from .cpu import store_row_sum

_OPTS = dict(cache=True, error_model="numpy", nogil=True)
_FMA = dict(fastmath={"contract"}, **_OPTS)
_SUM = dict(fastmath={"reassoc", "contract"}, **_OPTS)
# the shared formulas again, with FMA contraction for the polynomials (not cached: a second
# cached compilation of the same source with other flags would share cpu.py's cache entries)
_F = scalar.compiled(njit(fastmath={"contract"}, error_model="numpy", nogil=True))
soft_target = _F.soft_target
_exp_parts = _F.exp_parts
EXP_FLUSH = scalar.EXP_FLUSH

F32 = np.float32
BLOCK = 4096  # classes per block: 16 KiB of logits, in L1 with its 16 KiB of float32 terms


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


_bits_to_float64 = _bitcast(types.int64, types.float64, ir.DoubleType(),
                            "int64 bits as float64: how 2^n is built without ldexp.")
_bits_to_float32 = _bitcast(types.int32, types.float32, ir.FloatType(),
                            "int32 bits as float32: 2^n, and the maximum back from its key.")


# --------------------------------------------------------------------------------------------
# float32 exp with an exact argument (hi, lo), scaled by 2^EXP_BIAS
# --------------------------------------------------------------------------------------------
EXP_BIAS = 96
BIASED_ONE = F32(2.0 ** EXP_BIAS)  # exp(0) * 2^EXP_BIAS: the value of a term at the maximum
UNBIAS = 2.0 ** -EXP_BIAS
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


@njit(**_FMA)
def two_diff_f32(a, b):
    """``(hi, lo)`` with ``hi = fl(a - b)`` and ``hi + lo = a - b`` exactly (TwoSum, float32)."""
    s = a - b
    bb = s - a
    err = (a - (s - bb)) + (-b - bb)
    return s, err


@intrinsic
def _pow2_biased(typingctx, t):
    """2^(n + EXP_BIAS) as float32 for t = fl(v + 1.5 * 2^23), n = t - 1.5 * 2^23 an integer in
    [-222, 30]: t's low mantissa bits hold n, so (bits(t) << 23) = n << 23 modulo 2^32 (the bits
    of 1.5 * 2^23 shift out), and adding the biased exponent gives the float's bits."""
    if t != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        b = builder.shl(builder.bitcast(args[0], i32), ir.Constant(i32, 23))
        return builder.bitcast(builder.add(b, ir.Constant(i32, (127 + EXP_BIAS) << 23)),
                               ir.FloatType())

    return types.float32(types.float32), codegen


@njit(**_FMA)
def exp_f32_biased(hi, lo):
    """exp(hi + lo) * 2^96 in float32 for hi <= 0 and |lo| <= ulp(hi): within 0.65 ulp down to
    hi = -150, 0 below (and for hi = -inf or NaN: callers test the row for NaN first)."""
    t = hi * _LOG2E + _SHIFTER
    n = t - _SHIFTER
    r1 = hi - n * _LN2_HI  # exact: FMA, or an exact product and a Sterbenz difference
    c = lo - n * _LN2_LO  # |c| < 2^-16: its rounding is far below a float32 ulp of exp
    r = r1 + c
    q = _Q5
    q = q * r + _Q4
    q = q * r + _Q3
    q = q * r + _Q2
    q = q * r + _Q1
    q = q * r + _Q0
    s1 = _ONE + r1
    es = (_ONE - s1) + r1  # the rounding error of 1 + r1, exact (Fast2Sum, |r1| < 1)
    p = s1 + ((r * r) * q + (es + c))
    # below the flush (and for -inf / NaN) n is garbage, and the select drops it
    return p * _pow2_biased(t) if hi >= EXP32_FLUSH else _ZERO


# --------------------------------------------------------------------------------------------
# Block primitives (each one loop LLVM vectorises)
# --------------------------------------------------------------------------------------------
@intrinsic
def _order_key(typingctx, x):
    """The int32 key of a float32 that orders as the float does (-0 just below +0; NaNs with
    the sign bit clear above +inf, with it set below -inf): bits ^ ((bits >> 31) & 0x7fffffff).
    An intrinsic so that the arithmetic stays in int32 lanes (numba widens int32 to int64)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        b = builder.bitcast(args[0], i32)
        sign = builder.and_(builder.ashr(b, ir.Constant(i32, 31)), ir.Constant(i32, 0x7FFFFFFF))
        return builder.xor(b, sign)

    return types.int32(types.float32), codegen


@intrinsic
def _key_value(typingctx, k):
    """The float32 whose :func:`_order_key` is ``k`` (the key map is its own inverse)."""
    if k != types.int32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        sign = builder.and_(builder.ashr(args[0], ir.Constant(i32, 31)),
                            ir.Constant(i32, 0x7FFFFFFF))
        return builder.bitcast(builder.xor(args[0], sign), ir.FloatType())

    return types.float32(types.int32), codegen


_KEY_POSINF = np.int32(0x7F800000)  # keys above: NaNs with the sign bit clear
_KEY_NEGINF = np.int32(-0x7F800001)  # the key of -inf; keys below: NaNs with the sign bit set


@njit(**_OPTS)
def row_max_f32(x):
    """(m, bad) of a float32 row: the maximum as float64, and whether the row holds a NaN.

    The maximum and minimum are taken over order-preserving int32 keys of the bit patterns
    (:func:`_order_key`), integer reductions that LLVM vectorises over 16 lanes without fast-math
    flags (a float max reduction would need ``nnan``); a NaN shows as a key above +inf's or
    below -inf's."""
    hi = np.int32(-2147483648)
    lo = np.int32(2147483647)
    for j in range(x.shape[0]):
        key = _order_key(x[j])
        hi = max(hi, key)
        lo = min(lo, key)
    return np.float64(_key_value(hi)), hi > _KEY_POSINF or lo < _KEY_NEGINF


@njit(**_SUM)
def _count_equal(x, m):
    """How many x_j equal m (a float32 count: exact below 2^24; vectorised)."""
    hits = _ZERO
    for j in range(x.shape[0]):
        hits += _ONE if x[j] == m else _ZERO
    return hits


@njit(**_OPTS)
def first_index_of(x, m):
    """The first j with x_j == m (0 if none), found 256 elements at a time by a vectorised count,
    then a scan of the 256 that hold it."""
    n = x.shape[0]
    for c0 in range(0, n, 256):
        c1 = min(c0 + 256, n)
        if _count_equal(x[c0:c1], m) != _ZERO:
            for j in range(c0, c1):
                if x[j] == m:
                    return j
    return 0


@njit(**_SUM)
def _exp_block(x, m, out):
    """out_j = exp(x_j - m) 2^96 (float32, from the exact difference) for x_j <= m; returns the
    number of terms equal to 2^96 (x_j == m, or so close that exp rounds to 1)."""
    ties = _ZERO
    for j in range(x.shape[0]):
        hi, lo = two_diff_f32(x[j], m)
        e = exp_f32_biased(hi, lo)
        out[j] = e
        ties += _ONE if e == BIASED_ONE else _ZERO
    return np.float64(ties)


@njit(**_SUM)
def _exp_block_inplace(x, m):
    """:func:`_exp_block` writing over ``x`` itself. A separate loop because LLVM guards a loop
    that reads one array and writes another with a runtime overlap check and, when they are the
    same memory, runs it scalar (5x slower); reading and writing one array it vectorises."""
    ties = _ZERO
    for j in range(x.shape[0]):
        hi, lo = two_diff_f32(x[j], m)
        e = exp_f32_biased(hi, lo)
        x[j] = e
        ties += _ONE if e == BIASED_ONE else _ZERO
    return np.float64(ties)


@njit(**_SUM)
def _sum_below(e):
    """sum of the terms e_j < 2^96 in float64 (vectorised partial sums of exact conversions)."""
    s = 0.0
    for j in range(e.shape[0]):
        v = e[j]
        s += np.float64(v) if v < BIASED_ONE else 0.0
    return s


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


@njit(**_SUM)
def _scale_block(g, f):
    """g_j = float32(f * e_j) for the stored terms e_j (one rounding, from a float64 product)."""
    for j in range(g.shape[0]):
        g[j] = np.float32(f * np.float64(g[j]))


@njit(**_SUM)
def _scale_sub_block(g, f, b, w):
    """g_j = float32(f * e_j - b * w_j)."""
    for j in range(g.shape[0]):
        g[j] = np.float32(f * np.float64(g[j]) - b * w[j])


@njit(**_SUM)
def _scale_soft_block(g, f, b, t, w, eps, nc):
    """g_j = float32(f * e_j - b * a_j), a_j the smoothed, weighted soft target."""
    for j in range(g.shape[0]):
        a = soft_target(w[j], np.float64(t[j]), eps, nc)
        g[j] = np.float32(f * np.float64(g[j]) - b * a)


# --------------------------------------------------------------------------------------------
# One row: the online pass (max, sum, side sums) and the gradient pass
# --------------------------------------------------------------------------------------------
SIDE_NONE = 0    # no side sums
SIDE_WEIGHT = 1  # (sum w_c, sum w_c (m - x_c)): label smoothing with class indices
SIDE_SOFT = 2    # (sum a_c, sum a_c (m - x_c)): soft targets


@njit(**_OPTS)
def _row_one_block(x, dst, inplace, block_max, side, want_k, t, w, eps):
    """:func:`row_online` for a row of one block (no slicing, no rescaling)."""
    m, has_nan = row_max_f32(x)
    if has_nan or m == np.inf:
        return m, 0, 0.0, 0.0, 0.0, True
    block_max[0] = m
    if m == -np.inf:
        return m, 0, 0.0, 0.0, 0.0, False  # all -inf: a NaN row, nothing to compute
    k = first_index_of(x, np.float32(m)) if want_k else 0
    a_sum = 0.0
    t_sum = 0.0
    if side == SIDE_WEIGHT:
        a_sum, t_sum = _weighted_shift_sums(x, w, m)
    elif side == SIDE_SOFT:
        a_sum, t_sum = _soft_target_sums(x, t, w, m, eps, x.shape[0])
    if inplace:
        ties = _exp_block_inplace(x, np.float32(m))
    else:
        ties = _exp_block(x, np.float32(m), dst)
    return m, k, _sum_below(dst) * UNBIAS + (ties - 1.0), a_sum, t_sum, False


@njit(**_OPTS)
def row_online(x, dst, at_offset, block_max, side, want_k, t, w, eps):
    """:func:`row_online_` with ``inplace`` found from the arrays: ``dst`` is ``x``."""
    inplace = at_offset and dst.ctypes.data == x.ctypes.data
    return row_online_(x, dst, at_offset, inplace, block_max, side, want_k, t, w, eps)


@njit(**_OPTS)
def row_online_(x, dst, at_offset, inplace, block_max, side, want_k, t, w, eps):
    """The first pass over a float32 row, block by block (each block read once from memory).

    Writes the terms e_j = exp(x_j - m_b) 2^96 into ``dst`` (at the row's offsets when
    ``at_offset``, the gradient row; else at the start of each block, a scratch row of
    ``min(C, BLOCK)``), with m_b the running maximum when block b was processed, recorded in
    ``block_max[b]`` (the gradient pass rescales by exp(m_b - m)). ``dst`` may be ``x`` itself
    (``inplace``, with ``at_offset``): each block is read (max, side sums, first index of a new
    maximum) before it is written.

    Returns ``(m, k, S, A, T, bad)``: the maximum, its first index (0 unless ``want_k``), S = sum_{j != k} exp(x_j - m)
    (float64), the side sums (``side``), and whether the row holds a NaN or +inf (then the other
    values are meaningless and the row was not finished)."""
    nc = x.shape[0]
    if nc <= BLOCK:
        return _row_one_block(x, dst, inplace, block_max, side, want_k, t, w, eps)
    m = -np.inf
    k = 0
    s = 0.0       # sum of the terms below m, in units of 2^-96
    ties = 0.0    # number of terms equal to 1 (x_j == m)
    a_sum = 0.0
    t_sum = 0.0
    b = 0
    for b0 in range(0, nc, BLOCK):
        b1 = min(b0 + BLOCK, nc)
        xb = x[b0:b1]
        db = dst[b0:b1] if at_offset else dst[:b1 - b0]
        m_blk, has_nan = row_max_f32(xb)
        if has_nan or m_blk == np.inf:
            return m_blk, k, 0.0, a_sum, t_sum, True
        if m_blk > m:
            if m > -np.inf:
                # S below the new maximum: the old terms, and the old maximum's ties, shrink
                s = (s + ties * 2.0 ** EXP_BIAS) * math.exp(m - m_blk)  # m - m_blk exact
                if side != SIDE_NONE and a_sum != 0.0:
                    t_sum += (m_blk - m) * a_sum  # every earlier shift grows by m_blk - m >= 0
            ties = 0.0
            m = m_blk
            if want_k:
                k = b0 + first_index_of(xb, np.float32(m))
        # side sums before the block is overwritten; while m = -inf (a block of -inf only),
        # m_eff = +inf makes each shift +inf, as it is against the row's eventual maximum
        m_eff = m if m > -np.inf else np.inf
        if side == SIDE_WEIGHT:
            a_b, t_b = _weighted_shift_sums(xb, w[b0:b1], m_eff)
            a_sum += a_b
            t_sum += t_b
        elif side == SIDE_SOFT:
            a_b, t_b = _soft_target_sums(xb, t[b0:b1], w[b0:b1], m_eff, eps, nc)
            a_sum += a_b
            t_sum += t_b
        if m > -np.inf:
            if inplace:
                ties += _exp_block_inplace(xb, np.float32(m))
            else:
                ties += _exp_block(xb, np.float32(m), db)
            s += _sum_below(db)
        else:
            db[:] = 0.0  # exp(-inf) = 0 against any finite maximum
        block_max[b] = m
        b += 1
    return m, k, s * UNBIAS + (ties - 1.0), a_sum, t_sum, False


@njit(**_OPTS)
def row_grad_pass(g, block_max, m, f, side, b, t, w, eps):
    """Second pass: the stored terms of ``g`` become f e_j (- b w_j, or - b a_j for soft
    targets), block by block with each block's rescaling exp(m_b - m)."""
    nc = g.shape[0]
    blk = 0
    for b0 in range(0, nc, BLOCK):
        b1 = min(b0 + BLOCK, nc)
        fb = f * math.exp(block_max[blk] - m) * UNBIAS  # exp(0) = 1 for the last maximum
        if side == SIDE_WEIGHT:
            _scale_sub_block(g[b0:b1], fb, b, w[b0:b1])
        elif side == SIDE_SOFT:
            _scale_soft_block(g[b0:b1], fb, b, t[b0:b1], w[b0:b1], eps, nc)
        else:
            _scale_block(g[b0:b1], fb)
        blk += 1


@njit(**_OPTS)
def n_blocks(nc):
    return (nc + BLOCK - 1) // BLOCK


MAX_CHUNKS = 256


@njit(**_OPTS)
def n_chunks(n, nc):
    """How many chunks of rows the parallel loop runs: each allocates its own work rows once, so
    small calls get one chunk, large ones at least 16K elements a chunk and at most
    MAX_CHUNKS (many more than threads, for balance). numba.get_num_threads() would be the
    natural count, but a kernel that calls it cannot be cached."""
    return max(1, min(n, MAX_CHUNKS, (n * nc) >> 14))


@njit(**_OPTS)
def _chunk(c, chunks, n):
    """Rows [lo, hi) of chunk c of ``chunks``."""
    return c * n // chunks, (c + 1) * n // chunks


# --------------------------------------------------------------------------------------------
# Softmax cross-entropy with class indices, float32
# --------------------------------------------------------------------------------------------
@njit(**_OPTS)
def _ce_index_row(x, y, weight, wsum, ignore_index, eps, grad_scale, with_grad, g, scratch,
                  block_max):
    """One row of the float32 class-index cross-entropy (and its gradient into ``g``, which may
    be ``x``): x_y is read before anything is written."""
    if y == ignore_index:  # the row is not read
        if with_grad:
            g[:] = 0.0
        return 0.0
    nc = x.shape[0]
    x_y = np.float64(x[y])
    side = SIDE_WEIGHT if eps != 0.0 else SIDE_NONE
    m, k, s, _, t_sum, bad = row_online(x, g if with_grad else scratch, with_grad, block_max,
                                        side, with_grad and eps != 0.0, weight, weight, eps)
    skip, fill = row_guard(False, bad, m)
    if skip:
        if with_grad:
            g[:] = fill
        return fill
    L = math.log1p(s)
    loss = weight[y] * ((m - x_y) + L)  # m - x_y exact in float64
    if eps != 0.0:
        loss = (1.0 - eps) * loss + (eps / nc) * (t_sum + wsum * L)
    if not with_grad:
        return loss
    y_top = x_y == m  # y is (one of) the argmax: p_y - 1 = -S / (1 + S)
    z = 1.0 + s
    c_true = (1.0 - eps) * weight[y] * grad_scale
    c_smooth = (eps / nc) * grad_scale
    row_grad_pass(g, block_max, m, (c_true + c_smooth * wsum) / z, side, c_smooth, weight,
                  weight, eps)
    # entries that the scaled row would get by cancellation, recomputed exactly
    e_y = 1.0 if y_top else math.exp(x_y - m)
    p_y = e_y / z
    g_y = c_true * (-s / z if y_top else p_y - 1.0)
    if eps != 0.0:
        g_y += c_smooth * (argmax_grad(wsum, weight[y], s, z) if y_top
                           else wsum * p_y - weight[y])
        if not y_top:
            g[k] = np.float32(c_true / z + c_smooth * argmax_grad(wsum, weight[k], s, z))
    g[y] = np.float32(g_y)
    return loss


@njit(parallel=True, **_OPTS)
def cross_entropy_index_fwd(logits, target, weight, ignore_index, label_smoothing, out_loss):
    """float32 version of :func:`cestudy.kernels.cpu.cross_entropy_index_fwd` (same signature
    and semantics); ``logits`` must be float32."""
    n, nc = logits.shape
    wsum = compensated_sum(weight)
    chunks = n_chunks(n, nc)
    for c in prange(chunks):
        scratch = np.empty(min(nc, BLOCK), np.float32)
        block_max = np.empty(n_blocks(nc))
        lo, hi = _chunk(c, chunks, n)
        for i in range(lo, hi):
            out_loss[i] = _ce_index_row(logits[i], target[i], weight, wsum, ignore_index,
                                        label_smoothing, 1.0, False, logits[i], scratch,
                                        block_max)


@njit(parallel=True, **_OPTS)
def cross_entropy_index_fwd_grad(logits, target, weight, ignore_index, label_smoothing,
                                 grad_scale, out_loss, out_grad):
    """float32 version of :func:`cestudy.kernels.cpu.cross_entropy_index_fwd_grad`;
    ``out_grad`` may be ``logits`` (the gradient overwrites the logits).

    Two passes over each row: the online pass stores exp(x_j - m_b) 2^96 in the gradient row
    while summing S, then the row is scaled into the gradient (exp 0.65 ulp, S, one rounding:
    <= 1.8 ulp). The true-class entry and, with label smoothing, the argmax entry are recomputed
    by the cancellation-free formulas."""
    n, nc = logits.shape
    wsum = compensated_sum(weight)
    chunks = n_chunks(n, nc)
    for c in prange(chunks):
        block_max = np.empty(n_blocks(nc))
        lo, hi = _chunk(c, chunks, n)
        for i in range(lo, hi):
            out_loss[i] = _ce_index_row(logits[i], target[i], weight, wsum, ignore_index,
                                        label_smoothing, grad_scale, True, out_grad[i],
                                        out_grad[i], block_max)


# --------------------------------------------------------------------------------------------
# Soft-target cross-entropy, float32
# --------------------------------------------------------------------------------------------
@njit(**_OPTS)
def _ce_prob_row(x, t, weight, eps, grad_scale, with_grad, g, scratch, block_max):
    """One row of the float32 soft-target cross-entropy: H = T + A log1p(S) with
    A = sum a_c, T = sum a_c (m - x_c); the argmax entry of the gradient is recomputed without
    cancellation as (A - a_k - a_k S) / (1 + S). ``g`` may be ``x``."""
    m, k, s, a_sum, t_sum, bad = row_online(x, g if with_grad else scratch, with_grad,
                                            block_max, SIDE_SOFT, with_grad, t, weight, eps)
    skip, fill = row_guard(False, bad, m)
    if skip:
        if with_grad:
            g[:] = fill
        return fill
    if with_grad:
        z = 1.0 + s
        row_grad_pass(g, block_max, m, a_sum / z * grad_scale, SIDE_SOFT, grad_scale, t, weight,
                      eps)
        a_k = soft_target(weight[k], np.float64(t[k]), eps, x.shape[0])
        g[k] = np.float32(argmax_grad(a_sum, a_k, s, z) * grad_scale)
    return t_sum + a_sum * math.log1p(s)


@njit(parallel=True, **_OPTS)
def cross_entropy_prob_fwd(logits, target, weight, label_smoothing, out_loss):
    """float32 version of :func:`cestudy.kernels.cpu.cross_entropy_prob_fwd`."""
    n, nc = logits.shape
    chunks = n_chunks(n, nc)
    for c in prange(chunks):
        scratch = np.empty(min(nc, BLOCK), np.float32)
        block_max = np.empty(n_blocks(nc))
        lo, hi = _chunk(c, chunks, n)
        for i in range(lo, hi):
            out_loss[i] = _ce_prob_row(logits[i], target[i], weight, label_smoothing, 1.0,
                                       False, logits[i], scratch, block_max)


@njit(parallel=True, **_OPTS)
def cross_entropy_prob_fwd_grad(logits, target, weight, label_smoothing, grad_scale, out_loss,
                                out_grad):
    """float32 version of :func:`cestudy.kernels.cpu.cross_entropy_prob_fwd_grad`;
    ``out_grad`` may be ``logits``."""
    n, nc = logits.shape
    chunks = n_chunks(n, nc)
    for c in prange(chunks):
        block_max = np.empty(n_blocks(nc))
        lo, hi = _chunk(c, chunks, n)
        for i in range(lo, hi):
            out_loss[i] = _ce_prob_row(logits[i], target[i], weight, label_smoothing,
                                       grad_scale, True, out_grad[i], out_grad[i], block_max)


# --------------------------------------------------------------------------------------------
# Binary cross-entropy with logits, float32
# --------------------------------------------------------------------------------------------
@njit(fastmath={"contract"}, **_OPTS)
def exp_neg(d):
    """exp(d) for d <= 0 in float64, vectorisable, relative error < 7e-12; 0 for d < -708
    (and for d = -inf). NaN propagates through the polynomial."""
    p, n = _exp_parts(max(d, EXP_FLUSH))
    res = p * _bits_to_float64((np.int64(n) + 1023) << 52)
    return 0.0 if d < EXP_FLUSH else res


@njit(fastmath={"contract"}, **_OPTS)
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


@njit(fastmath={"contract"}, **_OPTS)
def _bce_elem(v, tj, wj, pwj, grad_scale):
    """(loss, d loss / dx) of one element of BCE with logits, in float64: loss =
    w (pw t softplus(-x) + (1 - t) softplus(x)) with softplus(+-x) = max(+-x, 0) +
    log1p(exp(-|x|)); one exp and one log1p."""
    e = exp_neg(-abs(v))
    lp = log1p_unit(e)
    sp_pos = max(v, 0.0) + lp
    sp_neg = max(-v, 0.0) + lp
    loss = wj * (pwj * tj * sp_neg + (1.0 - tj) * sp_pos)
    r = 1.0 / (1.0 + e)
    sig_pos = r if v >= 0.0 else e * r
    sig_neg = e * r if v >= 0.0 else r
    return loss, wj * ((1.0 - tj) * sig_pos - pwj * tj * sig_neg) * grad_scale


@njit(**_SUM)
def _bce_row(x, t, w, pw, grad_scale, with_grad, lrow, g):
    """One row of BCE with logits (:func:`_bce_elem`). Losses into ``lrow`` unless it is None;
    returns the row sum (float64 partial sums of non-negative terms: relative error
    <= C 2^-53, far below a float32 ulp)."""
    total = 0.0
    for j in range(x.shape[0]):
        loss, gj = _bce_elem(np.float64(x[j]), np.float64(t[j]), w[j], pw[j], grad_scale)
        total += loss
        if lrow is not None:  # pruned at compile time when None
            lrow[j] = loss
        if with_grad:
            g[j] = np.float32(gj)
    return total


@njit(**_SUM)
def _bce_row_inplace(x, t, w, pw, grad_scale, lrow):
    """:func:`_bce_row` with the gradient written over ``x`` (one array read and written, which
    LLVM vectorises; see :func:`_exp_block_inplace`)."""
    total = 0.0
    for j in range(x.shape[0]):
        loss, gj = _bce_elem(np.float64(x[j]), np.float64(t[j]), w[j], pw[j], grad_scale)
        total += loss
        if lrow is not None:  # pruned at compile time when None
            lrow[j] = loss
        x[j] = np.float32(gj)
    return total


@njit(parallel=True, **_OPTS)
def bce_with_logits_fwd(logits, target, weight, pos_weight, out_loss):
    """float32 version of :func:`cestudy.kernels.cpu.bce_with_logits_fwd`. ``weight`` and
    ``pos_weight`` are (N, C) or, when the same for every row, (1, C): contiguous rows keep the
    loop vectorised (zero-stride broadcast views made it 6x slower). ``out_loss`` (N, C) for
    per-element losses, (N,) for row sums."""
    for i in prange(logits.shape[0]):
        x = logits[i]
        total = _bce_row(x, target[i], bcast_row(weight, i), bcast_row(pos_weight, i), 1.0,
                         False, loss_row(out_loss, i), x)
        store_row_sum(out_loss, i, total)


@njit(parallel=True, **_OPTS)
def bce_with_logits_fwd_grad(logits, target, weight, pos_weight, grad_scale, out_loss, out_grad):
    """float32 version of :func:`cestudy.kernels.cpu.bce_with_logits_fwd_grad` (weights and
    ``out_loss`` as in :func:`bce_with_logits_fwd`); ``out_grad`` may be ``logits``."""
    inplace = out_grad.ctypes.data == logits.ctypes.data
    for i in prange(logits.shape[0]):
        if inplace:
            total = _bce_row_inplace(logits[i], target[i], bcast_row(weight, i),
                                     bcast_row(pos_weight, i), grad_scale, loss_row(out_loss, i))
        else:
            total = _bce_row(logits[i], target[i], bcast_row(weight, i),
                             bcast_row(pos_weight, i), grad_scale, True, loss_row(out_loss, i),
                             out_grad[i])
        store_row_sum(out_loss, i, total)


# --------------------------------------------------------------------------------------------
# Serial twins (no thread start-up: for small calls)
# --------------------------------------------------------------------------------------------
KERNELS = ("cross_entropy_index_fwd", "cross_entropy_index_fwd_grad", "cross_entropy_prob_fwd",
           "cross_entropy_prob_fwd_grad", "bce_with_logits_fwd", "bce_with_logits_fwd_grad")
cross_entropy_index_fwd_serial = serial_twin(cross_entropy_index_fwd)
cross_entropy_index_fwd_grad_serial = serial_twin(cross_entropy_index_fwd_grad)
cross_entropy_prob_fwd_serial = serial_twin(cross_entropy_prob_fwd)
cross_entropy_prob_fwd_grad_serial = serial_twin(cross_entropy_prob_fwd_grad)
bce_with_logits_fwd_serial = serial_twin(bce_with_logits_fwd)
bce_with_logits_fwd_grad_serial = serial_twin(bce_with_logits_fwd_grad)
