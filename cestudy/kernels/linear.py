"""Fused linear cross-entropy on the CPU: blocks of rows or chunks of the vocabulary, the logits
never materialised.

This module holds raw kernels and the host loop that drives them: no validation, no dtype policy
beyond what each function documents, no reduction over the batch. ``cestudy.linear`` checks the
arguments, lays out K-dimensional and unbatched inputs, and reduces.

The loss of row i is the cross-entropy of the logits z_i = W x_i + b over V classes.

**Blocks of rows** (:func:`run_row_blocks`, where the logits of at least ``MIN_ROW_BLOCK`` rows
over the whole vocabulary fit in ``ROW_BLOCK_BYTES``): each block's logits come from one BLAS
product, ``cpu_fast``'s cross-entropy kernel (the contract of ``cestudy.cross_entropy``) turns
them into the block's losses and, in place, into dL/dz, and the two gradient products follow:
three matrix products in all, as for materialised logits, in O(block x V) memory. Each block
adds its part of the weight gradient, so the (V, H) gradient is read and written once per block
(8 V H bytes in float32, against the 2 N_block V H operations of a product: small from a
block of about a hundred rows).

**Chunks of the vocabulary** (:func:`run`, for everything else). The logits
of a chunk of ``chunk`` classes, for every row, come from one BLAS matrix product (numpy's
``matmul`` into a reused buffer); a Numba kernel folds them into a per-row state and the buffer is
reused for the next chunk, so the extra memory is O(N x chunk), never O(N x V).

The state of a row is the online log-sum-exp of Milakov & Gimelshein (2018) in the form that
keeps cestudy's accuracy contract (``cestudy.kernels.cpu``): the running maximum m, its first
index k, and S = sum_{j != k, j seen} exp(z_j - m) *without* the argmax term, so that the loss
(m - z_y) + log1p(S) of a confident row (S ~ 1e-30) keeps its relative accuracy. Merging a chunk
whose maximum m_c exceeds m moves the old argmax into the sum and rescales:

    S <- (S + 1) exp(m - m_c),   m <- m_c,   k <- the chunk's argmax

(with exp of the exact difference), then the chunk's terms exp(z_j - m), j != k, are added. The
target logit z_y is kept when its chunk passes. Label smoothing carries T = sum_j w_j (m - z_j)
(all terms >= 0), which a rise of the maximum shifts by (sum of the weights seen) (m_c - m); soft
targets carry A = sum_j a_j and sum_j a_j (m - z_j) the same way.

Each chunk's logits are the compute dtype's BLAS product: float32 (sgemm, float32 accumulation)
for float32, float16 and bfloat16 inputs, float64 (dgemm) for float64. Low-precision weights are
converted one chunk at a time into a float32 buffer (bfloat16 and float16 products are exact in
float32, so only the accumulation rounds). The row arithmetic is float64 throughout:

- float32 logits: x_j - m is exact in float64, the exponentials come from ``cpu_fast.exp_neg``
  (relative error < 7e-12) and S is a plain float64 sum (error <= V 2^-53): far below a float32
  ulp, and vectorised.
- float64 logits: differences by two-sum, ``exp`` of the double-double difference, compensated
  (Neumaier) sums, as in ``cestudy.kernels.cpu``. Each rise of a row's maximum across chunks
  multiplies the earlier part of S by one rounded exp(m - m_c); the part it multiplies shrinks
  by that factor, so the errors do not pile up: rows whose maximum rises at every one of 2000
  one-class chunks stay within 1 ulp (``tests/test_linear.py``).

The gradient needs the final (m, S) before any entry, so ``with_grad`` makes a second pass that
recomputes each chunk's logits (the same BLAS call on the same buffers, hence the same bits),
turns them into dL/dz in place (-S / (1 + S) for a true class that is the argmax: the
cancellation-free form), and accumulates ``grad_input += G_c @ W_c`` and
``grad_weight[c] = G_c.T @ input``: four matrix products in all against three for materialised
logits, the price of O(N x chunk) memory.

``filter_tiles`` is the gradient filter of Cut Cross-Entropy (Wijmans et al. 2025): a tile of
the chunk's dL/dz whose every entry is below a threshold in magnitude is set to 0 (there, the
tile's matrix products are skipped; here the products still run, since BLAS sees the whole
chunk, and the filter's effect on accuracy is what is measured).

References:
    M. Milakov, N. Gimelshein, "Online normalizer calculation for softmax", arXiv:1805.02867.
    P. Blanchard, D. J. Higham, N. J. Higham, "Accurately computing the log-sum-exp and softmax
    functions", IMA J. Numer. Anal. 41(4), 2021.
    E. Wijmans, B. Huval, A. Hertzberg, V. Koltun, P. Kraehenbuehl, "Cut your losses in
    large-vocabulary language models", ICLR 2025 (arXiv:2411.09009).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from . import cpu, cpu_fast

_OPTS = dict(cache=True, error_model="numpy", nogil=True)
_SUM = dict(fastmath={"reassoc", "contract"}, **_OPTS)
PARALLEL = False
"""Whether the row kernels run their ``prange`` loops on numba's threads. They do not: each one
runs between two BLAS calls, and numba's OpenMP workers, spinning after their region, then
compete with OpenBLAS's threads for the cores. Measured on this 2-core machine (under a load of
4 to 7 from other work) with the same loop of BLAS products and kernels: at 2048 x 512 x 65536,
serial kernels 10.3 s in all (kernels 0.5-0.7 s) against 12.8-13.1 s (kernels 0.8 s) with
``parallel=True``; at 128 x 256 x 131072, 1.2-2.2 s against 2.5-5.3 s."""

two_diff = cpu.two_diff
exp_diff = cpu.exp_diff
neumaier_add = cpu.neumaier_add
row_guard = cpu.row_guard
argmax_grad = cpu.argmax_grad
exp_neg = cpu_fast.exp_neg

# Columns of the per-row state (float64, shape (N, N_STATE)); the argmax index is a separate
# int64 array.
M = 0  # running maximum (-inf before the first finite logit)
S = 1  # sum_{j != k} exp(z_j - m), and its Neumaier compensation
SC = 2
ZY = 3  # the target logit (class-index targets)
T = 4  # smoothing: sum_j w_j (m - z_j) (index) or sum_j a_j (m - z_j) (soft targets) ...
TC = 5  # ... and its compensation
A = 6  # soft targets: sum_j a_j, and its compensation
AC = 7
BAD = 8  # 1.0 once a NaN logit was seen
N_STATE = 9


def new_state(n: int) -> tuple[np.ndarray, np.ndarray]:
    """A fresh state for ``n`` rows: (state (n, N_STATE) float64, argmax (n,) int64)."""
    state = np.zeros((n, N_STATE))
    state[:, M] = -np.inf
    return state, np.zeros(n, dtype=np.int64)


def _literal_choice(generic, vectorised_row):
    """A jitted ``row(vectorised, *args)`` that calls ``vectorised_row(*args)`` when the literal
    ``vectorised`` is True, else ``generic(*args)``: chosen when numba compiles the caller, so
    that each kernel's row loop is compiled for its own row function only."""

    def row(vectorised, *args):
        pass

    @overload(row, jit_options=_OPTS, prefer_literal=True)
    def _ov_row(vectorised, *args):
        if not isinstance(vectorised, types.BooleanLiteral):
            return None
        chosen = vectorised_row if vectorised.literal_value else generic
        return lambda vectorised, *args: chosen(*args)

    return row


# --------------------------------------------------------------------------------------------
# Folding a chunk into the state
# --------------------------------------------------------------------------------------------
@njit(**_OPTS)
def _raise_max_f64(x, c0, st, kidx, i, smooth_seen):
    """Fold the chunk's maximum into (m, k, S) of one row (float64 arithmetic, exact
    differences); with ``smooth_seen`` != 0, also shift T by smooth_seen * (m_c - m). Returns
    the row's maximum after the chunk."""
    mc, kc, has_nan = cpu.row_max(x)
    if has_nan:
        st[BAD] = 1.0
    m = st[M]
    if mc > m:
        if m > -np.inf:
            f = exp_diff(m, mc)
            s, c = neumaier_add(st[S] * f, st[SC] * f, f)  # the old argmax joins the sum
            st[S] = s
            st[SC] = c
            if smooth_seen != 0.0:
                hi, lo = two_diff(mc, m)
                t, tc = neumaier_add(st[T], st[TC], smooth_seen * hi)
                st[T] = t
                st[TC] = tc + smooth_seen * lo
        st[M] = mc
        kidx[i] = c0 + kc
        m = mc
    return m


@njit(**_OPTS)
def _add_terms_f64(x, c0, m, k, st):
    """S += sum_{j in chunk, j != k} exp(z_j - m), compensated."""
    s = st[S]
    c = st[SC]
    kl = k - c0
    for j in range(x.shape[0]):
        if j != kl:
            s, c = neumaier_add(s, c, exp_diff(np.float64(x[j]), m))
    st[S] = s
    st[SC] = c


@njit(**_OPTS)
def _add_shift_f64(x, a, m, st):
    """T += sum_j a_j (m - z_j), each difference exact, compensated."""
    t = st[T]
    tc = st[TC]
    for j in range(x.shape[0]):
        hi, lo = two_diff(m, np.float64(x[j]))
        t, tc = neumaier_add(t, tc, a[j] * hi)
        tc += a[j] * lo
    st[T] = t
    st[TC] = tc


@njit(**_OPTS)
def _index_fold_row(x, c0, y, w, smooth, weight_seen, st, kidx, i):
    """One row of :func:`index_chunk`."""
    m = _raise_max_f64(x, c0, st, kidx, i, weight_seen if smooth else 0.0)
    if c0 <= y < c0 + x.shape[0]:
        st[ZY] = np.float64(x[y - c0])
    if not math.isfinite(m) or st[BAD] != 0.0:
        return  # NaN, +inf or all -inf so far: the row's result is decided at the end
    _add_terms_f64(x, c0, m, kidx[i], st)
    if smooth:
        _add_shift_f64(x, w, m, st)


@njit(**_SUM)
def _sumexp_f32(x, m):
    """(sum of exp(z_j - m) over z_j < m, number of z_j == m) of a float32 row; vectorised."""
    s = 0.0
    ties = 0
    for j in range(x.shape[0]):
        d = np.float64(x[j]) - m
        e = exp_neg(d)
        s += e if d < 0.0 else 0.0
        ties += d == 0.0
    return s, ties


@njit(**_SUM)
def _shift_sum_f32(x, w, m):
    """sum_j w_j (m - z_j) of a float32 row in float64 (terms >= 0, exact differences)."""
    s = 0.0
    for j in range(x.shape[0]):
        s += w[j] * (m - np.float64(x[j]))
    return s


@njit(**_OPTS)
def _index_fold_row_f32(x, c0, y, w, smooth, weight_seen, st, kidx, i):
    """One row of :func:`index_chunk_f32`."""
    mc, has_nan = cpu_fast.row_max_f32(x)
    if has_nan:
        st[BAD] = 1.0
    m = st[M]
    here = False
    if mc > m:
        if m > -np.inf:
            f = exp_neg(m - mc)  # both float32: the difference is exact
            st[S] = (st[S] + 1.0) * f
            if smooth:
                st[T] += weight_seen * (mc - m)
        st[M] = mc
        kidx[i] = c0 + cpu_fast.first_index_of(x, np.float32(mc))
        m = mc
        here = True
    if c0 <= y < c0 + x.shape[0]:
        st[ZY] = np.float64(x[y - c0])
    if not math.isfinite(m) or st[BAD] != 0.0:
        return
    s, ties = _sumexp_f32(x, m)
    st[S] += s + (ties - 1 if here else ties)
    if smooth:
        st[T] += _shift_sum_f32(x, w, m)


_fold_row = _literal_choice(_index_fold_row, _index_fold_row_f32)


@njit(parallel=PARALLEL, **_OPTS)
def _index_fold_rows(
    z, c0, target, weight, ignore_index, smooth, weight_seen, state, kidx, vectorised
):
    """The row loop of :func:`index_chunk` (``vectorised`` False) and :func:`index_chunk_f32`
    (True, a literal: numba compiles the loop for one of the two): ignored rows are not read."""
    w = weight[c0 : c0 + z.shape[1]]
    for i in prange(z.shape[0]):
        y = target[i]
        if y == ignore_index:
            continue
        _fold_row(vectorised, z[i], c0, y, w, smooth, weight_seen, state[i], kidx, i)


@njit(parallel=PARALLEL, **_OPTS)
def index_chunk(z, c0, target, weight, ignore_index, smooth, weight_seen, state, kidx):
    """Fold the logits ``z`` (N, vc) of classes c0 .. c0 + vc - 1 into ``state`` (class-index
    targets; any float dtype, float64 arithmetic with exact differences and compensated sums).

    ``weight`` (V,) float64 class weights; ``smooth``: whether label smoothing is on (then T is
    kept); ``weight_seen``: sum of the weights of the classes before c0. Rows whose target is
    ``ignore_index`` are not read."""
    _index_fold_rows(z, c0, target, weight, ignore_index, smooth, weight_seen, state, kidx, False)


@njit(parallel=PARALLEL, **_OPTS)
def index_chunk_f32(z, c0, target, weight, ignore_index, smooth, weight_seen, state, kidx):
    """:func:`index_chunk` for float32 logits, vectorised: the maximum over integer keys, the
    exponentials by ``exp_neg`` and plain float64 sums (see the module docstring)."""
    _index_fold_rows(z, c0, target, weight, ignore_index, smooth, weight_seen, state, kidx, True)


@njit(parallel=PARALLEL, **_OPTS)
def probs_chunk(z, t, c0, weight, eps, nc, state, kidx):
    """Fold the logits ``z`` (N, vc) into ``state`` for soft targets ``t`` (N, vc) (the target
    columns c0 .. c0 + vc - 1): besides (m, k, S), A = sum_j a_j and sum_j a_j (m - z_j) with
    a_j = w_j ((1 - eps) t_j + eps / nc); terms with a_j == 0 contribute 0. Any float dtype."""
    vc = z.shape[1]
    for i in prange(z.shape[0]):
        x = z[i]
        st = state[i]
        m = _raise_max_f64(x, c0, st, kidx, i, st[A] + st[AC])
        if not math.isfinite(m) or st[BAD] != 0.0:
            continue
        _add_terms_f64(x, c0, m, kidx[i], st)
        st[A], st[AC], st[T], st[TC] = cpu.add_soft_target_sums(
            x, t[i], weight[c0 : c0 + vc], eps, nc, m, (st[A], st[AC], st[T], st[TC])
        )


# --------------------------------------------------------------------------------------------
# Per-row losses from the final state
# --------------------------------------------------------------------------------------------
@njit(parallel=PARALLEL, **_OPTS)
def index_loss(state, target, weight, ignore_index, eps, wsum, out_loss):
    """Per-row loss (1 - eps) w_y ((m - z_y) + L) + (eps / V) (T + W L), L = log1p(S):
    0 for ignored rows, NaN for rows with a NaN logit or a non-finite maximum."""
    nc = weight.shape[0]
    for i in prange(state.shape[0]):
        st = state[i]
        y = target[i]
        skip, fill = row_guard(y == ignore_index, st[BAD] != 0.0, st[M])
        if skip:
            out_loss[i] = fill
            continue
        L = math.log1p(st[S] + st[SC])
        hi, lo = two_diff(st[M], st[ZY])
        loss = weight[y] * (hi + (L + lo))
        if eps != 0.0:
            loss = (1.0 - eps) * loss + (eps / nc) * ((st[T] + st[TC]) + wsum * L)
        out_loss[i] = loss


@njit(parallel=PARALLEL, **_OPTS)
def probs_loss(state, out_loss):
    """Per-row H(a, softmax(z)) = sum_j a_j (m - z_j) + A L (NaN rows as for index targets)."""
    for i in prange(state.shape[0]):
        st = state[i]
        skip, fill = row_guard(False, st[BAD] != 0.0, st[M])
        if skip:
            out_loss[i] = fill
            continue
        out_loss[i] = (st[T] + st[TC]) + (st[A] + st[AC]) * math.log1p(st[S] + st[SC])


# --------------------------------------------------------------------------------------------
# Gradient of a chunk, written over its logits
# --------------------------------------------------------------------------------------------
@njit(**_OPTS)
def _index_grad_start(g, st, y, ignore_index, weight, eps, grad_scale):
    """The start of a class-index gradient row ``g`` from its state ``st``: ``(skip, m, S,
    1 + S, c_true, c_smooth)``, c_true = (1 - eps) w_y grad_scale and c_smooth =
    (eps / V) grad_scale; when ``skip`` the row is filled (0 ignored, NaN invalid)."""
    skip, fill = row_guard(y == ignore_index, st[BAD] != 0.0, st[M])
    if skip:
        g[:] = fill
        return True, 0.0, 0.0, 0.0, 0.0, 0.0
    s = st[S] + st[SC]
    c_true = (1.0 - eps) * weight[y] * grad_scale
    c_smooth = (eps / weight.shape[0]) * grad_scale
    return False, st[M], s, 1.0 + s, c_true, c_smooth


@njit(**_OPTS)
def _index_grad_row(g, c0, y, k, weight, wsum, eps, m, s, zz, c_true, c_smooth):
    """One row of :func:`index_grad_chunk`, entry by entry."""
    for j in range(g.shape[0]):
        jg = c0 + j
        p = (1.0 if jg == k else exp_diff(np.float64(g[j]), m)) / zz
        g[j] = cpu.index_grad_entry(p, jg, y, k, weight[jg], wsum, s, zz, eps, c_true, c_smooth)


@njit(**_SUM)
def _scale_row_f32(g, m, a, b, w):
    """g_j = float32(a exp(g_j - m) - b w_j) over a float32 row (vectorised)."""
    for j in range(g.shape[0]):
        g[j] = np.float32(a * exp_neg(np.float64(g[j]) - m) - b * w[j])


@njit(**_OPTS)
def _index_grad_row_f32(g, c0, y, k, weight, wsum, eps, m, s, zz, c_true, c_smooth):
    """One row of :func:`index_grad_chunk_f32`."""
    vc = g.shape[0]
    y_here = c0 <= y < c0 + vc
    k_here = c0 <= k < c0 + vc
    z_y = np.float64(g[y - c0]) if y_here else 0.0
    _scale_row_f32(g, m, (c_true + c_smooth * wsum) / zz, c_smooth, weight[c0 : c0 + vc])
    if y_here:
        p_y = (1.0 if y == k else exp_neg(z_y - m)) / zz
        g_y = c_true * (-s / zz if y == k else p_y - 1.0)
        if eps != 0.0:
            g_y += c_smooth * (
                argmax_grad(wsum, weight[y], s, zz) if y == k else wsum * p_y - weight[y]
            )
        g[y - c0] = np.float32(g_y)
    if k_here and eps != 0.0 and y != k:
        g[k - c0] = np.float32(c_true / zz + c_smooth * argmax_grad(wsum, weight[k], s, zz))


_grad_row = _literal_choice(_index_grad_row, _index_grad_row_f32)


@njit(parallel=PARALLEL, **_OPTS)
def _index_grad_rows(
    z, c0, target, weight, ignore_index, eps, wsum, grad_scale, state, kidx, vectorised
):
    """The row loop of :func:`index_grad_chunk` (``vectorised`` False) and
    :func:`index_grad_chunk_f32` (True, a literal: numba compiles the loop for one of the
    two): ignored and NaN rows are filled, every other row goes to its row function."""
    for i in prange(z.shape[0]):
        g = z[i]
        y = target[i]
        skip, m, s, zz, c_true, c_smooth = _index_grad_start(
            g, state[i], y, ignore_index, weight, eps, grad_scale
        )
        if skip:
            continue
        _grad_row(vectorised, g, c0, y, kidx[i], weight, wsum, eps, m, s, zz, c_true, c_smooth)


@njit(parallel=PARALLEL, **_OPTS)
def index_grad_chunk(z, c0, target, weight, ignore_index, eps, wsum, grad_scale, state, kidx):
    """Overwrite the logits ``z`` (N, vc) of classes c0 .. with dL/dz times ``grad_scale``:

        (1 - eps) w_y (p_j - [j == y]) + (eps / V) (W p_j - w_j),   p_j = exp(z_j - m) / (1 + S)

    with p_y - 1 = -S / (1 + S) when y is the argmax and the smoothing term at the argmax by
    ``argmax_grad`` (no cancellation): :func:`cestudy.kernels.cpu.index_grad_entry`. Ignored
    rows get 0, NaN rows NaN. Any float dtype."""
    _index_grad_rows(z, c0, target, weight, ignore_index, eps, wsum, grad_scale, state, kidx, False)


@njit(parallel=PARALLEL, **_OPTS)
def index_grad_chunk_f32(z, c0, target, weight, ignore_index, eps, wsum, grad_scale, state, kidx):
    """:func:`index_grad_chunk` for float32 logits: one vectorised pass
    g_j = a exp(z_j - m) - b w_j, then the true-class entry and, with smoothing, the argmax entry
    rewritten by their cancellation-free formulas (as ``cpu_fast`` does)."""
    _index_grad_rows(z, c0, target, weight, ignore_index, eps, wsum, grad_scale, state, kidx, True)


@njit(parallel=PARALLEL, **_OPTS)
def probs_grad_chunk(z, t, c0, weight, eps, nc, grad_scale, state, kidx):
    """Overwrite ``z`` (N, vc) with (A p_j - a_j) * grad_scale (the argmax entry by
    ``argmax_grad``); NaN rows NaN. Any float dtype."""
    vc = z.shape[1]
    for i in prange(z.shape[0]):
        g = z[i]
        st = state[i]
        skip, fill = row_guard(False, st[BAD] != 0.0, st[M])
        if skip:
            g[:] = fill
            continue
        m = st[M]
        s = st[S] + st[SC]
        zz = 1.0 + s
        k = kidx[i]
        a_sum = st[A] + st[AC]
        for j in range(vc):
            jg = c0 + j
            a = cpu.soft_target(weight[jg], np.float64(t[i, j]), eps, nc)
            if jg == k:
                gj = argmax_grad(a_sum, a, s, zz)
            else:
                gj = a_sum * (exp_diff(np.float64(g[j]), m) / zz) - a
            g[j] = gj * grad_scale


# --------------------------------------------------------------------------------------------
# Cut Cross-Entropy's gradient filter
# --------------------------------------------------------------------------------------------
@njit(parallel=PARALLEL, **_OPTS)
def filter_tiles(g, threshold, tile_rows, tile_cols, out_stats):
    """Set to 0 every (tile_rows x tile_cols) tile of ``g`` whose entries are all below
    ``threshold`` in magnitude (Cut Cross-Entropy's test on |softmax - onehot|).

    ``out_stats`` (ceil(N / tile_rows), 4) float64 is incremented per row block with: the sum of
    |g| dropped, the sum of |g| seen, the tiles dropped, the tiles seen."""
    n, vc = g.shape
    n_blocks = (n + tile_rows - 1) // tile_rows
    for b in prange(n_blocks):
        r0 = b * tile_rows
        r1 = min(n, r0 + tile_rows)
        for c0 in range(0, vc, tile_cols):
            c1 = min(vc, c0 + tile_cols)
            big = False
            mass = 0.0
            for i in range(r0, r1):
                for j in range(c0, c1):
                    a = abs(np.float64(g[i, j]))
                    mass += a
                    if not a < threshold:  # NaN counts as large: never dropped
                        big = True
            out_stats[b, 1] += mass
            out_stats[b, 3] += 1.0
            if not big:
                for i in range(r0, r1):
                    for j in range(c0, c1):
                        g[i, j] = 0.0
                out_stats[b, 0] += mass
                out_stats[b, 2] += 1.0


# --------------------------------------------------------------------------------------------
# The host loop
# --------------------------------------------------------------------------------------------
FILTER_TILE = (128, 128)
"""Tile of the gradient filter: tokens x classes (Cut Cross-Entropy autotunes its GPU blocks;
128 x 128 is a typical size)."""


def chunk_logits(x, w, b, c0, c1, out, wbuf=None):
    """The logits of classes c0 .. c1 - 1 for every row, written into ``out`` (N, c1 - c0): one
    BLAS product ``x @ w[c0:c1].T`` in ``x``'s dtype (+ ``b[c0:c1]``). A chunk of ``w`` of
    another dtype, or not C-contiguous, is first converted into ``wbuf`` (a flat buffer of at
    least (c1 - c0) * H elements of ``x``'s dtype). Returns the weight chunk used."""
    wc = w[c0:c1]
    if wc.dtype != x.dtype or not wc.flags.c_contiguous:
        dst = wbuf[: wc.size].reshape(wc.shape)
        np.copyto(dst, wc, casting="unsafe")
        wc = dst
    np.matmul(x, wc.T, out=out)
    if b is not None:
        out += b[c0:c1]
    return wc


def default_chunk(n_rows: int, n_classes: int, itemsize: int) -> int:
    """Classes per chunk: the logits buffer (n_rows x chunk) at about 32 MiB, a multiple of 256
    between 256 and 8192 (BLAS keeps its speed there), and never more than ``n_classes``."""
    target = (32 << 20) // max(1, n_rows * itemsize)
    chunk = max(256, min(8192, (target // 256) * 256))
    return max(1, min(chunk, n_classes))


ROW_BLOCK_BYTES = 32 << 20
"""The logits of a block of rows over the whole vocabulary (:func:`row_block`) take at most
this many bytes: the same budget as a vocabulary chunk (:func:`default_chunk`)."""
MIN_ROW_BLOCK = 128
"""Fewest rows in a row block: each block reads and writes the whole (V, H) weight gradient once
more (8 V H bytes in float32), which pays for itself against the fourth matrix product it saves
(2 N_block V H operations) once N_block is a few tens; 128 is also the gradient filter's tile."""


ACCUMULATE_BYTES = 4 << 20
"""The product buffer through which a row block adds its part of grad_weight (measured at
H = 512: 1024 to 4096 classes a step equally fast, 8192 10% slower)."""


def row_block(n_rows: int, n_classes: int, itemsize: int) -> int:
    """Rows per block when blocks of rows over the whole vocabulary fit in
    :data:`ROW_BLOCK_BYTES` with at least :data:`MIN_ROW_BLOCK` rows (or all the rows), a
    multiple of :data:`MIN_ROW_BLOCK` below ``n_rows``; else 0 (chunk the vocabulary)."""
    rows = ROW_BLOCK_BYTES // max(1, n_classes * itemsize)
    if rows >= n_rows:
        return n_rows
    rows -= rows % MIN_ROW_BLOCK
    return rows if rows >= MIN_ROW_BLOCK else 0


def block_logits(x, w, b, r0, r1, out):
    """The logits of rows r0 .. r1 - 1 over the whole vocabulary, written into ``out``
    (r1 - r0, V): one BLAS product ``x[r0:r1] @ w.T`` (+ ``b``), all of ``x``'s dtype."""
    np.matmul(x[r0:r1], w.T, out=out)
    if b is not None:
        out += b


def run_row_blocks(
    x,
    w,
    b,
    target,
    weight,
    ignore_index,
    label_smoothing,
    grad_scale,
    out_loss,
    *,
    rows,
    with_grad,
    grad_x=None,
    grad_w=None,
    grad_b=None,
    filter_threshold=0.0,
    filter_tile=FILTER_TILE,
    filter_stats=None,
):
    """The fused loop over blocks of ``rows`` rows, each with the whole vocabulary: class-index
    targets, ``w`` and the gradients in ``x``'s dtype, C-contiguous (arguments as :func:`run`).

    A block's logits Z_b = X_b W^T (+ b) are formed once, into an (rows, V) buffer; the
    vectorised cross-entropy kernel (``cpu_fast.cross_entropy_index_fwd_grad``, the contract of
    :func:`cestudy.cross_entropy`) turns them into the block's losses and, in place, into
    G_b = dL/dZ_b; then grad_input[b] = G_b W and grad_weight += G_b^T X_b. Three matrix
    products, as for materialised logits, against :func:`run`'s four (it must recompute each
    vocabulary chunk's logits once the rows' sums are known), for (rows x V) memory instead of
    (N x V)."""
    n, h = x.shape
    v = w.shape[0]
    zbuf = np.empty(min(rows, n) * v, dtype=x.dtype)
    # grad_weight += G_b^T X_b a slice of classes at a time through a small product buffer:
    # numpy's matmul has no beta = 1, and scipy's BLAS (a second OpenBLAS with threads of its
    # own) doubled the time of numpy's products around it when tried here
    step = max(256, ACCUMULATE_BYTES // (h * x.dtype.itemsize))
    prod = np.empty(min(step, v) * h, dtype=x.dtype) if with_grad and grad_w is not None else None
    if with_grad:
        kern = cpu_fast.cross_entropy_index_fwd_grad_serial
    else:
        kern = cpu_fast.cross_entropy_index_fwd_serial
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        xb = x[r0:r1]
        z = zbuf[: (r1 - r0) * v].reshape(r1 - r0, v)
        block_logits(x, w, b, r0, r1, z)
        if not with_grad:
            kern(z, target[r0:r1], weight, ignore_index, label_smoothing, out_loss[r0:r1])
            continue
        kern(
            z,
            target[r0:r1],
            weight,
            ignore_index,
            label_smoothing,
            grad_scale,
            out_loss[r0:r1],
            z,
        )
        if filter_threshold > 0.0:
            stats = filter_stats[r0 // filter_tile[0] :]
            filter_tiles(z, filter_threshold, filter_tile[0], filter_tile[1], stats)
        if grad_b is not None:
            part = np.sum(z, axis=0, dtype=np.float64)
            if r0 == 0:
                grad_b[:] = part
            else:
                grad_b += part
        np.matmul(z, w, out=grad_x[r0:r1])
        if grad_w is None:
            continue
        if r0 == 0:
            np.matmul(z.T, xb, out=grad_w)
            continue
        for c0 in range(0, v, step):
            c1 = min(v, c0 + step)
            part = prod[: (c1 - c0) * h].reshape(c1 - c0, h)
            np.matmul(z[:, c0:c1].T, xb, out=part)
            grad_w[c0:c1] += part


def run(
    x,
    w,
    b,
    target,
    weight,
    ignore_index,
    label_smoothing,
    grad_scale,
    out_loss,
    *,
    chunk,
    with_grad,
    probs=False,
    grad_x=None,
    grad_w=None,
    grad_b=None,
    filter_threshold=0.0,
    filter_tile=FILTER_TILE,
    filter_stats=None,
):
    """The fused loop: per-row losses into ``out_loss`` and, with ``with_grad``, the gradients.

    Args (no checks):
        x: (N, H) C-contiguous float32 or float64: the compute dtype.
        w: (V, H) weights of any float dtype (chunks are converted to ``x``'s dtype).
        b: (V,) bias in ``x``'s dtype, or None.
        target: (N,) int64 class indices, or (N, V) soft targets with ``probs=True``.
        weight: (V,) float64 class weights (ones when unweighted).
        grad_scale: the factor of every gradient (1 / denominator for "mean").
        out_loss: (N,) float64, written.
        grad_x: (N, H) array of any float dtype to write d(loss)/d(x) into (with_grad).
        grad_w: (V, H) array of any float dtype for d(loss)/d(w), or None to skip it.
        grad_b: (V,) float64 array for d(loss)/d(b), or None.
        filter_threshold: > 0 applies :func:`filter_tiles` to every gradient chunk with this
            threshold (already multiplied by ``grad_scale``); ``filter_stats`` (rows, 4) float64
            accumulates its statistics.

    The buffers are allocated here, once: the logits (N x chunk), the state (N x 9 float64), a
    converted weight chunk (chunk, H) when ``w``'s dtype is not ``x``'s (it also takes the
    weight gradient's chunk before its conversion), an (N, H) product and, for a ``grad_x`` of
    another dtype, an (N, H) accumulator.
    """
    n, h = x.shape
    v = w.shape[0]
    cdt = x.dtype
    f32 = cdt == np.float32
    zbuf = np.empty(n * min(chunk, v), dtype=cdt)
    needs_wbuf = w.dtype != cdt or not w.flags.c_contiguous
    wbuf = np.empty(min(chunk, v) * h, dtype=cdt) if needs_wbuf else None
    state, kidx = new_state(n)
    eps = float(label_smoothing)
    smooth = eps != 0.0
    wsum = cpu.compensated_sum(weight)
    bounds = [(c0, min(v, c0 + chunk)) for c0 in range(0, v, chunk)]

    seen = 0.0  # sum of the class weights before c0 (smoothing only)
    for c0, c1 in bounds:
        z = zbuf[: n * (c1 - c0)].reshape(n, c1 - c0)
        chunk_logits(x, w, b, c0, c1, z, wbuf)
        if probs:
            probs_chunk(z, target[:, c0:c1], c0, weight, eps, float(v), state, kidx)
        else:
            fold = index_chunk_f32 if f32 else index_chunk
            fold(z, c0, target, weight, ignore_index, smooth, seen, state, kidx)
            if smooth:
                seen = cpu.compensated_sum(weight[:c1])
    if probs:
        probs_loss(state, out_loss)
    else:
        index_loss(state, target, weight, ignore_index, eps, wsum, out_loss)
    if not with_grad:
        return

    acc = grad_x if grad_x.dtype == cdt else np.empty((n, h), dtype=cdt)
    prod = np.empty((n, h), dtype=cdt) if len(bounds) > 1 else None
    gw_buf = None
    if grad_w is not None and grad_w.dtype != cdt:
        # the converted weight chunk is no longer needed once G_c @ W_c is formed: reuse it
        gw_buf = wbuf if wbuf is not None else np.empty(min(chunk, v) * h, dtype=cdt)
    for idx, (c0, c1) in enumerate(bounds):
        z = zbuf[: n * (c1 - c0)].reshape(n, c1 - c0)
        wc = chunk_logits(x, w, b, c0, c1, z, wbuf)
        if probs:
            probs_grad_chunk(
                z, target[:, c0:c1], c0, weight, eps, float(v), grad_scale, state, kidx
            )
        elif f32:
            index_grad_chunk_f32(
                z, c0, target, weight, ignore_index, eps, wsum, grad_scale, state, kidx
            )
        else:
            index_grad_chunk(
                z, c0, target, weight, ignore_index, eps, wsum, grad_scale, state, kidx
            )
        if filter_threshold > 0.0:
            filter_tiles(z, filter_threshold, filter_tile[0], filter_tile[1], filter_stats)
        if grad_b is not None:
            np.sum(z, axis=0, dtype=np.float64, out=grad_b[c0:c1])
        if idx == 0:
            np.matmul(z, wc, out=acc)
        else:
            np.matmul(z, wc, out=prod)
            acc += prod
        if grad_w is not None:
            if gw_buf is None:
                np.matmul(z.T, x, out=grad_w[c0:c1])
            else:
                gwc = gw_buf[: (c1 - c0) * h].reshape(c1 - c0, h)
                np.matmul(z.T, x, out=gwc)
                np.copyto(grad_w[c0:c1], gwc, casting="unsafe")
    if acc is not grad_x:
        np.copyto(grad_x, acc, casting="unsafe")
