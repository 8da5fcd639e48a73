"""The public loss functions, with ``torch.nn.functional`` semantics, on numpy arrays.

Each function is thin: it documents the loss and hands its arguments to ``cestudy.dispatch``,
which checks them, picks the kernel and reduces. The formulas live in ``cestudy.kernels`` (which
document their error behaviour); the variants are declared in ``cestudy.variants``.

Conventions shared by every function:

- logits are (N, C) or (C,) numpy arrays (element-wise losses accept any shape, 0-d included);
- float64 and float32 are computed natively, float16 and bfloat16 with float32 kernels; results
  and gradients have the input dtype;
- ``reduction`` is "none", "mean" or "sum"; "mean" with class weights is the weighted mean over
  non-ignored targets, and a batch whose targets are all ignored gives NaN for "mean" (0 / 0, as
  torch does);
- inputs are never modified (unless passed as ``out=``); read-only, non-contiguous and
  Fortran-ordered arrays work;
- ``<name>_with_grad`` returns ``(loss, grad)``, grad = d(reduced loss)/d(logits), which is what
  torch autograd gives for the same call with an upstream gradient of ones; ``out=`` names the
  array to write the gradient into (it may be the logits themselves), so that a training loop
  reuses one buffer;
- with ``backend="cuda"``, numpy arrays in give numpy arrays out, and device arrays in (anything
  with ``__cuda_array_interface__``: numba device arrays, CuPy arrays, torch CUDA tensors) give
  device arrays out with no host round trip (a reduced loss is a device array of shape (1,)).

Accuracy: every loss and gradient is within a few ulp of the exact value in the input dtype,
extreme rows included (see the README's contract and ``tests/``).

References:
    P. Blanchard, D. J. Higham, N. J. Higham, "Accurately computing the log-sum-exp and softmax
    functions", IMA J. Numer. Anal. 41(4), 2021.
    T.-Y. Lin, P. Goyal, R. Girshick, K. He, P. Dollar, "Focal loss for dense object detection",
    ICCV 2017 (arXiv:1708.02002).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Callable, Optional, Union

import numpy as np

from . import dispatch
from .dispatch import Backend, Reduction
from .kernels import cpu

ArrayLike = Union[np.ndarray, "np.typing.ArrayLike"]
Loss = Union[np.ndarray, np.floating]


def _ce_variant(target) -> str:
    kind = getattr(getattr(target, "dtype", None), "kind", None)
    if kind is None:
        kind = np.asarray(target).dtype.kind
    return "cross_entropy" if kind in "iu" else "cross_entropy_probs"


def _run(function, input, target, reduction, backend, options, with_grad=False, out=None):
    """Public loss ``function`` (with ``with_grad``: and its gradient, into ``out``) computed
    by ``dispatch.run``: the one place where a loss's arguments become its variant's call, for
    the loss and its fused twin alike. ``options`` are the loss's other keyword arguments."""
    variant = function
    if function == "cross_entropy":
        variant = _ce_variant(target)
        if variant == "cross_entropy_probs":  # probabilities have no ignored class
            options = {k: v for k, v in options.items() if k != "ignore_index"}
    elif function == "kl_div":
        if reduction == "mean":  # stacklevel 3: the caller of kl_div or kl_div_with_grad
            warnings.warn(KL_DIV_MEAN_WARNING, UserWarning, stacklevel=3)
        options = {"log_target": bool(options["log_target"])}
    return dispatch.run(
        variant,
        input,
        target,
        reduction=reduction,
        backend=backend,
        with_grad=with_grad,
        out=out,
        **options,
    )


def _with_grad(loss: Callable[..., Loss], doc: str) -> Callable[..., tuple[Loss, np.ndarray]]:
    """The fused twin ``<loss>_with_grad`` of a public loss, with docstring ``doc``.

    Its parameters are ``loss``'s, ``(input, target, *, options)``, and a keyword-only ``out``
    (the gradient buffer): ``inspect.signature`` and ``help()`` show them. It hands its
    arguments to :func:`_run` as ``loss``'s body does, with ``with_grad=True``, and returns
    ``(loss, grad)``. A call is checked by hand (``Signature.bind`` would add a third to the
    cost of a small call); a wrong one gets ``Signature.bind``'s TypeError.
    """
    loss_signature = inspect.signature(loss)
    params = list(loss_signature.parameters.values())
    positional = (params[0].name, params[1].name)  # input (or logits), target; then keyword-only
    names = set(loss_signature.parameters)
    defaults = {p.name: p.default for p in params[2:]}
    out_param = inspect.Parameter(
        "out", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="Optional[np.ndarray]"
    )
    # string annotations, as ``from __future__ import annotations`` gives every function here
    signature = loss_signature.replace(
        parameters=[*params, out_param], return_annotation="tuple[Loss, np.ndarray]"
    )
    name = f"{loss.__name__}_with_grad"

    def twin(*args, out=None, **kwargs):
        arguments = {**defaults, **kwargs, **dict(zip(positional, args))}
        # a valid call names every parameter, input and target exactly once
        if arguments.keys() != names or len(args) + len(kwargs.keys() & positional) != 2:
            try:
                signature.bind(*args, out=out, **kwargs)
            except TypeError as exc:
                raise TypeError(f"{name}() {exc}") from None
        x, t = arguments.pop(positional[0]), arguments.pop(positional[1])
        reduction, backend = arguments.pop("reduction"), arguments.pop("backend", "cpu")
        return _run(loss.__name__, x, t, reduction, backend, arguments, with_grad=True, out=out)

    twin.__name__ = twin.__qualname__ = name
    twin.__doc__ = doc
    twin.__signature__ = signature
    twin.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    twin.__annotations__["return"] = signature.return_annotation
    return twin


# --------------------------------------------------------------------------------------------
# Softmax cross-entropy
# --------------------------------------------------------------------------------------------
def cross_entropy(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    weight: Optional[ArrayLike] = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    backend: Backend = "cpu",
) -> Loss:
    """Softmax cross-entropy, with ``torch.nn.functional.cross_entropy`` semantics.

    With class indices y and p = softmax(logits_i)::

        loss_i = (1 - eps) w_y (-log p_y) + (eps / C) sum_c w_c (-log p_c)

    With probabilities P (N, C), P' = (1 - eps) P + eps / C::

        loss_i = -sum_c w_c P'_c log p_c          (= H(P', p) with unit weights)

    -log p_c is computed as (m - x_c) + log1p(sum_{j != k} exp(x_j - m)), m = x_k the row's
    maximum, with the differences exact: a sum of two non-negative terms, so the loss keeps its
    relative accuracy where the textbook ``logsumexp(x) - x_y`` (torch, optax) rounds a loss of
    1e-30 to 0, and for equal logits at offsets of 1e8 in float32.

    Args:
        logits: (N, C) or (C,) floating array.
        target: (N,) integer class indices, or (N, C) floating probabilities.
        weight: optional (C,) non-negative class weights.
        ignore_index: the class index of rows to skip (index targets only).
        reduction: "mean" (weighted mean over non-ignored rows; NaN if all are ignored),
            "sum" or "none".
        label_smoothing: eps in [0, 1].
        backend: "cpu" (Numba) or "cuda" (numba-cuda; needs the ``cuda`` extra and a GPU).

    Returns:
        The loss in the logits' dtype: a scalar, or (N,) for reduction="none".

    Example:
        >>> import numpy as np, cestudy
        >>> z = np.array([[100.0, 0.0, -5.0]], dtype=np.float32)
        >>> float(cestudy.cross_entropy(z, np.array([0])))   # 3.748e-44 on float32's subnormal grid
        3.78...e-44
        >>> float(cestudy.cross_entropy(z, np.array([1])))
        100.0

    Semantics differ from torch in one documented place: with probability targets, a class
    with target 0 contributes 0 even when its logit is -inf (torch gives 0 * -inf = NaN).

    References:
        Blanchard, Higham & Higham, "Accurately computing the log-sum-exp and softmax
        functions", IMA J. Numer. Anal. 41(4), 2021.
        Szegedy et al., "Rethinking the Inception architecture for computer vision", CVPR 2016
        (label smoothing).
    """
    options = dict(weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing)
    return _run("cross_entropy", logits, target, reduction, backend, options)


cross_entropy_with_grad = _with_grad(
    cross_entropy,
    """Fused :func:`cross_entropy` and its gradient d(loss)/d(logits): returns (loss, grad).

    With class indices::

        grad_ij = scale [(1 - eps) w_y (p_j - [j == y]) + (eps / C)(W p_j - w_j)],  W = sum w

    (scale = 1 / (sum of w_y over kept rows) for "mean"). The true-class entry p_y - 1 is
    computed as -S / (1 + S), S = sum_{j != y} exp(x_j - x_y), so it keeps its relative accuracy
    where p_y rounds to 1 (``softmax - onehot`` returns 0 there).

    Args:
        logits, target, weight, ignore_index, reduction, label_smoothing, backend: as for
            :func:`cross_entropy`.
        out: optional array of the logits' shape and dtype to write the gradient into (may be
            ``logits`` itself).

    Returns:
        (loss, grad): the loss as :func:`cross_entropy` returns it, grad of the logits' shape
        and dtype.

    Example:
        >>> import numpy as np, cestudy
        >>> z = np.array([[30.0, 0.0]], dtype=np.float32)
        >>> loss, grad = cestudy.cross_entropy_with_grad(z, np.array([0]))
        >>> float(grad[0, 0])    # -exp(-30) / (1 + exp(-30)); softmax - onehot gives 0
        -9.357...e-14

    References:
        Blanchard, Higham & Higham, "Accurately computing the log-sum-exp and softmax
        functions", IMA J. Numer. Anal. 41(4), 2021.
    """,
)


# --------------------------------------------------------------------------------------------
# KL divergence and entropy
# --------------------------------------------------------------------------------------------
def kl_divergence(
    logits: ArrayLike, target: ArrayLike, *, reduction: Reduction = "mean", backend: Backend = "cpu"
) -> Loss:
    """KL(target || softmax(logits)) per row, with 0 log 0 = 0::

        KL_i = sum_c p_c log(p_c / q_c),   q = softmax(logits_i)

    Together with :func:`entropy` it decomposes the cross-entropy, H(p, q) = H(p) + KL(p || q):
    ``cross_entropy(z, p, reduction="none") == entropy(p) + kl_divergence(z, p,
    reduction="none")`` within a few ulp. "mean" averages over rows (torch's ``kl_div(...,
    reduction="batchmean")``; torch's own "mean" averages over elements).

    KL is ill-conditioned where p is close to q: there its relative error is bounded by the
    condition number times the unit roundoff, not by a few ulp.

    Args:
        logits: (N, C) or (C,) floating array.
        target: probabilities P of the logits' shape (non-negative; rows need not sum to 1).
        reduction: "mean" (over rows), "sum" or "none".
        backend: "cpu" or "cuda".

    Returns:
        The divergence in the logits' dtype: a scalar, or (N,) for reduction="none".

    Example:
        >>> import numpy as np, cestudy
        >>> p = np.array([0.5, 0.5])
        >>> float(cestudy.kl_divergence(np.log(p), p))      # q = p
        0.0
        >>> round(float(cestudy.kl_divergence(np.array([0.0, np.log(3.0)]), p)), 6)
        0.143841

    References:
        S. Kullback, R. A. Leibler, "On information and sufficiency", Ann. Math. Statist. 22,
        1951.
    """
    return _run("kl_divergence", logits, target, reduction, backend, {})


kl_divergence_with_grad = _with_grad(
    kl_divergence,
    """Fused :func:`kl_divergence` and its gradient ``(sum_c p_c) q_j - p_j`` (times 1/N for
    "mean").

    Args:
        logits, target, reduction, backend: as for :func:`kl_divergence`.
        out: optional gradient buffer of the logits' shape and dtype.

    Returns:
        (loss, grad).

    Example:
        >>> import numpy as np, cestudy
        >>> _, g = cestudy.kl_divergence_with_grad(np.zeros(2), np.array([1.0, 0.0]))
        >>> g.tolist()
        [-0.5, 0.5]
    """,
)


def entropy(p: ArrayLike, *, reduction: Reduction = "none") -> Loss:
    """Shannon entropy H(p) = -sum_c p_c log p_c (nats) over the last axis, 0 log 0 = 0.

    Args:
        p: (N, C) or (C,) non-negative floating array (rows need not be normalised).
        reduction: "none" (default), "mean" or "sum" over rows.

    Returns:
        The entropy in p's dtype: (N,) (or a scalar) for "none", else a scalar.

    Example:
        >>> import numpy as np, cestudy
        >>> round(float(cestudy.entropy(np.array([0.5, 0.5]))), 12)   # log 2
        0.69314718056

    References:
        C. E. Shannon, "A mathematical theory of communication", Bell Syst. Tech. J. 27, 1948.
    """
    dispatch.check_choice("reduction", reduction, dispatch.REDUCTIONS)
    arr, x, squeeze = dispatch.logits_2d("p", p)
    if np.any(x < 0):
        raise ValueError("p must be non-negative; got a negative entry")
    out = np.empty(x.shape[0], dtype=np.float64)
    cpu.kernel_for(cpu, "entropy_fwd", x.size)(x, out)
    return dispatch.finish_loss(
        out, reduction, x.shape[0], arr.dtype, () if squeeze else (x.shape[0],)
    )


# --------------------------------------------------------------------------------------------
# Losses on log-probabilities: torch's nll_loss and kl_div
# --------------------------------------------------------------------------------------------
def nll_loss(
    input: ArrayLike,
    target: ArrayLike,
    *,
    weight: Optional[ArrayLike] = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
) -> Loss:
    """Negative log-likelihood of log-probabilities, ``torch.nn.functional.nll_loss``::

        loss_i = -w_{y_i} input[i, y_i]      (0 for rows whose target is ``ignore_index``)

    ``cross_entropy(x, y) == nll_loss(log_softmax(x, dim=1), y)``; cross_entropy computes it in
    one pass and keeps the accuracy of tiny losses, which a rounded log_softmax has lost.

    Args:
        input: log-probabilities, (N, C), (C,) or (N, C, d1, ..., dk).
        target: integer class indices of shape (N,), () or (N, d1, ..., dk).
        weight: optional (C,) non-negative class weights.
        ignore_index: the class index of entries to skip.
        reduction: "mean" (divided by the sum of w_y over kept entries), "sum" or "none".

    Returns:
        The loss in the input's dtype.

    Example:
        >>> import numpy as np, cestudy
        >>> logp = np.log(np.array([[0.5, 0.25, 0.25]]))
        >>> round(float(cestudy.nll_loss(logp, np.array([1]))), 12)     # log 4
        1.38629436112
    """
    options = dict(weight=weight, ignore_index=ignore_index)
    return _run("nll_loss", input, target, reduction, "cpu", options)


nll_loss_with_grad = _with_grad(
    nll_loss,
    """Fused :func:`nll_loss` and its gradient: -w_y (times the reduction's scale) at each
    target, 0 elsewhere.

    Args:
        input, target, weight, ignore_index, reduction: as for :func:`nll_loss`.
        out: optional gradient buffer of the input's shape and dtype.

    Returns:
        (loss, grad).

    Example:
        >>> import numpy as np, cestudy
        >>> _, g = cestudy.nll_loss_with_grad(np.zeros((2, 2)), np.array([0, 1]))
        >>> g.tolist()
        [[-0.5, 0.0], [0.0, -0.5]]
    """,
)


KL_DIV_MEAN_WARNING = (
    "reduction: 'mean' divides the total loss by both the batch size and the support size. "
    "'batchmean' divides only by the batch size, and aligns with the KL div math definition. "
    "'mean' will be changed to behave the same as 'batchmean' in the next major release."
)


def kl_div(
    input: ArrayLike, target: ArrayLike, *, reduction: str = "mean", log_target: bool = False
) -> Loss:
    """Pointwise KL divergence of log-probabilities, ``torch.nn.functional.kl_div``::

        loss = target (log target - input)             (0 where target = 0)
        loss = exp(target) (target - input)            (log_target=True)

    ``input`` holds log q; summed over classes this is KL(target || q). cestudy's
    :func:`kl_divergence` takes logits instead and is the accurate choice when logits are at
    hand. As in torch, ``reduction="mean"`` averages over every element and warns; "batchmean"
    divides the sum by the batch size (the first axis), which is the KL divergence per sample.

    Args:
        input: log-probabilities, any shape.
        target: probabilities (or log-probabilities with ``log_target``) of the same shape.
        reduction: "mean" (over elements; warns), "batchmean", "sum" or "none".
        log_target: whether ``target`` holds log-probabilities.

    Returns:
        The loss in the input's dtype.

    Example:
        >>> import numpy as np, cestudy
        >>> p = np.array([[0.5, 0.5]])
        >>> round(float(cestudy.kl_div(np.log(np.array([[0.25, 0.75]])), p,
        ...                            reduction="batchmean")), 12)
        0.143841036226
    """
    return _run("kl_div", input, target, reduction, "cpu", {"log_target": log_target})


kl_div_with_grad = _with_grad(
    kl_div,
    """Fused :func:`kl_div` and its gradient with respect to ``input``: -target (or
    -exp(target)), times the reduction's scale.

    Args:
        input, target, reduction, log_target: as for :func:`kl_div`.
        out: optional gradient buffer of the input's shape and dtype.

    Returns:
        (loss, grad).

    Example:
        >>> import numpy as np, cestudy
        >>> _, g = cestudy.kl_div_with_grad(np.zeros(2), np.array([0.25, 0.75]), reduction="sum")
        >>> g.tolist()
        [-0.25, -0.75]
    """,
)


# --------------------------------------------------------------------------------------------
# Binary cross-entropy
# --------------------------------------------------------------------------------------------
def binary_cross_entropy_with_logits(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    weight: Optional[ArrayLike] = None,
    pos_weight: Optional[ArrayLike] = None,
    reduction: Reduction = "mean",
    backend: Backend = "cpu",
) -> Loss:
    """Binary cross-entropy on logits, ``torch.nn.functional.binary_cross_entropy_with_logits``::

        loss = w [pw t softplus(-x) + (1 - t) softplus(x)],
        softplus(x) = max(x, 0) + log1p(exp(-|x|))

    Both terms are non-negative for t in [0, 1], so the loss keeps full relative accuracy: at
    x = 18, t = 1 in float32 it returns 1.523e-8, where ``-log(sigmoid(x))`` gives 0 and torch's
    BCELoss on probabilities gives 100.

    Args:
        logits: floating array of any shape.
        target: targets in [0, 1] of the logits' shape.
        weight: optional non-negative weight broadcastable to the logits' shape.
        pos_weight: optional non-negative weight of the positive term, broadcastable (usually
            of shape (C,)).
        reduction: "mean" (over all elements), "sum" or "none".
        backend: "cpu" or "cuda".

    Returns:
        The loss in the logits' dtype: a scalar, or the logits' shape for "none".

    Example:
        >>> import numpy as np, cestudy
        >>> x = np.array([18.0], dtype=np.float32)
        >>> float(cestudy.binary_cross_entropy_with_logits(x, np.array([1.0], np.float32)))
        1.522997...e-08

    References:
        TensorFlow's ``sigmoid_cross_entropy_with_logits`` documents the same max(x, 0) form.
    """
    options = dict(weight=weight, pos_weight=pos_weight)
    return _run("binary_cross_entropy_with_logits", logits, target, reduction, backend, options)


binary_cross_entropy_with_logits_with_grad = _with_grad(
    binary_cross_entropy_with_logits,
    """Fused :func:`binary_cross_entropy_with_logits` and its gradient::

        d loss / d x = w [(1 - t) sigmoid(x) - pw t sigmoid(-x)]

    with each sigmoid evaluated on the side where it keeps its relative accuracy.

    Args:
        logits, target, weight, pos_weight, reduction, backend: as for
            :func:`binary_cross_entropy_with_logits`.
        out: optional gradient buffer of the logits' shape and dtype.

    Returns:
        (loss, grad): the loss as the forward function returns it, and its gradient (divided
        by the number of elements for "mean").

    Example:
        >>> import numpy as np, cestudy
        >>> _, g = cestudy.binary_cross_entropy_with_logits_with_grad(
        ...     np.array([0.0]), np.array([1.0]), reduction="sum")
        >>> g.tolist()
        [-0.5]
    """,
)


def binary_cross_entropy(
    probs: ArrayLike,
    target: ArrayLike,
    *,
    weight: Optional[ArrayLike] = None,
    reduction: Reduction = "mean",
) -> Loss:
    """Binary cross-entropy on probabilities, ``torch.nn.functional.binary_cross_entropy``::

        loss = -w [t max(log p, -100) + (1 - t) max(log(1 - p), -100)]

    The clamp of each log at -100 is torch's formulation, kept here so that results match: it
    keeps the loss finite at p = 0 or 1 but caps it at 100 and biases it wherever p rounds to 0
    or 1 (in float32 sigmoid(18) rounds to 1, so a true loss of 1.5e-8 becomes 100 on the wrong
    side). Prefer :func:`binary_cross_entropy_with_logits` when logits are available.

    Args:
        probs: probabilities in [0, 1], any shape.
        target: targets in [0, 1] of the same shape.
        weight: optional non-negative weight broadcastable to the shape.
        reduction: "mean" (over all elements), "sum" or "none".

    Returns:
        The loss in the probabilities' dtype.

    Example:
        >>> import numpy as np, cestudy
        >>> float(cestudy.binary_cross_entropy(np.array([1.0]), np.array([0.0])))  # clamped
        100.0
    """
    dispatch.check_choice("reduction", reduction, dispatch.REDUCTIONS)
    arr = dispatch.as_float_array("probs", probs)
    tgt = dispatch.as_float_array("target", target)
    if tgt.shape != arr.shape:
        raise ValueError(f"target must have the shape of probs {arr.shape}; got {tgt.shape}")
    p = np.asarray(arr, dtype=np.float64)
    if np.any((p < 0) | (p > 1)):
        raise ValueError("probs must lie in [0, 1] (torch raises for values outside)")
    t = np.asarray(tgt, dtype=np.float64)
    w = dispatch.elementwise_weights("weight", weight, arr.shape).reshape(arr.shape)
    # the probabilities are first rounded in the working precision, as torch computes them
    p = p.astype(dispatch.dtypes.working_dtype(arr.dtype)).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_p = np.maximum(np.log(p), -100.0)
        log_1mp = np.maximum(np.log1p(-p), -100.0)
        loss = -w * (t * log_p + (1.0 - t) * log_1mp)
    return dispatch.finish_loss(
        np.asarray(loss, dtype=np.float64), reduction, arr.size, arr.dtype, arr.shape
    )


# --------------------------------------------------------------------------------------------
# Focal losses
# --------------------------------------------------------------------------------------------
def softmax_focal_loss(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    gamma: float = 2.0,
    weight: Optional[ArrayLike] = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    backend: Backend = "cpu",
) -> Loss:
    """Multiclass focal loss::

        FL_i = -w_y (1 - p_y)^gamma log p_y,   p = softmax(logits_i)

    1 - p_y is computed as sum_{j != y} p_j, so it keeps relative accuracy on confident rows
    (where ``1 - p_y`` rounds to 0 and the loss would vanish). "mean" is the weighted mean over
    non-ignored rows, as for :func:`cross_entropy`; gamma = 0 gives cross_entropy.

    Args:
        logits: (N, C) or (C,) floating array.
        target: (N,) integer class indices.
        gamma: focusing parameter >= 0.
        weight: optional (C,) non-negative class weights (the alpha of Lin et al. per class).
        ignore_index: the class index of rows to skip.
        reduction: "mean", "sum" or "none".
        backend: "cpu" or "cuda".

    Returns:
        The loss in the logits' dtype.

    Example:
        >>> import numpy as np, cestudy
        >>> z = np.array([[0.0, 0.0]])
        >>> round(float(cestudy.softmax_focal_loss(z, np.array([0]))), 12)  # 0.25 log 2
        0.17328679514

    References:
        Lin, Goyal, Girshick, He & Dollar, "Focal loss for dense object detection", ICCV 2017.
    """
    options = dict(gamma=gamma, weight=weight, ignore_index=ignore_index)
    return _run("softmax_focal_loss", logits, target, reduction, backend, options)


softmax_focal_loss_with_grad = _with_grad(
    softmax_focal_loss,
    """Fused :func:`softmax_focal_loss` and its gradient::

        d FL / d x_j = w_y (p_j - [j == y]) (1 - p_y)^(gamma - 1) (gamma (-log p_y) p_y + 1 - p_y)

    Args:
        logits, target, gamma, weight, ignore_index, reduction, backend: as for
            :func:`softmax_focal_loss`; ``out``: an optional gradient buffer.

    Returns:
        (loss, grad), grad divided by the sum of w_y over kept rows for "mean".

    Example:
        >>> import numpy as np, cestudy
        >>> _, g = cestudy.softmax_focal_loss_with_grad(np.zeros((1, 2)), np.array([0]),
        ...                                             gamma=0.0)   # cross-entropy
        >>> g.tolist()
        [[-0.5, 0.5]]

    References:
        Lin, Goyal, Girshick, He & Dollar, "Focal loss for dense object detection", ICCV 2017.
    """,
)


def sigmoid_focal_loss(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: Reduction = "none",
    backend: Backend = "cpu",
) -> Loss:
    """Sigmoid focal loss, ``torchvision.ops.sigmoid_focal_loss`` semantics::

        loss = alpha_t BCE_with_logits(x, t) (1 - p_t)^gamma,
        p_t = p t + (1 - p)(1 - t),  alpha_t = alpha t + (1 - alpha)(1 - t)  (alpha < 0: off)

    1 - p_t is computed as t sigmoid(-x) + (1 - t) sigmoid(x), without cancellation.

    Args:
        logits: floating array of any shape.
        target: targets in [0, 1] of the logits' shape.
        alpha: weight of the positive class in [0, 1], or negative to disable.
        gamma: focusing parameter >= 0.
        reduction: "none" (torchvision's default), "mean" or "sum".
        backend: "cpu" or "cuda".

    Returns:
        The loss in the logits' dtype.

    Example:
        >>> import numpy as np, cestudy
        >>> loss = cestudy.sigmoid_focal_loss(np.array([0.0]), np.array([1.0]))
        >>> round(float(loss[0]), 12)    # 0.25 * log 2 * 0.5^2
        0.043321698785

    References:
        Lin, Goyal, Girshick, He & Dollar, "Focal loss for dense object detection", ICCV 2017.
    """
    return _run(
        "sigmoid_focal_loss", logits, target, reduction, backend, dict(alpha=alpha, gamma=gamma)
    )


sigmoid_focal_loss_with_grad = _with_grad(
    sigmoid_focal_loss,
    """Fused :func:`sigmoid_focal_loss` and its gradient::

        d loss / d x = alpha_t (1 - p_t)^gamma [s(x) - t
                                                + gamma BCE (1 - 2t) s(x) s(-x) / (1 - p_t)]

    Args:
        logits, target, alpha, gamma, reduction, backend: as for :func:`sigmoid_focal_loss`.
        out: optional gradient buffer of the logits' shape and dtype.

    Returns:
        (loss, grad).

    Example:
        >>> import numpy as np, cestudy
        >>> _, g = cestudy.sigmoid_focal_loss_with_grad(np.array([0.0]), np.array([1.0]),
        ...                                             alpha=-1.0, gamma=0.0)   # plain BCE
        >>> g.tolist()
        [-0.5]

    References:
        Lin, Goyal, Girshick, He & Dollar, "Focal loss for dense object detection", ICCV 2017.
    """,
)


# --------------------------------------------------------------------------------------------
# logsumexp, log_softmax, softmax
# --------------------------------------------------------------------------------------------
def logsumexp(
    logits: ArrayLike, dim: Union[int, tuple[int, ...]] = -1, keepdim: bool = False
) -> np.ndarray:
    """log(sum_j exp(x_j)) over the last axis, computed as::

        m + log1p(sum_{j != k} exp(x_j - m)),   m = x_k = max_j x_j

    (Blanchard, Higham & Higham 2021; the form scipy.special.logsumexp also uses).

    Args:
        logits: floating array.
        dim: the axis, or tuple of axes, to reduce (torch's ``dim``; default the last).
        keepdim: keep the reduced axes with length 1.

    Returns:
        The array without the reduced axes (or with them of length 1), in the logits' dtype;
        -inf where the reduced axes are empty.

    Example:
        >>> import numpy as np, cestudy
        >>> float(cestudy.logsumexp(np.array([1000.0, 1000.0]))) - 1000.0   # log 2
        0.693147...

    References:
        Blanchard, Higham & Higham, "Accurately computing the log-sum-exp and softmax
        functions", IMA J. Numer. Anal. 41(4), 2021.
    """
    return dispatch.rows("logsumexp_rows", logits, per_row=True, dim=dim, keepdim=keepdim)


def log_softmax(logits: ArrayLike, dim: int = -1, dtype=None) -> np.ndarray:
    """x_j - logsumexp(x) over the last axis, computed as -((m - x_j) + log1p(S)) with the
    difference m - x_j in double-double, so that a dominant class gets its tiny
    -sum_{j != k} p_j instead of 0.

    Args:
        logits: floating array.
        dim: the axis over which to normalise (torch's ``dim``; default the last).
        dtype: optional floating dtype to cast the input to first (torch's ``dtype``).

    Returns:
        An array of the logits' shape, in their dtype (or ``dtype``).

    Example:
        >>> import numpy as np, cestudy
        >>> float(cestudy.log_softmax(np.array([40.0, 0.0], dtype=np.float32))[0])
        -4.248354...e-18

    References:
        Blanchard, Higham & Higham, "Accurately computing the log-sum-exp and softmax
        functions", IMA J. Numer. Anal. 41(4), 2021.
    """
    return dispatch.rows("log_softmax_rows", logits, per_row=False, dim=dim, dtype=dtype)


def softmax(logits: ArrayLike, dim: int = -1, dtype=None) -> np.ndarray:
    """exp(x_j - m) / (1 + sum_{j != k} exp(x_j - m)) over the last axis (softmax by division,
    the more accurate of the two forms Blanchard, Higham & Higham analyse).

    Args:
        logits, dim, dtype: as for :func:`log_softmax`.

    Returns:
        An array of the logits' shape, in their dtype (or ``dtype``).

    Example:
        >>> import numpy as np, cestudy
        >>> cestudy.softmax(np.array([0.0, 0.0])).tolist()
        [0.5, 0.5]

    References:
        Blanchard, Higham & Higham, "Accurately computing the log-sum-exp and softmax
        functions", IMA J. Numer. Anal. 41(4), 2021.
    """
    return dispatch.rows("softmax_rows", logits, per_row=False, dim=dim, dtype=dtype)


__all__ = [
    "cross_entropy",
    "cross_entropy_with_grad",
    "binary_cross_entropy_with_logits",
    "binary_cross_entropy_with_logits_with_grad",
    "binary_cross_entropy",
    "kl_divergence",
    "kl_divergence_with_grad",
    "entropy",
    "softmax_focal_loss",
    "softmax_focal_loss_with_grad",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_with_grad",
    "logsumexp",
    "log_softmax",
    "softmax",
    "nll_loss",
    "nll_loss_with_grad",
    "kl_div",
    "kl_div_with_grad",
]
