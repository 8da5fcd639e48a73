"""Fused linear cross-entropy: the loss of ``input @ linear_weight.T + linear_bias`` without
materialising the logits, with ``torch.nn.functional.linear_cross_entropy`` semantics.

This module is the public layer (beside ``cestudy.losses``): it checks the arguments, lays out
unbatched and K-dimensional inputs, picks the chunk size and reduces. The algorithm (chunks of
the vocabulary, each from a BLAS product; an online log-sum-exp with the accuracy contract of
:func:`cestudy.cross_entropy`; gradients accumulated chunk by chunk) lives in
``cestudy.kernels.linear``, which documents its numerics.

Precision: float64 inputs are computed in float64 (dgemm). float32, float16 and bfloat16 inputs
are computed with float32 matrix products (float32 accumulation; the products of two float16 or
bfloat16 numbers are exact in float32) and float64 arithmetic on each logit, and the results are
rounded once to the input dtype. The logits are never rounded to float16 or bfloat16.
Low-precision weights are converted to float32 one chunk at a time, so no float32 copy of the
whole (V, H) weight is made.

Memory: besides the inputs and the returned gradients, in blocks of rows one (rows, V) logits
block of at most 32 MiB, a 4 MiB product buffer for the weight gradient, the (V,) float64 class
weights; in vocabulary chunks one (N, chunk) logits buffer of the compute dtype, an (N, 9)
float64 state, the class weights, two (N, H) buffers and, for float16/bfloat16 inputs, a float32
copy of the input, an (N, H) float32 accumulator and one (chunk, H) float32 buffer: O(N x chunk),
where materialised logits take N x V. Measured with tracemalloc at N, H, V = 2048, 512, 65536
(the ``linear`` study's target cell): 36.5 MiB in float32 (blocks of 128 rows; 7.1% of the 512
MiB of float32 logits); 52.7 MiB in bfloat16 (vocabulary chunks of 4096, an earlier run).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Optional, Union

import numpy as np

from . import dispatch, dtypes
from .dispatch import Reduction
from .kernels import linear as kernel

ArrayLike = Union[np.ndarray, "np.typing.ArrayLike"]
Loss = Union[np.ndarray, np.floating]

__all__ = ["linear_cross_entropy", "linear_cross_entropy_with_grad"]


# --------------------------------------------------------------------------------------------
# Argument checks and layout
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Problem:
    """The checked arguments laid out for the kernel: D independent (N, H) x (C, H) problems
    (D = d1 ... dK for a K-dimensional weight, else 1) sharing one input."""

    x: np.ndarray  # (N, H) compute dtype, C-contiguous
    w3: np.ndarray  # (C, D, H) the weight (a view)
    b2: np.ndarray | None  # (C, D) bias in the compute dtype, or None
    target: np.ndarray  # (N, D) int64, or (N, C, D) soft targets (float32/float64)
    probs: bool
    weight: np.ndarray  # (C,) float64
    ignore_index: int
    label_smoothing: float
    chunk: int
    rows: int  # rows per block over the whole vocabulary (kernel.run_row_blocks), 0: chunk it
    reduction: str
    denom: float  # the "mean" denominator
    in_dtype: np.dtype
    loss_shape: tuple  # the shape of reduction="none"
    input_shape: tuple
    weight_shape: tuple
    bias_shape: tuple | None

    @property
    def d(self) -> int:
        return self.w3.shape[1]

    def weight_d(self, d: int) -> np.ndarray:
        return self.w3[:, d, :]

    def bias_d(self, d: int):
        return None if self.b2 is None else np.ascontiguousarray(self.b2[:, d])

    def target_d(self, d: int) -> np.ndarray:
        return self.target[:, :, d] if self.probs else np.ascontiguousarray(self.target[:, d])


def _check_chunk(chunk_size: Any) -> int | None:
    if chunk_size is None:
        return None
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, (int, np.integer))
        or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive integer or None; got {chunk_size!r}")
    return int(chunk_size)


def _prepare(
    input,
    linear_weight,
    target,
    linear_bias,
    weight,
    reduction,
    ignore_index,
    label_smoothing,
    chunk_size,
) -> _Problem:
    dispatch.check_choice("reduction", reduction, dispatch.REDUCTIONS)
    eps = dispatch.check_smoothing(label_smoothing)
    chunk = _check_chunk(chunk_size)
    if ignore_index is None:
        ignore_index = -100
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index must be an int; got {ignore_index!r}")
    ignore_index = int(ignore_index)

    x = dispatch.as_float_array("input", input)
    if x.ndim not in (1, 2):
        raise ValueError(f"input must have shape (N, H) or (H,); got shape {x.shape}")
    w = dispatch.as_float_array("linear_weight", linear_weight)
    if w.ndim < 2:
        raise ValueError(
            f"linear_weight must have shape (C, H) or (C, d1, ..., dK, H); got shape {w.shape}"
        )
    h = x.shape[-1]
    if w.shape[-1] != h:
        raise ValueError(
            f"linear_weight must end in the input's last dimension "
            f"(in_features = {h}); got shape {w.shape}"
        )
    if w.dtype != x.dtype:
        raise TypeError(f"linear_weight must have the input's dtype {x.dtype}; got {w.dtype}")
    c = w.shape[0]
    if c == 0:
        raise ValueError(
            f"linear_weight must have at least one class (first axis of length "
            f">= 1); got shape {w.shape}"
        )
    out_features = w.shape[1:-1]
    if out_features and x.ndim == 1:
        raise ValueError(
            f"a K-dimensional linear_weight {w.shape} needs a batched input "
            f"(N, {h}); got input of shape {x.shape}"
        )
    b = None
    if linear_bias is not None:
        b = dispatch.as_float_array("linear_bias", linear_bias)
        if b.shape != w.shape[:-1]:
            raise ValueError(
                f"linear_bias must have shape {w.shape[:-1]} (linear_weight's "
                f"without in_features); got shape {b.shape}"
            )
        if b.dtype != x.dtype:
            raise TypeError(f"linear_bias must have the input's dtype {x.dtype}; got {b.dtype}")

    batch = x.shape[:-1]
    n = batch[0] if batch else 1
    d = int(np.prod(out_features, dtype=np.int64)) if out_features else 1
    logits_shape = (*batch, c, *out_features)
    index_shape = (*batch, *out_features)
    t = np.asarray(target)
    if t.dtype.kind in "iu":
        if t.shape != index_shape:
            raise ValueError(
                f"target of class indices must have shape {index_shape} (the "
                f"logits' shape {logits_shape} without the class axis); got shape "
                f"{t.shape}"
            )
        t2 = np.ascontiguousarray(t.reshape(n, d), dtype=np.int64)
        bad = (t2 != ignore_index) & ((t2 < 0) | (t2 >= c))
        if np.any(bad):
            i = int(np.flatnonzero(bad.reshape(-1))[0])
            raise ValueError(
                f"target[{i}] = {int(t2.reshape(-1)[i])} is out of range for {c} "
                f"classes (expected 0 <= target < {c} or "
                f"ignore_index={ignore_index})"
            )
        probs = False
    elif dtypes.is_float_dtype(t.dtype):
        if t.shape != logits_shape:
            raise ValueError(
                f"target of probabilities must have the logits' shape "
                f"{logits_shape}; got shape {t.shape}"
            )
        work = t.dtype if t.dtype in (np.float32, np.float64) else np.float32
        t2 = np.asarray(t.reshape(n, c, d), dtype=work)
        if np.any(t2 < 0):
            raise ValueError("target probabilities must be non-negative; got a negative entry")
        probs = True
    else:
        raise TypeError(
            f"target must be integer class indices or floating probabilities; got dtype {t.dtype}"
        )
    wvec = dispatch.class_weight(weight, c)

    cdt = dtypes.working_dtype(x.dtype)
    if probs:
        denom = float(n * d)
    else:
        keep = t2 != ignore_index
        denom = float(wvec[t2[keep]].sum()) if np.any(keep) else 0.0
    rows = 0
    if chunk is None:
        chunk = kernel.default_chunk(n, c, cdt.itemsize)
        # whole-vocabulary row blocks need the weight and its gradient in the compute dtype
        # (a float16 or bfloat16 weight is converted one vocabulary chunk at a time)
        if not probs and x.dtype == cdt and w.dtype == cdt:
            rows = kernel.row_block(n, c, cdt.itemsize)
    return _Problem(
        x=np.ascontiguousarray(x.reshape(n, h), dtype=cdt),
        w3=w.reshape(c, d, h),
        b2=None if b is None else np.asarray(b.reshape(c, d), dtype=cdt),
        target=t2,
        probs=probs,
        weight=wvec,
        ignore_index=ignore_index,
        label_smoothing=eps,
        chunk=min(chunk, c),
        rows=rows,
        reduction=reduction,
        denom=denom,
        in_dtype=x.dtype,
        loss_shape=index_shape,
        input_shape=x.shape,
        weight_shape=w.shape,
        bias_shape=None if b is None else b.shape,
    )


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FusedResult:
    """What :func:`run_fused` returns: the reduced loss and, with gradients, each of them in
    its argument's dtype and shape; ``per_row`` holds the float64 per-sample losses and
    ``filter_stats`` the gradient filter's totals (mass dropped, mass seen, tiles dropped,
    tiles seen) when it ran."""

    loss: Any
    per_row: np.ndarray
    grad_input: np.ndarray | None = None
    grad_weight: np.ndarray | None = None
    grad_bias: np.ndarray | None = None
    filter_stats: np.ndarray | None = None
    row_block: int = 0  # rows per block over the whole vocabulary, 0 if the vocabulary was chunked
    chunk: int = 0  # classes per vocabulary chunk, where it was chunked


def run_fused(
    input: ArrayLike,
    linear_weight: ArrayLike,
    target: ArrayLike,
    *,
    with_grad: bool = False,
    filter_eps: float = 0.0,
    **options: Any,
) -> FusedResult:
    """The engine behind :func:`linear_cross_entropy` and
    :func:`linear_cross_entropy_with_grad`, with the study's extra knob. ``options`` are
    linear_cross_entropy's keyword arguments (linear_bias, weight, reduction, ignore_index,
    label_smoothing, chunk_size), with its defaults.

    ``filter_eps`` > 0 applies Cut Cross-Entropy's gradient filter: every 128 x 128 tile of
    dL/dz (before the reduction's scaling) whose entries are all below ``filter_eps`` in
    magnitude is dropped. Cut Cross-Entropy uses eps/32 of the compute dtype
    (``dtypes.finfo(dtype).eps / 32``). The loss is not affected, only the gradients.
    """
    p = _prepare(input, linear_weight, target, **{**_OPTION_DEFAULTS, **options})
    n, h = p.x.shape
    c = p.w3.shape[0]
    per_row = np.empty((n, p.d))
    scale = dispatch.grad_scale(p.reduction, p.denom)
    gx = gw = gb = None
    stats = None
    if with_grad:
        gx = np.zeros((n, h), dtype=p.in_dtype) if p.d == 1 else np.zeros((n, h))
        gw = np.empty(p.weight_shape, dtype=p.in_dtype).reshape(c, p.d, h)
        gb = np.empty((c, p.d)) if p.b2 is not None else None
        if filter_eps > 0.0:
            stats = np.zeros(((n + kernel.FILTER_TILE[0] - 1) // kernel.FILTER_TILE[0], 4))
    thr = float(filter_eps) * abs(scale) if filter_eps > 0.0 else 0.0
    for d in range(p.d):
        loss_d = np.empty(n)
        gx_d = gw_d = None
        if with_grad:
            gx_d = gx if p.d == 1 else np.empty((n, h), dtype=p.in_dtype)
            gw_d = gw[:, d, :] if p.d == 1 else np.empty((c, h), dtype=p.in_dtype)
        w_d = p.weight_d(d)
        common = dict(
            with_grad=with_grad,
            grad_x=gx_d,
            grad_w=gw_d,
            grad_b=None if gb is None else gb[:, d],
            filter_threshold=thr,
            filter_stats=stats,
        )
        args = (
            p.x,
            w_d,
            p.bias_d(d),
            p.target_d(d),
            p.weight,
            p.ignore_index,
            p.label_smoothing,
            scale,
            loss_d,
        )
        if p.rows and w_d.flags.c_contiguous and (gw_d is None or gw_d.flags.c_contiguous):
            kernel.run_row_blocks(*args, rows=p.rows, **common)
            blocked = p.rows
        else:
            kernel.run(*args, chunk=p.chunk, probs=p.probs, **common)
            blocked = 0
        per_row[:, d] = loss_d
        if with_grad and p.d > 1:
            gx += gx_d
            gw[:, d, :] = gw_d
    loss = dispatch.finish_loss(per_row, p.reduction, p.denom, p.in_dtype, p.loss_shape)
    result = FusedResult(
        loss=loss,
        per_row=per_row.reshape(p.loss_shape),
        row_block=blocked,
        chunk=0 if blocked else p.chunk,
    )
    if with_grad:
        result.grad_input = gx.astype(p.in_dtype, copy=False).reshape(p.input_shape)
        result.grad_weight = gw.reshape(p.weight_shape)
        if gb is not None:
            result.grad_bias = gb.astype(p.in_dtype).reshape(p.bias_shape)
        if stats is not None:
            result.filter_stats = stats.sum(axis=0)
    return result


# --------------------------------------------------------------------------------------------
# The public functions
# --------------------------------------------------------------------------------------------
def linear_cross_entropy(
    input: ArrayLike,
    linear_weight: ArrayLike,
    target: ArrayLike,
    *,
    linear_bias: Optional[ArrayLike] = None,
    weight: Optional[ArrayLike] = None,
    reduction: Reduction = "mean",
    ignore_index: Optional[int] = -100,
    label_smoothing: float = 0.0,
    chunk_size: Optional[int] = None,
) -> Loss:
    """Cross-entropy of the logits ``input @ linear_weight.T + linear_bias``, computed without
    materialising them (``torch.nn.functional.linear_cross_entropy`` semantics).

    With z_i = W x_i + b (V classes), m = max_j z_ij, k its first index, y the target::

        loss_i = (1 - eps) w_y (-log p_y) + (eps / V) sum_c w_c (-log p_c)
        -log p_c = (m - z_c) + log1p(sum_{j != k} exp(z_j - m))

    Two ways, both keeping the relative accuracy of a confident row's loss (1e-30) as
    :func:`cestudy.cross_entropy` does. Where the logits of at least 128 rows (or all of them)
    over the whole vocabulary fit in 32 MiB and the weight is of the compute dtype (class-index
    targets, ``chunk_size=None``): blocks of rows, each block's logits from one BLAS product and
    given to cestudy's vectorised cross-entropy kernel. Otherwise, or when ``chunk_size`` is
    given: the vocabulary ``chunk_size`` classes at a time, each chunk's logits from one BLAS
    product folded into a running (max, argmax, sum without the argmax term) per row, the online
    log-sum-exp of Milakov & Gimelshein. The extra memory is O(32 MiB) or O(N x chunk_size),
    where ``cross_entropy(input @ W.T)`` needs N x V.

    Args:
        input: (N, H) or (H,) floating array (float64, float32, float16 or bfloat16).
        linear_weight: (V, H), or (V, d1, ..., dK, H) for a K-dimensional loss (needs a
            batched input), of the input's dtype.
        target: class indices of shape (N,) (() for an unbatched input; (N, d1, ..., dK) for
            a K-dimensional loss), or probabilities of the logits' shape (N, V[, d1, ...]).
        linear_bias: optional (V,) (or (V, d1, ..., dK)) bias of the input's dtype.
        weight: optional (V,) non-negative class weights.
        reduction: "mean" (the weighted mean over non-ignored targets; NaN if all are
            ignored), "sum" or "none".
        ignore_index: class index of targets to skip (class-index targets; ``None`` is -100,
            as in torch).
        label_smoothing: eps in [0, 1].
        chunk_size: classes per vocabulary chunk (None: blocks of rows where they fit, as
            above, else chunks of about 32 MiB of logits, between 256 and 8192 classes).

    Returns:
        The loss in the input's dtype: a scalar, or the shape of ``target`` (class indices)
        for reduction="none".

    Example:
        >>> import numpy as np, cestudy
        >>> x = np.array([[1.0, 2.0], [0.5, -1.0]], dtype=np.float32)
        >>> W = np.array([[2.0, 0.0], [0.0, 1.0], [-1.0, 1.0]], dtype=np.float32)
        >>> y = np.array([1, 0])
        >>> float(cestudy.linear_cross_entropy(x, W, y))
        0.529...
        >>> bool(np.isclose(cestudy.linear_cross_entropy(x, W, y, chunk_size=2),
        ...                 cestudy.cross_entropy(x @ W.T, y)))
        True
        >>> W = np.array([[40.0, 0.0], [0.0, 1.0]], dtype=np.float32)   # a confident row
        >>> float(cestudy.linear_cross_entropy(x[:1], W, y[1:]))        # exp(-38) / (1 + ...)
        3.1...e-17

    References:
        M. Milakov, N. Gimelshein, "Online normalizer calculation for softmax",
        arXiv:1805.02867, 2018.
        Blanchard, Higham & Higham, "Accurately computing the log-sum-exp and softmax
        functions", IMA J. Numer. Anal. 41(4), 2021.
        E. Wijmans et al., "Cut your losses in large-vocabulary language models", ICLR 2025.
    """
    options = {
        "linear_bias": linear_bias,
        "weight": weight,
        "reduction": reduction,
        "ignore_index": ignore_index,
        "label_smoothing": label_smoothing,
        "chunk_size": chunk_size,
    }
    return run_fused(input, linear_weight, target, **options).loss


# its parameters are linear_cross_entropy's: __signature__, set below, says so to inspect/help()
def linear_cross_entropy_with_grad(*args: Any, **kwargs: Any) -> tuple:
    """Fused :func:`linear_cross_entropy` and its gradients: returns ``(loss, grad_input,
    grad_weight)``, and ``grad_bias`` last when ``linear_bias`` is given.

    With G = dL/dz (the gradient of :func:`cestudy.cross_entropy_with_grad` on the logits,
    -S / (1 + S) for a true class that is the argmax)::

        grad_input = G @ W,   grad_weight = G.T @ input,   grad_bias = sum over rows of G

    accumulated one block of rows at a time (three matrix products, as for materialised
    logits: each block's logits are turned into G in place), or one chunk of the vocabulary at
    a time (a first pass finds every row's (max, sum), a second recomputes each chunk's logits
    and turns them into G in place: four products). These are what torch autograd gives for
    the same call with an upstream gradient of 1.

    Args:
        input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
            label_smoothing, chunk_size: as for :func:`linear_cross_entropy`.

    Returns:
        (loss, grad_input, grad_weight[, grad_bias]), each gradient of its argument's shape and
        dtype.

    Example:
        >>> import numpy as np, cestudy
        >>> x = np.array([[1.0, 2.0]], dtype=np.float32)
        >>> W = np.array([[30.0, 0.0], [0.0, 1.0]], dtype=np.float32)
        >>> loss, gx, gW = cestudy.linear_cross_entropy_with_grad(x, W, np.array([0]))
        >>> gx.shape, gW.shape
        ((1, 2), (2, 2))
        >>> float(gW[0, 0])          # -S / (1 + S), S = exp(2 - 30); softmax - onehot gives 0
        -6.9...e-13

    References:
        M. Milakov, N. Gimelshein, "Online normalizer calculation for softmax",
        arXiv:1805.02867, 2018.
        Blanchard, Higham & Higham, "Accurately computing the log-sum-exp and softmax
        functions", IMA J. Numer. Anal. 41(4), 2021.
    """
    try:
        bound = linear_cross_entropy_with_grad.__signature__.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"linear_cross_entropy_with_grad() {exc}") from None
    r = run_fused(*bound.args, **bound.kwargs, with_grad=True)
    if r.grad_bias is not None:
        return r.loss, r.grad_input, r.grad_weight, r.grad_bias
    return r.loss, r.grad_input, r.grad_weight


linear_cross_entropy_with_grad.__signature__ = inspect.signature(linear_cross_entropy).replace(
    return_annotation="tuple"
)
linear_cross_entropy_with_grad.__annotations__ = {
    **linear_cross_entropy.__annotations__,
    "return": "tuple",
}
# run_fused's options and their defaults: linear_cross_entropy's keyword-only parameters
_OPTION_DEFAULTS = {
    p.name: p.default
    for p in inspect.signature(linear_cross_entropy).parameters.values()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
}
