"""numba-cuda kernels: the CPU kernels' calling convention and accuracy contract on NVIDIA GPUs.

Import this module only when the CUDA backend is wanted (``cestudy.backends.require_cuda``); it
needs NVIDIA's ``numba-cuda`` package and a GPU, or the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1`` set before numba is imported), in which CI runs every kernel.

This module holds raw kernels and the raw device helpers that ``cestudy.dispatch`` calls: no
validation beyond what a kernel must do to stay in bounds, no variant names (kernels are named
after the registry's kernel stems), and no choice of reduction (the caller names one).

Inputs: logits of float64, float32, float16 and bfloat16. numba has no bfloat16 array type
(torch exports bfloat16 through ``__cuda_array_interface__`` only as the opaque ``'<V2'``), so
bfloat16 travels as its bits: a 16-bit integer device array wrapped in :class:`BFloat16Bits`
(torch bfloat16 tensors, ``'<V2'`` interfaces and anything with ``__dlpack__`` are wrapped by
:func:`as_device_logits` without a copy). 16-bit inputs are computed in float32,
their gradient is written in the input's dtype (round to nearest even) and their loss in
float32.

Design of the softmax-family (row) kernels:

- A group of ``tpr`` threads (a power of two, about ``ELEMENTS_PER_THREAD`` elements each) owns a
  row; small rows pack several groups into a block. Each thread reads its strided share of the
  row once, in chunks of 8 loads issued before any arithmetic, and keeps an online state
  (Milakov & Gimelshein 2018): its running maximum m, the number t of its elements equal to m,
  their first index k, and the sum s of exp(x_j - m) over its elements below m. The chunk's
  maximum is taken first, so that the sum is rescaled (in float64, exactly enough that repeated
  rescaling costs nothing) at most once per chunk. S = sum_{j != argmax} exp(x_j - m) is never
  formed as (1 + S) - 1 (Blanchard, Higham & Higham 2021).
- float32 arithmetic for float32 and 16-bit inputs, with error-free transformations where float32
  rounding would break the 4-ulp contract: x_j - m is carried exactly as a (hi, lo) pair
  (TwoSum), exp is a float32 polynomial (``exp32_biased``: Cody-Waite reduction with the low part
  folded into the reduced argument, a degree-7 minimax polynomial, the rounding of 1 + r carried
  exactly; within 0.65 ulp), scaled by 2^96 so that every term down to exp(-150) is a normal
  float32 (a confident row whose loss is a float32 subnormal sums terms of exp(-95)). Each
  thread sums its terms in float32 with Kahan's compensation. Never ``__expf``/fastmath (2 +
  1.17|x| ulp: 100 ulp at -87). For 16-bit inputs the difference x_j - m is used as rounded: its
  error (< 2^-17 relative) is far below a 16-bit ulp.
- float64 per row: the merge of the threads' states, the loss (m - x_y) + log1p(S) (m - x_y is
  exact in float64), the scale of the gradient row and the entries that need cancellation-free
  forms (p_y - 1 = -S / (1 + S) when y is the argmax). The per-element work of the statistics
  pass (every row kernel) and of the class-index gradient without label smoothing is float32;
  the soft-target sums (probability targets, KL divergence, label smoothing) and the gradients
  of those and of the focal loss still evaluate each element's formula in float64, from the
  float32 exp. float64 inputs keep the float64-exact path (TwoSum differences, libdevice exp).
- Group reductions use warp shuffles (``shfl_xor`` butterflies, then one shared-memory exchange
  between the warps of a group wider than a warp). The CUDA simulator has no shuffles: there the
  kernels reduce with shared-memory trees, and tests also run the shuffle code on emulated
  shuffles (shared memory, a 4-lane "warp") so that both paths are exercised without a GPU.
- One launch per call: the per-row losses are reduced inside the row kernel ("sum", "mean"):
  each block writes its partial sums to a workspace and the last block to finish (an atomic
  ticket) reduces them in a fixed order and writes the result, so nothing comes back to the host.
  Only a fused call with reduction "mean" over class-index targets launches twice: the gradient
  needs the weighted count of non-ignored rows, summed by a one-block kernel first. Kernels are
  compiled once per (threads per block, input dtype, reduction method); the row configuration is
  cached per class count.
- Bad input the kernels meet (a target out of range, a negative weight or target probability)
  makes its row (element) NaN and is counted in the workspace; :func:`raise_device_errors` reads
  the counts (a host synchronisation) and raises ``ValueError``. Nothing synchronises unless asked.
- The fused kernels read the row again to write the gradient, which may be the logits buffer
  itself (``out_grad`` = logits, as Liger-Kernel does); each element is written by the thread
  that just read it, after the whole row's statistics are known.
- Element-wise kernels (BCE with logits, sigmoid focal) use one thread per element (grid-stride),
  float64 per element (``scalar.py``'s formulas), the same in-kernel reduction.

The host wrappers ``<kernel>_fwd`` / ``<kernel>_fwd_grad`` have the signatures of
``cestudy.kernels.cpu`` and take numpy arrays or device arrays alike; device outputs are written
in place, host outputs copied back. As on the CPU, an element-wise kernel given a 1-D
``out_loss`` of length N writes row sums. :func:`compute` is the one-launch entry point that
``cestudy.dispatch`` uses for device arrays.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
from numba import cuda, float32, float64, int32, uint16, uint32, uint64

from .. import dtypes
from . import scalar


@cuda.jit(device=True)
def _fma(a, b, c):
    """a b + c rounded once (the GPU's FMA), for ``scalar``'s error-free products."""
    return cuda.fma(a, b, c)


# the simulator runs device functions as Python, whose FMA (a * b + c) rounds twice: there the
# exact rational one of ``scalar.fma``
_S = scalar.compiled(
    cuda.jit(device=True),
    fma=scalar.fma if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0") else _fma,
)
two_diff = _S.two_diff
exp_diff = _S.exp_diff
neumaier_add = _S.neumaier_add
pow_nonneg = _S.pow_nonneg
row_guard = _S.row_guard
argmax_grad = _S.argmax_grad
neg_log_prob = _S.neg_log_prob
soft_target = _S.soft_target
kl_term = _S.kl_term
focal_parts = _S.focal_parts
focal_inner = _S.focal_inner
focal_grad = _S.focal_grad
bce_logits_elem = _S.bce_logits
bce_logits_grad = _S.bce_logits_grad
sigmoid_focal_elem = _S.sigmoid_focal

MAX_THREADS = 1024
ELEMENTS_PER_THREAD = 32
"""Elements of a row per thread (the group width follows the class count): enough work per
thread that the group reduction is a small share of it, and rows of up to 1024 classes stay in
one warp (no block synchronisation)."""
KINDS = ("float64", "float32", "float16", "bfloat16")
ROW_KERNELS = ("cross_entropy_index", "cross_entropy_prob", "kl_divergence", "softmax_focal")
ELEMENT_KERNELS = ("bce_with_logits", "sigmoid_focal")
INDEX_TARGET_KERNELS = ("cross_entropy_index", "softmax_focal")
MODES = {"none": 0, "sum": 1, "mean": 2}
"""Reduction codes of the kernels: 0 one loss per row (element), 1 their sum, 2 sum / count,
the count being each row's class weight (class-index kernels) or 1 per row (element)."""


def _simulator() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def _env_pow2(name: str, default: int, top: int) -> int:
    env = os.environ.get(name)
    t = int(env) if env else default
    if t < 1 or t > top or t & (t - 1):
        raise ValueError(f"{name} must be a power of two in 1..{top}; got {t}")
    return t


def threads_per_block(n_classes: int = 0) -> int:
    """Threads per block: $CESTUDY_CUDA_THREADS when set (tests lower it for the simulator), else
    1024 (the float64 kernels' best on the H200 run in reports/cuda.md; the benchmark compares
    256, 512 and 1024)."""
    return _env_pow2("CESTUDY_CUDA_THREADS", 1024, MAX_THREADS)


def elements_per_thread() -> int:
    """$CESTUDY_CUDA_ELEMENTS when set (the simulator suite lowers it so that small rows still
    spread over several threads), else ``ELEMENTS_PER_THREAD``."""
    return _env_pow2("CESTUDY_CUDA_ELEMENTS", ELEMENTS_PER_THREAD, 1 << 20)


def reduction_method() -> str:
    """ "shuffle" (warp shuffles; emulated in the simulator) or "tree" (shared memory):
    $CESTUDY_CUDA_REDUCTION, else shuffle on a GPU and tree in the simulator."""
    method = os.environ.get("CESTUDY_CUDA_REDUCTION") or ("tree" if _simulator() else "shuffle")
    if method not in ("shuffle", "tree"):
        raise ValueError(f"CESTUDY_CUDA_REDUCTION must be 'shuffle' or 'tree'; got {method!r}")
    return method


@functools.lru_cache(maxsize=256)
def row_config(n_classes: int, nt: int, ept: int) -> tuple[int, int]:
    """(threads per row, rows per block) for ``n_classes`` classes in blocks of ``nt`` threads:
    the smallest power of two giving each thread at most ``ept`` elements, at most the block."""
    tpr = 1
    while tpr < nt and tpr * ept < n_classes:
        tpr *= 2
    return tpr, nt // tpr


# --------------------------------------------------------------------------------------------
# Bits: bfloat16 widening and rounding, 2^n (libdevice on a GPU, numpy in the simulator)
# --------------------------------------------------------------------------------------------
if _simulator():

    def _f32_from_bits(b):
        return np.uint32(int(b) & 0xFFFFFFFF).view(np.float32)

    def _bits_from_f32(v):
        return int(np.float32(v).view(np.uint32))
else:
    from numba.cuda import libdevice

    def _f32_from_bits(b):
        return libdevice.int_as_float(int32(b))

    def _bits_from_f32(v):
        return uint32(libdevice.float_as_int(v))


f32_from_bits = cuda.jit(device=True)(_f32_from_bits)
f32_from_bits.__doc__ = "The float32 whose bits are the low 32 bits of the integer ``b``."
bits_from_f32 = cuda.jit(device=True)(_bits_from_f32)
bits_from_f32.__doc__ = "The bits of a float32, as an unsigned integer."


@cuda.jit(device=True)
def bf16_to_f32(b):
    """A bfloat16 given by its 16 bits, widened to float32 (exact: a 16-bit shift)."""
    return f32_from_bits(uint32(b) << 16)


@cuda.jit(device=True)
def f32_to_bf16(g):
    """float32 -> bfloat16 bits, rounded to nearest even (overflow to inf, subnormals kept); a
    NaN stays a (quiet) NaN of the same sign."""
    b = bits_from_f32(g)
    if (b & 0x7FFFFFFF) > 0x7F800000:
        return uint16((b >> 16) | 0x40)
    return uint16((b + 0x7FFF + ((b >> 16) & 1)) >> 16)


# --------------------------------------------------------------------------------------------
# float32 exp of an exact argument, scaled by 2^96
# --------------------------------------------------------------------------------------------
F32 = np.float32
EXP_BIAS = 96
BIASED_ONE = F32(2.0**EXP_BIAS)  # exp(0) 2^96: a term at the maximum
UNBIAS = 2.0**-EXP_BIAS
EXP32_FLUSH = F32(-150.0)  # exp(-150) 2^96 = 2^-120.4 is still a normal float32
_SHIFTER_BITS = 0x4B400000  # the bits of 1.5 * 2^23


def _f32s(*values):
    """``values`` rounded to float32 (constants of the float32 exp)."""
    return tuple(F32(v) for v in values)


_LOG2E, _SHIFTER, _LN2_HI, _LN2_LO, _ONE, _ZERO = _f32s(
    1.4426950408889634, 12582912.0, 0.693145751953125, math.log(2.0) - 0.693145751953125, 1, 0
)
# q(r) ~ (exp(r) - 1 - r) / r^2 on |r| <= ln2 / 2: the minimax coefficients of cpu_fast.py
# (relative truncation 5e-11, 0.001 ulp)
_Q0, _Q1, _Q2, _Q3, _Q4, _Q5 = _f32s(
    0.5,
    0.1666666567325592,
    0.04166629910469055,
    0.008333495818078518,
    0.001394452410750091,
    0.00019791295926552266,
)
_NEG_INF32 = F32(-np.inf)
_NAN32 = F32(np.nan)
_POST_SCALE = F32(2.0**-64)


@cuda.jit(device=True)
def exp32_biased(hi, lo):
    """exp(hi + lo) 2^96 in float32, for hi <= 0 and |lo| <= ulp(hi): within 0.65 ulp down to
    hi = -150, 0 below (and at -inf); NaN gives NaN.

    d = n ln2 + r with n = rint(d log2 e) (the shifter trick: n sits in the low bits of t);
    r1 = d - n LN2_HI is exact (LN2_HI has 16 significant bits, |n| < 2^8, and the difference is
    a Sterbenz one); the small rest c = lo - n LN2_LO joins r only inside the polynomial. The sum
    1 + r1 is carried with its exact rounding error es (Fast2Sum), so the only large rounding is
    the last addition."""
    if hi < EXP32_FLUSH:
        return _ZERO
    t = hi * _LOG2E + _SHIFTER
    n = t - _SHIFTER
    r1 = hi - n * _LN2_HI
    c = lo - n * _LN2_LO
    r = r1 + c
    q = ((((_Q5 * r + _Q4) * r + _Q3) * r + _Q2) * r + _Q1) * r + _Q0
    s1 = _ONE + r1
    es = (_ONE - s1) + r1
    p = s1 + ((r * r) * q + (es + c))
    return p * f32_from_bits((bits_from_f32(t) - _SHIFTER_BITS + 127 + EXP_BIAS) << 23)


@cuda.jit(device=True)
def exp32_diff(v, m):
    """exp(v - m) 2^96 for float32 v <= m, from the exact difference (TwoSum)."""
    hi = v - m
    if hi < EXP32_FLUSH:  # also v = -inf or m = +inf, before the TwoSum meets inf - inf
        return _ZERO
    bb = hi - v
    return exp32_biased(hi, (v - (hi - bb)) + (-m - bb))


@cuda.jit(device=True)
def exp32_rounded(v, m):
    """exp(v - m) 2^96 for v <= m with v - m rounded: for 16-bit inputs, where the rounding
    (< 2^-17 relative) is far below their ulp."""
    return exp32_biased(v - m, _ZERO)


@cuda.jit(device=True)
def split_scale(a):
    """(hi, lo, post) float32 with (hi + lo) post = a (float64) to float32 working accuracy and
    hi normal: a gradient row's scale, prescaled by 2^64 (post = 2^-64) when it is tiny."""
    post = _ONE
    if a != 0.0 and abs(a) < 2.0**-60:
        a = a * 2.0**64
        post = _POST_SCALE
    hi = float32(a)
    return hi, float32(a - float64(hi)), post


@cuda.jit(device=True)
def grad_factor(gscale, use_denom, ws):
    """The gradient's scale: ``gscale``, divided by the device-side denominator when asked
    (NaN when it is 0: torch's mean over no rows)."""
    if not use_denom:
        return gscale
    d = ws[WS_DENOM]
    return gscale / d if d != 0.0 else math.nan


@cuda.jit(device=True)
def bcast(w, i, j):
    """w[i, j] of an (R, C') weight broadcast over rows (R = 1) and/or columns (C' = 1)."""
    return w[i if w.shape[0] > 1 else 0, j if w.shape[1] > 1 else 0]


# Workspace layout (float64): the finishing ticket, the bad-input counts, the mean's denominator,
# then two partial sums per block.
WS_TICKET, WS_BAD_TARGET, WS_BAD_VALUE, WS_DENOM, WS_HEAD = 0, 1, 2, 3, 4


# --------------------------------------------------------------------------------------------
# Kernel factory: one compiled set per (threads per block, input dtype, reduction method)
# --------------------------------------------------------------------------------------------
_CACHE = {}


def kernels(nt=None, kind="float32", method=None):
    """The kernel set for ``nt`` threads per block, logits of dtype ``kind`` (one of ``KINDS``)
    and group reductions by ``method`` ("shuffle" or "tree"); compiled lazily, cached."""
    nt = threads_per_block() if nt is None else nt
    method = reduction_method() if method is None else method
    key = (nt, kind, method)
    if key not in _CACHE:
        _CACHE[key] = _make_kernels(nt, kind, method)
    return _CACHE[key]


def _make_kernels(NT, KIND="float32", METHOD="shuffle", WARP=None):
    """Build the kernels; returns {name: kernel} with the plain Python functions under
    "_pyfuncs" so that tests can compile each one to PTX.

    Row kernels take ``tpr``, the threads per row: the block holds NT // tpr rows, thread ``tid``
    works on row ``blockIdx.x * (NT // tpr) + tid // tpr``. Every thread reaches every
    synchronisation (rows past the end compute on row 0 and write nothing)."""
    SIM = _simulator()
    SHUFFLE = METHOD == "shuffle"
    if WARP is None:
        WARP = 4 if SIM else 32  # a small emulated warp: the cross-warp step runs at 8 threads
    WARP = min(WARP, NT)
    NWARPS = NT // WARP
    EXACT64 = KIND == "float64"
    BF16 = KIND == "bfloat16"
    FT = float64 if EXACT64 else float32
    ZERO = FT(0.0)
    NEG_INF = FT(-math.inf)
    BIAS_UP = 1.0 if EXACT64 else 2.0**EXP_BIAS
    BIAS_DOWN = 1.0 if EXACT64 else UNBIAS
    FULL = 0xFFFFFFFF

    # ---- element access and the per-dtype arithmetic, chosen here (not by branches that the
    # compiler would have to prune: an unpruned branch would cost shared memory or float64) ----
    # (indices are cast to unsigned: numba then skips its negative-index wraparound, three
    # int64 operations per access; every index here is >= 0)
    if BF16:

        @cuda.jit(device=True)
        def load(a, i, j):
            """a[i, j] as the working float (bfloat16 widened from its bits)."""
            return bf16_to_f32(a[uint64(i), uint64(j)])

        @cuda.jit(device=True)
        def put(a, i, j, g):
            """a[i, j] = g rounded once to bfloat16 (to nearest even), stored as bits."""
            a[uint64(i), uint64(j)] = f32_to_bf16(float32(g))
    else:

        @cuda.jit(device=True)
        def load(a, i, j):
            return FT(a[uint64(i), uint64(j)])

        @cuda.jit(device=True)
        def put(a, i, j, g):
            a[uint64(i), uint64(j)] = FT(g)

    if EXACT64:
        term = exp_diff  # exp(v - m), the float64-exact path

        @cuda.jit(device=True)
        def prob(v, m, z, iz):
            """p = exp(v - m) / z in float64."""
            return (1.0 if v == m else exp_diff(v, m)) / z

        @cuda.jit(device=True)
        def scale_parts(a):
            return a, 0.0, 1.0
    else:
        term = exp32_diff if KIND == "float32" else exp32_rounded  # exp(v - m) 2^96

        @cuda.jit(device=True)
        def prob(v, m, z, iz):
            """p = exp(v - m) / z in float64 (iz = 2^-96 / z)."""
            return float64(term(v, m)) * iz

        scale_parts = split_scale

    @cuda.jit(device=True)
    def load4(a, i, j, step):
        """a[i, j], a[i, j + step], a[i, j + 2 step], a[i, j + 3 step]: four loads issued
        before any arithmetic on them (bytes in flight to stream from HBM; the fused kernels
        write each element after reading it, so the compiler could not hoist later loads)."""
        return (
            load(a, i, j),
            load(a, i, j + step),
            load(a, i, j + 2 * step),
            load(a, i, j + 3 * step),
        )

    # ---- shuffles (emulated in the simulator: shared memory, one exchange per call) --------
    if SIM:

        def _emulated(cast):
            # one float64 array for every type (the simulator keys shared arrays by source line;
            # float32 and int32 values are exact in float64)
            @cuda.jit(device=True)
            def shfl(v, off):
                sh = cuda.shared.array(NT, float64)
                tid = cuda.threadIdx.x
                sh[tid] = v
                cuda.syncthreads()
                o = sh[tid ^ off]
                cuda.syncthreads()
                return cast(o)

            return shfl

        shfl_ft, shfl_f64, shfl_i32 = _emulated(FT), _emulated(float64), _emulated(int)
    else:

        @cuda.jit(device=True)
        def shfl_ft(v, off):
            return cuda.shfl_xor_sync(FULL, v, off)

        shfl_f64 = shfl_ft

        @cuda.jit(device=True)
        def shfl_i32(v, off):
            return cuda.shfl_xor_sync(FULL, int32(v), off)

    # ---- group reductions (every thread of the block calls them) ------------------------
    @cuda.jit(device=True)
    def butterfly_max(m, width):
        off = width // 2
        while off > 0:
            o = shfl_ft(m, off)
            m = o if o > m else m
            off //= 2
        return m

    @cuda.jit(device=True)
    def butterfly_sums(a, b, t, k, width):
        off = width // 2
        while off > 0:
            a += shfl_f64(a, off)
            b += shfl_f64(b, off)
            t += shfl_i32(t, off)
            ko = shfl_i32(k, off)
            k = ko if ko < k else k
            off //= 2
        return a, b, t, k

    if SHUFFLE:

        @cuda.jit(device=True)
        def group_max(m, tid, lane, tpr, base):
            """The maximum of m over each group of ``tpr`` threads, in every thread of the group
            (m is never NaN): a butterfly in each warp, then one over the group's warps."""
            m = butterfly_max(m, min(tpr, WARP))
            if tpr > WARP:
                sh = cuda.shared.array(NWARPS, FT)
                lw = tid % WARP
                if lw == 0:
                    sh[tid // WARP] = m
                cuda.syncthreads()
                nw = tpr // WARP
                m = butterfly_max(sh[base // WARP + lw % nw], nw)
                cuda.syncthreads()
            return m

        @cuda.jit(device=True)
        def group_sums(a, b, t, k, tid, lane, tpr, base):
            """(sum a, sum b, sum t, min k) over each group of ``tpr`` threads (a, b float64;
            t, k int32), in every thread of the group."""
            a, b, t, k = butterfly_sums(a, b, t, k, min(tpr, WARP))
            if tpr > WARP:
                sa = cuda.shared.array(NWARPS, float64)
                sb = cuda.shared.array(NWARPS, float64)
                st = cuda.shared.array(NWARPS, int32)
                sk = cuda.shared.array(NWARPS, int32)
                lw = tid % WARP
                if lw == 0:
                    sa[tid // WARP] = a
                    sb[tid // WARP] = b
                    st[tid // WARP] = t
                    sk[tid // WARP] = k
                cuda.syncthreads()
                nw = tpr // WARP
                q = base // WARP + lw % nw
                a, b, t, k = butterfly_sums(sa[q], sb[q], st[q], sk[q], nw)
                cuda.syncthreads()
            return a, b, t, k
    else:

        @cuda.jit(device=True)
        def group_max(m, tid, lane, tpr, base):
            """As above, by a tree in shared memory (the simulator's default)."""
            sh = cuda.shared.array(NT, FT)
            sh[tid] = m
            cuda.syncthreads()
            stride = tpr // 2
            while stride > 0:
                if lane < stride and sh[tid + stride] > sh[tid]:
                    sh[tid] = sh[tid + stride]
                cuda.syncthreads()
                stride //= 2
            m = sh[base]
            cuda.syncthreads()
            return m

        @cuda.jit(device=True)
        def group_sums(a, b, t, k, tid, lane, tpr, base):
            """As above, by a tree in shared memory."""
            sa = cuda.shared.array(NT, float64)
            sb = cuda.shared.array(NT, float64)
            st = cuda.shared.array(NT, int32)
            sk = cuda.shared.array(NT, int32)
            sa[tid] = a
            sb[tid] = b
            st[tid] = t
            sk[tid] = k
            cuda.syncthreads()
            stride = tpr // 2
            while stride > 0:
                if lane < stride:
                    sa[tid] += sa[tid + stride]
                    sb[tid] += sb[tid + stride]
                    st[tid] += st[tid + stride]
                    if sk[tid + stride] < sk[tid]:
                        sk[tid] = sk[tid + stride]
                cuda.syncthreads()
                stride //= 2
            a, b, t, k = sa[base], sb[base], st[base], sk[base]
            cuda.syncthreads()
            return a, b, t, k

    @cuda.jit(device=True)
    def locate(n_rows, tpr):
        """(tid, lane, base, i, active, r): the thread, its place in its group of ``tpr``, the
        group's first thread, the group's row, whether that row exists, the row to read."""
        tid = cuda.threadIdx.x
        g = tid // tpr
        i = cuda.blockIdx.x * (NT // tpr) + g
        active = i < n_rows
        return tid, tid - g * tpr, g * tpr, i, active, i if active else 0

    # ---- reduction of the per-row losses inside the launch -------------------------------
    @cuda.jit(device=True)
    def finish(v, d, mode, ws):
        """Block sums of (loss, count) into the workspace; the last block to finish sums every
        block's pair (in block order, compensated) and returns (True, sum or sum / count)."""
        tid = cuda.threadIdx.x
        tot, den, _, _ = group_sums(v, d, 0, 0, tid, tid, NT, 0)
        last = cuda.shared.array(1, int32)
        nb = cuda.gridDim.x
        if tid == 0:
            ws[WS_HEAD + 2 * cuda.blockIdx.x] = tot
            ws[WS_HEAD + 2 * cuda.blockIdx.x + 1] = den
            cuda.threadfence()
            last[0] = cuda.atomic.add(ws, WS_TICKET, 1.0) == nb - 1
        cuda.syncthreads()
        if last[0] == 0:
            return False, 0.0
        s = 0.0
        c = 0.0
        d = 0.0
        for q in range(tid, nb, NT):  # atomic reads: other blocks' writes, past any cache
            s, c = neumaier_add(s, c, cuda.atomic.add(ws, WS_HEAD + 2 * q, 0.0))
            d += cuda.atomic.add(ws, WS_HEAD + 2 * q + 1, 0.0)
        tot, den, _, _ = group_sums(s + c, d, 0, 0, tid, tid, NT, 0)
        if tid == 0:
            ws[WS_TICKET] = 0.0
        if mode == 1:
            return tid == 0, tot
        return tid == 0, (tot / den if den != 0.0 else math.nan)

    @cuda.jit(device=True)
    def emit_row(mode, writer, i, loss, weight, out_loss, ws):
        """Row i's loss: stored (mode 0) or reduced (every thread must call this)."""
        if mode == 0:
            if writer:
                out_loss[i] = loss
            return
        done, total = finish(loss if writer else 0.0, weight if writer else 0.0, mode, ws)
        if done:
            out_loss[0] = total

    @cuda.jit(device=True)
    def flag(ws, slot, writer, bad):
        if writer and bad:
            cuda.atomic.add(ws, slot, 1.0)

    # ---- one row's statistics ----------------------------------------------------------
    @cuda.jit(device=True)
    def rescale(s, c, t, m_old, m_new):
        """The state (s + c, t ties) at maximum m_old, rescaled to m_new >= m_old: terms below
        the new maximum, as a float pair (float64 arithmetic: exact to 2^-50 however often)."""
        total = (float64(s) + float64(c) + t * BIAS_UP) * exp_diff(float64(m_old), float64(m_new))
        hi = FT(total)
        return hi, FT(total - float64(hi))

    @cuda.jit(device=True)
    def take(v, j, m, s, c, t, k):
        """Fold x_j = v <= m into the state: a tie, or a term of the (Kahan-compensated) sum."""
        if v == m:
            t += 1
            if j < k:
                k = j
        else:
            y = term(v, m) + c
            u = s + y
            c = y - (u - s)
            s = u
        return s, c, t, k

    @cuda.jit(device=True)
    def raise_max(mc, m, s, c, t, k, n):
        """Make mc (a chunk's maximum, never NaN) the running maximum if it is larger."""
        if mc > m:
            s, c = rescale(s, c, t, m, mc)
            return mc, s, c, 0, n
        return m, s, c, t, k

    @cuda.jit(device=True)
    def bigger(v, m):
        return v if v > m else m

    @cuda.jit(device=True)
    def row_stats(x, r, tid, lane, tpr, base):
        """(m, s, t, k) of row r for its group: m = max (working dtype), S = s * BIAS_DOWN + t - 1
        = sum_{j != k} exp(x_j - m) with s float64, t the count of maxima, k the first argmax
        (row length if none). A NaN in the row makes s NaN. One read of the row."""
        n = x.shape[1]
        m = NEG_INF
        s = ZERO
        c = ZERO
        t = 0
        k = n
        j = lane
        while j + 7 * tpr < n:
            v0, v1, v2, v3 = load4(x, r, j, tpr)
            v4, v5, v6, v7 = load4(x, r, j + 4 * tpr, tpr)
            mc = bigger(
                v7,
                bigger(
                    v6, bigger(v5, bigger(v4, bigger(v3, bigger(v2, bigger(v1, bigger(v0, m))))))
                ),
            )
            m, s, c, t, k = raise_max(mc, m, s, c, t, k, n)
            s, c, t, k = take(v0, j, m, s, c, t, k)
            s, c, t, k = take(v1, j + tpr, m, s, c, t, k)
            s, c, t, k = take(v2, j + 2 * tpr, m, s, c, t, k)
            s, c, t, k = take(v3, j + 3 * tpr, m, s, c, t, k)
            s, c, t, k = take(v4, j + 4 * tpr, m, s, c, t, k)
            s, c, t, k = take(v5, j + 5 * tpr, m, s, c, t, k)
            s, c, t, k = take(v6, j + 6 * tpr, m, s, c, t, k)
            s, c, t, k = take(v7, j + 7 * tpr, m, s, c, t, k)
            j += 8 * tpr
        while j < n:
            v = load(x, r, j)
            m, s, c, t, k = raise_max(bigger(v, m), m, s, c, t, k, n)
            s, c, t, k = take(v, j, m, s, c, t, k)
            j += tpr
        mg = group_max(m, tid, lane, tpr, base)
        if m == mg:
            own = float64(s) + float64(c)
        else:
            own = (float64(s) + float64(c) + t * BIAS_UP) * exp_diff(float64(m), float64(mg))
            t = 0
            k = n
        total, _, ties, first = group_sums(own, 0.0, t, k, tid, lane, tpr, base)
        return mg, total, ties, first

    @cuda.jit(device=True)
    def stats_s(total, ties):
        """S = sum_{j != k} exp(x_j - m) in float64 from row_stats' (s, t); NaN for a NaN row."""
        S = total * BIAS_DOWN + (ties - 1)
        return S if S >= 0.0 else math.nan

    @cuda.jit(device=True)
    def fill_row(out_grad, i, lane, tpr, fill):
        for j in range(lane, out_grad.shape[1], tpr):
            put(out_grad, i, j, fill)

    @cuda.jit(device=True)
    def class_target(target, r, ignore_index, nc):
        """(y, ignored, valid, yy): row r's class index, whether it is ``ignore_index``, whether
        it is that or in [0, nc), and the class to read (y, or 0 when ignored or invalid)."""
        y = target[r]
        ignored = y == ignore_index
        valid = ignored or (y >= 0 and y < nc)
        return y, ignored, valid, y if valid and not ignored else 0

    @cuda.jit(device=True)
    def class_row_guard(ws, writer, ignored, valid, w, s, m):
        """(skip, fill) of a class-index row: 0 when ignored; NaN for a NaN row or a non-finite
        maximum, and for a target out of range or a negative class weight (both counted)."""
        skip, fill = row_guard(ignored, s != s, float64(m))
        flag(ws, WS_BAD_TARGET, writer, not valid)
        flag(ws, WS_BAD_VALUE, writer, valid and w < 0.0)
        if not valid or w < 0.0:
            return True, math.nan
        return skip, fill

    @cuda.jit(device=True)
    def class_row_start(x, target, weight, ignore_index, tpr):
        """The class-index kernels' start: the thread's place (``locate``), the class count, the
        row's target (``class_target``: y, ignored, valid), x_y in the working dtype, the row's
        (m, S, k), the target's class weight and ``tpr``: the tuple that the row losses of
        ``class_index_kernel`` take. x_y is read before the row statistics: with the
        gradient written in place, no read of the row may follow the group reduction."""
        tid, lane, base, i, active, r = locate(x.shape[0], tpr)
        nc = x.shape[1]
        y, ignored, valid, yy = class_target(target, r, ignore_index, nc)
        xy = load(x, r, yy)
        m, tot, ties, k = row_stats(x, r, tid, lane, tpr, base)
        s = stats_s(tot, ties)
        return tid, lane, base, i, active, r, nc, y, ignored, valid, xy, m, s, k, weight[yy], tpr

    # ---- kernels -------------------------------------------------------------------------
    @cuda.jit(device=True)
    def ce_elem(v, j, y, gy, m, hi, lo, post):
        """One gradient entry of the class-index cross-entropy without smoothing:
        c p_j = (e_j hi + e_j lo) post with e_j = exp(x_j - m) 2^96, or the row's gy at y."""
        e = term(v, m)
        return FT(gy) if j == y else (e * FT(hi) + e * FT(lo)) * FT(post)

    @cuda.jit(device=True)
    def ce_smooth_elem(v, j, y, k, y_top, gy, m, s, z, iz, c_true, c_smooth, wsum, wj):
        """One gradient entry with label smoothing (float64, see cpu.py)."""
        p = prob(v, m, z, iz)
        gj = gy if j == y else c_true * p
        if (j == y and y_top) or (j == k and not y_top):
            return gj + c_smooth * argmax_grad(wsum, wj, s, z)
        return gj + c_smooth * (wsum * p - wj)

    @cuda.jit(device=True)
    def ce_index_row(x, row, weight, eps, gscale, use_denom, with_grad, out_grad, ws):
        """The class-index cross-entropy (label smoothing ``eps``) of ``class_row_start``'s
        ``row``, its gradient row written when asked; returns the row's loss (its fill when
        skipped)."""
        tid, lane, base, i, active, r, nc, y, ignored, valid, xy, m, s, k, w, tpr = row
        L = math.log1p(s) if s == s else math.nan
        loss = w * neg_log_prob(float64(xy), float64(m), L)
        wsum = 0.0
        if eps != 0.0:
            ps = 0.0
            pc = 0.0
            wp = 0.0
            for j in range(lane, nc, tpr):
                ps, pc = neumaier_add(ps, pc, weight[j] * (float64(m) - float64(load(x, r, j))))
                wp += weight[j]
            smooth, wsum, _, _ = group_sums(ps + pc, wp, 0, 0, tid, lane, tpr, base)
            loss = (1.0 - eps) * loss + (eps / nc) * (smooth + wsum * L)
        writer = active and lane == 0
        skip, fill = class_row_guard(ws, writer, ignored, valid, w, s, m)
        if with_grad and active and skip:
            fill_row(out_grad, i, lane, tpr, fill)
        elif with_grad and active:
            gs = grad_factor(gscale, use_denom, ws)
            z = 1.0 + s
            c_true = (1.0 - eps) * w * gs
            y_top = xy == m
            gy = c_true * (-s / z if y_top else exp_diff(float64(xy), float64(m)) / z - 1.0)
            if eps == 0.0:
                hi, lo, post = scale_parts(c_true * BIAS_DOWN / z)
                j = lane
                while j + 3 * tpr < nc:
                    v0, v1, v2, v3 = load4(x, r, j, tpr)
                    put(out_grad, i, j, ce_elem(v0, j, y, gy, m, hi, lo, post))
                    put(out_grad, i, j + tpr, ce_elem(v1, j + tpr, y, gy, m, hi, lo, post))
                    put(out_grad, i, j + 2 * tpr, ce_elem(v2, j + 2 * tpr, y, gy, m, hi, lo, post))
                    put(out_grad, i, j + 3 * tpr, ce_elem(v3, j + 3 * tpr, y, gy, m, hi, lo, post))
                    j += 4 * tpr
                while j < nc:
                    put(out_grad, i, j, ce_elem(load(x, r, j), j, y, gy, m, hi, lo, post))
                    j += tpr
            else:
                c_smooth = (eps / nc) * gs
                iz = BIAS_DOWN / z
                for j in range(lane, nc, tpr):
                    put(
                        out_grad,
                        i,
                        j,
                        ce_smooth_elem(
                            load(x, r, j),
                            j,
                            y,
                            k,
                            y_top,
                            gy,
                            m,
                            s,
                            z,
                            iz,
                            c_true,
                            c_smooth,
                            wsum,
                            weight[j],
                        ),
                    )
        return fill if skip else loss

    @cuda.jit(device=True)
    def soft_row_start(x, tpr):
        """The soft-target kernels' start: the thread's place (``locate``), the class count, the
        row's (m, S, k) and ``tpr``, the tuple that ``soft_row_end`` takes. (The class-index
        kernels read x_y before the row statistics: with the gradient written in place, no read
        of the row may follow the group reduction.)"""
        tid, lane, base, i, active, r = locate(x.shape[0], tpr)
        m, tot, ties, k = row_stats(x, r, tid, lane, tpr, base)
        return tid, lane, base, i, active, r, x.shape[1], m, stats_s(tot, ties), k, tpr

    @cuda.jit(device=True)
    def soft_row_end(
        x,
        row,
        target,
        weight,
        eps,
        weighted,
        a_sum,
        neg,
        gscale,
        use_denom,
        with_grad,
        out_grad,
        ws,
    ):
        """The soft-target kernels' ending: the row guard (NaN for a NaN row or a negative
        target, which is also counted) and the gradient A p_j - a_j, the argmax entry without
        cancellation; a_j is the smoothed, weighted target (``weighted``) or the target itself.
        ``row`` is what ``soft_row_start`` returned. Returns (skip, fill)."""
        _, lane, _, i, active, r, nc, m, s, k, tpr = row
        skip, fill = row_guard(False, s != s or neg > 0, float64(m))
        flag(ws, WS_BAD_VALUE, active and lane == 0, neg > 0)
        if with_grad and active and skip:
            fill_row(out_grad, i, lane, tpr, fill)
        elif with_grad and active:
            gs = grad_factor(gscale, use_denom, ws)
            z = 1.0 + s
            iz = BIAS_DOWN / z
            for j in range(lane, nc, tpr):
                t = float64(target[r, j])
                a = soft_target(weight[j], t, eps, nc) if weighted else t
                if j == k:
                    gj = argmax_grad(a_sum, a, s, z)
                else:
                    gj = a_sum * prob(load(x, r, j), m, z, iz) - a
                put(out_grad, i, j, gj * gs)
        return skip, fill

    def ce_prob(
        x, target, weight, eps, gscale, use_denom, with_grad, tpr, mode, out_loss, out_grad, ws
    ):
        row = soft_row_start(x, tpr)
        tid, lane, base, i, active, r, nc, m, s, k, _ = row
        sa = ca = st = ct = 0.0  # compensated sums of a_j (A) and of a_j (m - x_j)
        neg = 0
        for j in range(lane, nc, tpr):
            tj = float64(target[r, j])
            neg += tj < 0.0
            a = soft_target(weight[j], tj, eps, nc)
            if a != 0.0:
                sa, ca = neumaier_add(sa, ca, a)
                hi, lo = two_diff(float64(m), float64(load(x, r, j)))
                st, ct = neumaier_add(st, ct, a * hi)
                ct += a * lo
        A, t_sum, neg, _ = group_sums(sa + ca, st + ct, neg, 0, tid, lane, tpr, base)
        skip, fill = soft_row_end(
            x, row, target, weight, eps, True, A, neg, gscale, use_denom, with_grad, out_grad, ws
        )
        loss = t_sum + A * math.log1p(s) if not skip else fill
        emit_row(mode, active and lane == 0, i, loss, 1.0, out_loss, ws)

    def kl(x, target, gscale, use_denom, with_grad, tpr, mode, out_loss, out_grad, ws):
        row = soft_row_start(x, tpr)
        tid, lane, base, i, active, r, nc, m, s, k, _ = row
        L = math.log1p(s) if s == s else math.nan
        ks = kc = ps = pc = 0.0  # compensated sums of the KL terms and of p_j
        neg = 0
        for j in range(lane, nc, tpr):
            p = float64(target[r, j])
            neg += p < 0.0
            if p > 0.0:
                ks, kc = neumaier_add(ks, kc, kl_term(p, float64(load(x, r, j)), float64(m), L))
            ps, pc = neumaier_add(ps, pc, p)
        total, p_sum, neg, _ = group_sums(ks + kc, ps + pc, neg, 0, tid, lane, tpr, base)
        skip, fill = soft_row_end(
            x, row, target, ws, 0.0, False, p_sum, neg, gscale, use_denom, with_grad, out_grad, ws
        )
        emit_row(mode, active and lane == 0, i, fill if skip else total, 1.0, out_loss, ws)

    @cuda.jit(device=True)
    def focal_softmax_row(x, row, weight, gamma, gscale, use_denom, with_grad, out_grad, ws):
        """The softmax focal loss (focusing ``gamma``) of ``class_row_start``'s ``row``, its
        gradient row written when asked; returns the row's loss (its fill when skipped)."""
        tid, lane, base, i, active, r, nc, y, ignored, valid, xv, m, s, k, w, tpr = row
        xy = float64(xv)
        m64 = float64(m)
        writer = active and lane == 0
        skip, fill = class_row_guard(ws, writer, ignored, valid, w, s, m)
        z = 1.0 + s
        ce = neg_log_prob(xy, m64, math.log1p(s) if s == s else math.nan)
        y_top = xy == m64
        a, p_y = focal_parts(s, 1.0 if y_top else exp_diff(xy, m64), y_top)
        a_gamma = pow_nonneg(a, gamma) if not skip else 0.0
        loss = w * a_gamma * ce
        if with_grad and active and skip:
            fill_row(out_grad, i, lane, tpr, fill)
        elif with_grad and active:
            gs = grad_factor(gscale, use_denom, ws)
            inner = focal_inner(gamma, ce, p_y, a)
            iz = BIAS_DOWN / z
            for j in range(lane, nc, tpr):
                p = prob(load(x, r, j), m, z, iz)
                put(out_grad, i, j, focal_grad(j == y, p, a, a_gamma, inner, w) * gs)
        return fill if skip else loss

    def class_index_kernel(row_loss):
        """A class-index row kernel: ``class_row_start``, then ``row_loss(x, row, weight, p,
        gscale, use_denom, with_grad, out_grad, ws)`` with the loss's own parameter ``p``
        (``ce_index_row``, ``focal_softmax_row``), then the row's loss stored or reduced with
        the row's weight (0 when ignored)."""

        def kernel(
            x,
            target,
            weight,
            ignore_index,
            p,
            gscale,
            use_denom,
            with_grad,
            tpr,
            mode,
            out_loss,
            out_grad,
            ws,
        ):
            row = class_row_start(x, target, weight, ignore_index, tpr)
            loss = row_loss(x, row, weight, p, gscale, use_denom, with_grad, out_grad, ws)
            _, lane, _, i, active, _, _, _, ignored, _, _, _, _, _, w, _ = row
            emit_row(mode, active and lane == 0, i, loss, 0.0 if ignored else w, out_loss, ws)

        return kernel

    ce_index = class_index_kernel(ce_index_row)
    focal_softmax = class_index_kernel(focal_softmax_row)

    # ---- element-wise kernels ------------------------------------------------------------
    @cuda.jit(device=True)
    def emit_elements(mode, s, cnt, bad, out_loss, ws):
        """The element kernels' ending: bad-input count, then the reduction (modes 1, 2)."""
        if bad:
            cuda.atomic.add(ws, WS_BAD_VALUE, float64(bad))
        if mode != 0:
            done, total = finish(s, cnt, mode, ws)
            if done:
                out_loss[0, 0] = total

    @cuda.jit(device=True)
    def keep_element(mode, out_loss, i, j, loss, s, c, cnt):
        """Store one element's loss (mode 0) or add it to this thread's compensated sum."""
        if mode == 0:
            out_loss[i, j] = loss
            return s, c, cnt
        s, c = neumaier_add(s, c, loss)
        return s, c, cnt + 1.0

    def element_kernel(formula):
        """An element-wise kernel over ``formula(v, t, i, j, p1, p2) -> (loss, grad, bad)``:
        one thread per element (grid-stride), the losses stored or reduced in the launch."""

        def kernel(x, target, p1, p2, gscale, use_denom, with_grad, mode, out_loss, out_grad, ws):
            nc = x.shape[1]
            s = 0.0
            c = 0.0
            cnt = 0.0
            bad = 0
            gs = grad_factor(gscale, use_denom, ws)
            for idx in range(cuda.grid(1), x.shape[0] * nc, cuda.gridsize(1)):
                i = idx // nc
                j = idx - i * nc
                loss, g, b = formula(float64(load(x, i, j)), float64(target[i, j]), i, j, p1, p2)
                bad += b
                s, c, cnt = keep_element(mode, out_loss, i, j, loss, s, c, cnt)
                if with_grad:
                    put(out_grad, i, j, g * gs)
            emit_elements(mode, s + c, cnt, bad, out_loss, ws)

        return kernel

    @cuda.jit(device=True)
    def bce_formula(v, t, i, j, weight, pos_weight):
        """BCE with logits, weights broadcast; a negative weight gives NaN and is counted."""
        w = bcast(weight, i, j)
        pw = bcast(pos_weight, i, j)
        if w < 0.0 or pw < 0.0:
            return math.nan, math.nan, 1
        return w * bce_logits_elem(v, t, pw), w * bce_logits_grad(v, t, pw), 0

    @cuda.jit(device=True)
    def sigmoid_focal_formula(v, t, i, j, alpha, gamma):
        loss, g = sigmoid_focal_elem(v, t, alpha, gamma)
        return loss, g, 0

    bce_logits = element_kernel(bce_formula)
    sigmoid_focal = element_kernel(sigmoid_focal_formula)

    # ---- helpers -------------------------------------------------------------------------
    def index_weight_sum(target, weight, ignore_index, ws):
        """ws[WS_DENOM] = sum of weight[target_i] over the rows whose target is in range and not
        ignored (one block): torch's denominator for reduction="mean"."""
        tid = cuda.threadIdx.x
        s = 0.0
        c = 0.0
        for q in range(tid, target.shape[0], NT):
            y = target[q]
            if y != ignore_index and y >= 0 and y < weight.shape[0]:
                s, c = neumaier_add(s, c, weight[y])
        total, _, _, _ = group_sums(s + c, 0.0, 0, 0, tid, tid, NT, 0)
        if tid == 0:
            ws[WS_DENOM] = total

    def row_sum(values, tpr, out):
        """out_i = compensated sum of row i of ``values`` (N, C) float64."""
        tid, lane, base, i, active, r = locate(values.shape[0], tpr)
        s = 0.0
        c = 0.0
        for j in range(lane, values.shape[1], tpr):
            s, c = neumaier_add(s, c, values[r, j])
        total, _, _, _ = group_sums(s + c, 0.0, 0, 0, tid, lane, tpr, base)
        if active and lane == 0:
            out[i] = total

    def widen(x, out):
        """out = x as float32 (x of this set's dtype; bfloat16 from its bits)."""
        nc = x.shape[1]
        for idx in range(cuda.grid(1), x.shape[0] * nc, cuda.gridsize(1)):
            i = idx // nc
            out[i, idx - i * nc] = float32(load(x, i, idx - i * nc))

    funcs = dict(
        cross_entropy_index=ce_index,
        cross_entropy_prob=ce_prob,
        kl_divergence=kl,
        softmax_focal=focal_softmax,
        bce_with_logits=bce_logits,
        sigmoid_focal=sigmoid_focal,
        index_weight_sum=index_weight_sum,
        row_sum=row_sum,
        widen=widen,
    )
    # launch_bounds caps the registers so that blocks of NT threads can always launch (without
    # it, 1024-thread blocks of the unrolled row kernels ran out of registers on an H200)
    # (the simulator's cuda.jit takes no launch_bounds)
    opts = {} if SIM else {"launch_bounds": NT}
    compiled = {name: cuda.jit(f, **opts) for name, f in funcs.items()}
    compiled["_pyfuncs"] = funcs
    compiled["threads"] = NT
    compiled["kind"] = KIND
    return compiled


# --------------------------------------------------------------------------------------------
# Device arrays: bfloat16 bits, DLPack and torch, kinds
# --------------------------------------------------------------------------------------------
class BFloat16Bits:
    """bfloat16 values on the device, held as a 16-bit integer device array of their bits.

    numba has no bfloat16 arrays, so a bfloat16 device array reaches the kernels as its bits:
    ``BFloat16Bits(bits)`` for a uint16/int16 device array (numba, CuPy, a torch ``int16``
    view); torch bfloat16 tensors, ``'<V2'`` interfaces and ``__dlpack__`` objects are wrapped by
    :func:`as_device_logits`. ``copy_to_host()`` returns an ``ml_dtypes.bfloat16``
    array; bfloat16 outputs (gradients) come back in this wrapper."""

    __slots__ = ("bits",)
    dtype = dtypes.bfloat16

    def __init__(self, bits):
        b = as_device(bits)
        if b.dtype not in (np.dtype(np.uint16), np.dtype(np.int16)):
            raise TypeError(f"bfloat16 bits must be a uint16 or int16 device array; got {b.dtype}")
        self.bits = b.view(np.uint16) if b.dtype == np.int16 else b

    @property
    def shape(self):
        return tuple(self.bits.shape)

    @property
    def ndim(self):
        return len(self.bits.shape)

    @property
    def size(self):
        return self.bits.size

    @property
    def __cuda_array_interface__(self):
        """The bits' interface (uint16), so that the wrapper counts as a device array."""
        return getattr(self.bits, "__cuda_array_interface__", None)

    def reshape(self, *shape):
        return BFloat16Bits(self.bits.reshape(*shape))

    def __getitem__(self, key):
        return BFloat16Bits(self.bits[key])

    def copy_to_host(self):
        return self.bits.copy_to_host().view(dtypes.bfloat16)

    def __repr__(self):
        return f"BFloat16Bits(shape={self.shape})"


def bfloat16_bits(bits) -> BFloat16Bits:
    """Mark a uint16/int16 device array as holding bfloat16 bits (no copy)."""
    return BFloat16Bits(bits)


def is_device_array(a) -> bool:
    """Whether ``a`` lives on the device: anything with ``__cuda_array_interface__``, a
    :class:`BFloat16Bits`, or a device array of the CUDA simulator (which has no interface)."""
    if a is None or isinstance(a, np.ndarray):
        return False
    return hasattr(a, "__cuda_array_interface__") or type(a).__name__ == "FakeCUDAArray"


def as_device(a):
    """A numba view of any CUDA array (numba, CuPy, torch), without a copy and without
    synchronising the stream an interface names (the kernels run on the default stream, which
    waits for blocking streams; work on a non-blocking stream is the caller's to order);
    TypeError for host arrays."""
    if isinstance(a, BFloat16Bits):
        return a
    if getattr(a, "__cuda_array_interface__", None) is not None and hasattr(cuda, "as_cuda_array"):
        return cuda.as_cuda_array(a, sync=False)
    if is_device_array(a):
        return a
    raise TypeError(
        f"expected a device array (with __cuda_array_interface__); got {type(a).__name__}"
    )


def _is_torch(a) -> bool:
    return type(a).__module__.split(".")[0] == "torch" and hasattr(a, "dtype")


def as_device_logits(a):
    """A device array of any float dtype, without a copy: a numba array (float64, float32,
    float16), or :class:`BFloat16Bits` for a torch bfloat16 tensor (through its int16 view) or
    an object that only speaks DLPack (through ``torch.from_dlpack``)."""
    if isinstance(a, BFloat16Bits):
        return a
    if _is_torch(a):
        import torch

        a = a.detach()  # the interface refuses tensors that require grad; no copy
        if a.dtype == torch.bfloat16:
            return BFloat16Bits(a.view(torch.int16))
        return as_device(a)
    if not is_device_array(a) and hasattr(a, "__dlpack__") and not isinstance(a, np.ndarray):
        try:
            import torch
        except ImportError:
            raise TypeError(
                f"{type(a).__name__} speaks only DLPack; reading it needs torch "
                "(or pass its bits with cestudy.kernels.cuda.bfloat16_bits)"
            ) from None
        return as_device_logits(torch.from_dlpack(a))
    d = as_device(a)
    if d.dtype.kind == "V" and d.dtype.itemsize == 2:  # '<V2': ml_dtypes' (and torch's) bfloat16
        return BFloat16Bits(d.view(np.uint16))
    return d


def kind_of(a) -> str:
    """The kernel set an array needs: its dtype's name, one of ``KINDS``."""
    name = dtypes.dtype_name(a.dtype)
    if name not in KINDS:
        raise TypeError(f"no CUDA kernels for dtype {a.dtype}; use one of {', '.join(KINDS)}")
    return name


def _storage(a):
    """The array the kernels index: a bfloat16 wrapper's bits, else the array."""
    return a.bits if isinstance(a, BFloat16Bits) else a


def device_array(shape, dtype):
    """A new, uninitialised device array (bfloat16: a :class:`BFloat16Bits`)."""
    if np.dtype(dtype) == dtypes.bfloat16:
        return BFloat16Bits(cuda.device_array(shape, np.uint16))
    return cuda.device_array(shape, dtype)


def loss_dtype(kind: str) -> np.dtype:
    """The dtype of the losses for logits of ``kind``: float64 for float64, else float32."""
    return np.dtype(np.float64 if kind == "float64" else np.float32)


def as_device_values(a):
    """A device array of float values the kernels read with ``float64()``: bfloat16 widened to
    float32 on the device (one launch), other dtypes as they are."""
    a = as_device_logits(a)
    if not isinstance(a, BFloat16Bits):
        return a
    shape = a.shape
    bits = a.bits.reshape(1, a.size) if len(shape) != 2 else a.bits
    out = cuda.device_array(bits.shape, np.float32)
    if a.size:
        k = kernels(kind="bfloat16")
        k["widen"][_grid_1d(a.size, k["threads"]), k["threads"]](bits, out)
    return out.reshape(*shape) if len(shape) != 2 else out


# --------------------------------------------------------------------------------------------
# Cached device buffers: workspace, ones, stand-in gradient
# --------------------------------------------------------------------------------------------
_WORKSPACE = {}
_ONES = {}
_STAND_IN = {}
_MIN_PARTIALS = 1 << 15


def _device_key():
    return getattr(cuda.get_current_device(), "id", 0)  # the simulator's device has no id


def workspace(n_blocks: int = 0):
    """The float64 workspace of this device (``WS_*`` slots, then 2 partial sums per block),
    zeroed once and grown when a launch has more blocks; kernels on the default stream use it in
    turn (the finishing ticket is reset by the block that takes the last one)."""
    key = _device_key()
    ws = _WORKSPACE.get(key)
    need = WS_HEAD + 2 * max(n_blocks, _MIN_PARTIALS)
    if ws is None or ws.size < need:
        new = cuda.to_device(np.zeros(need))
        if ws is not None:
            new[:WS_HEAD].copy_to_device(ws[:WS_HEAD])  # keep the bad-input counts
        _WORKSPACE[key] = ws = new
    return ws


def _cached(store, key, make):
    """A small per-device cache of constant device arrays (made once, by a host copy)."""
    key = (_device_key(), key)
    if key not in store:
        if len(store) >= 64:
            store.pop(next(iter(store)))
        store[key] = make()
    return store[key]


def _ones(shape):
    return _cached(_ONES, shape, lambda: cuda.to_device(np.ones(shape)))


def _stand_in(dtype):
    """A (1, 1) gradient of the right type that a forward launch never writes."""
    return _cached(_STAND_IN, np.dtype(dtype).str, lambda: cuda.device_array((1, 1), dtype))


def raise_device_errors():
    """Read the bad-input counts the kernels kept since the last call (a host synchronisation),
    reset them, and raise ValueError if any: targets out of range (their rows are NaN), negative
    weights or target probabilities (their rows or elements are NaN)."""
    ws = workspace()
    counts = ws[:WS_HEAD].copy_to_host()
    if counts[WS_BAD_TARGET] or counts[WS_BAD_VALUE]:
        ws[WS_BAD_TARGET:WS_DENOM].copy_to_device(np.zeros(2))
        parts = []
        if counts[WS_BAD_TARGET]:
            parts.append(
                f"target held {int(counts[WS_BAD_TARGET])} class indices out of range "
                "(expected 0 <= target < C or ignore_index)"
            )
        if counts[WS_BAD_VALUE]:
            parts.append(
                f"{int(counts[WS_BAD_VALUE])} negative entries in a weight or a "
                "probability target (expected >= 0)"
            )
        raise ValueError("; ".join(parts) + "; the rows (elements) concerned are NaN")


def sync_checks() -> bool:
    """Whether each call checks its input on the host after the launch (raises at once): set
    $CESTUDY_CUDA_CHECKS=sync; the default ("async") never synchronises."""
    return os.environ.get("CESTUDY_CUDA_CHECKS", "async") == "sync"


# --------------------------------------------------------------------------------------------
# Launches
# --------------------------------------------------------------------------------------------
def _grid_1d(total, nt, cap=4096):
    return max(1, min((total + nt - 1) // nt, cap))


def _class_weight(weight, c):
    """A class weight on the device: cached ones for None, host arrays copied."""
    if weight is None:
        return _ones(c)
    if is_device_array(weight):
        return as_device(weight)
    return cuda.to_device(np.ascontiguousarray(weight, dtype=np.float64))


def _element_weight(weight, shape):
    """An element-wise weight as an (R, C') float64 device array broadcast by the kernels."""
    if weight is None:
        return _ones((1, 1))
    if is_device_array(weight):
        w = as_device(weight)
    else:
        w = np.asarray(weight, dtype=np.float64)
    if len(w.shape) < 2:
        w = w.reshape((1,) * (2 - len(w.shape)) + tuple(w.shape))
    if not is_device_array(w):
        w = cuda.to_device(np.ascontiguousarray(w))
    return w


def _launch(stem, x, target, options, mode, gscale, use_denom, with_grad, out_loss, out_grad):
    """One launch of kernel ``stem`` (device arrays; ``options`` prepared)."""
    kind = kind_of(x)
    xs = _storage(x)
    n, c = xs.shape
    nt = threads_per_block(c)
    k = kernels(nt, kind)
    grad = _storage(out_grad) if with_grad else _stand_in(xs.dtype)
    if stem in ELEMENT_KERNELS:
        blocks = _grid_1d(n * c, nt)
        k[stem][blocks, nt](
            xs,
            target,
            *options,
            gscale,
            use_denom,
            with_grad,
            mode,
            out_loss,
            grad,
            workspace(blocks),
        )
        return
    tpr, rows_per_block = row_config(c, nt, elements_per_thread())
    blocks = (n + rows_per_block - 1) // rows_per_block
    ws = workspace(blocks)
    if use_denom:
        k["index_weight_sum"][1, nt](target, options[0], options[1], ws)
    k[stem][blocks, nt](
        xs, target, *options, gscale, use_denom, with_grad, tpr, mode, out_loss, grad, ws
    )


def _prepare(stem, x, options):
    """The kernel's options on the device (weights cached, copied or as given)."""
    opts = list(options)
    if stem in ("cross_entropy_index", "cross_entropy_prob", "softmax_focal"):
        opts[0] = _class_weight(opts[0], x.shape[1])
    elif stem == "bce_with_logits":
        opts[0] = _element_weight(opts[0], x.shape)
        opts[1] = _element_weight(opts[1], x.shape)
    return [float(o) if isinstance(o, float) else o for o in opts]


def compute(stem, logits, target, options, reduction, with_grad, out_grad=None):
    """Kernel ``stem`` over device arrays in one launch (two for a fused "mean" over class
    indices): returns (loss, grad), loss a device array of the loss dtype (the per-row or
    per-element losses for "none", shape (1,) otherwise), grad the gradient in the logits'
    dtype (``out_grad`` when given, which may be the logits) or None.

    ``options`` are the kernel's options in the registry's order (weights: None, host or
    device arrays). "mean" divides by the sum of the class weights of the rows whose target is
    not ignored (class-index kernels), the row count (other row kernels) or the element count
    (element-wise kernels), as torch. Nothing is synchronised: bad input shows as NaN rows and
    counts for :func:`raise_device_errors`."""
    x = as_device_logits(logits)
    kind = kind_of(x)
    n, c = x.shape
    mode = MODES[reduction]
    elementwise = stem in ELEMENT_KERNELS
    ldt = loss_dtype(kind)
    if mode == 0:
        out_loss = cuda.device_array(x.shape if elementwise else (n,), ldt)
    else:
        out_loss = cuda.device_array((1, 1) if elementwise else (1,), ldt)
    grad = None
    if with_grad:
        grad = out_grad if out_grad is not None else device_array(x.shape, x.dtype)
    use_denom = with_grad and mode == 2 and stem in INDEX_TARGET_KERNELS
    gscale = 1.0
    if mode == 2 and not use_denom:
        gscale = 1.0 / (n * c if elementwise else n) if n * c else math.nan
    if n * c:
        t = target if stem in INDEX_TARGET_KERNELS else as_device_values(target)
        _launch(
            stem,
            x,
            t,
            _prepare(stem, x, options),
            mode,
            gscale,
            use_denom,
            with_grad,
            out_loss,
            grad,
        )
    elif mode:
        out_loss = cuda.to_device(np.full(out_loss.shape, 0.0 if mode == 1 else np.nan, ldt))
    if elementwise and mode:
        out_loss = out_loss.reshape(1)
    return out_loss, grad


# --------------------------------------------------------------------------------------------
# Host wrappers with the signatures of cestudy.kernels.cpu
# --------------------------------------------------------------------------------------------
def _to_device(a):
    """Device arrays as they are, host arrays copied (contiguous) to the device; bfloat16 host
    arrays travel as their bits."""
    if is_device_array(a):
        return as_device_logits(a)
    a = np.ascontiguousarray(a)
    if a.dtype == dtypes.bfloat16:
        return BFloat16Bits(cuda.to_device(a.view(np.uint16)))
    return cuda.to_device(a)


def _raw(stem, logits, target, options, grad_scale, out_loss, out_grad):
    """A per-row (per-element) launch into ``out_loss``, host or device; an element-wise kernel
    given a 1-D ``out_loss`` of length N writes row sums, as on the CPU."""
    x = _to_device(logits)
    n, c = x.shape
    row_sums = stem in ELEMENT_KERNELS and len(out_loss.shape) == 1
    if row_sums:
        d_loss = cuda.device_array((n, c), np.float64)
    elif is_device_array(out_loss):
        d_loss = as_device(out_loss)
    else:
        d_loss = cuda.device_array(out_loss.shape, out_loss.dtype)
    d_grad = None
    if out_grad is not None:
        d_grad = (
            _to_device(out_grad) if is_device_array(out_grad) else device_array(x.shape, x.dtype)
        )
    if n * c:
        t = _to_device(target)
        t = t if stem in INDEX_TARGET_KERNELS else as_device_values(t)
        _launch(
            stem,
            x,
            t,
            _prepare(stem, x, options),
            0,
            float(grad_scale),
            False,
            out_grad is not None,
            d_loss,
            d_grad,
        )
    if row_sums:
        sums = (
            as_device(out_loss) if is_device_array(out_loss) else cuda.device_array(n, np.float64)
        )
        if n:
            nt = threads_per_block()
            tpr, rows_per_block = row_config(c, nt, elements_per_thread())
            kernels(nt)["row_sum"][(n + rows_per_block - 1) // rows_per_block, nt](
                d_loss, tpr, sums
            )
        d_loss = sums
    if not is_device_array(out_loss):
        d_loss.copy_to_host(out_loss)
    if out_grad is not None and not is_device_array(out_grad):
        out_grad[...] = d_grad.copy_to_host().reshape(out_grad.shape)


def _wrappers(stem):
    def fwd(logits, target, *args):
        *options, out_loss = args
        _raw(stem, logits, target, options, 1.0, out_loss, None)

    def fwd_grad(logits, target, *args):
        *options, grad_scale, out_loss, out_grad = args
        _raw(stem, logits, target, options, grad_scale, out_loss, out_grad)

    fwd.__name__ = fwd.__qualname__ = f"{stem}_fwd"
    fwd_grad.__name__ = fwd_grad.__qualname__ = f"{stem}_fwd_grad"
    fwd.__doc__ = f"``{stem}_fwd(logits, target, *options, out_loss)`` (cpu.py's signature)."
    fwd_grad.__doc__ = (
        f"``{stem}_fwd_grad(logits, target, *options, grad_scale, out_loss, "
        "out_grad)`` (cpu.py's signature)."
    )
    return fwd, fwd_grad


for _stem in ROW_KERNELS + ELEMENT_KERNELS:
    globals()[f"{_stem}_fwd"], globals()[f"{_stem}_fwd_grad"] = _wrappers(_stem)
del _stem
