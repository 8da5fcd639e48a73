"""Public loss functions with ``torch.nn.functional`` semantics, on numpy arrays.

This layer validates arguments (errors name the argument), converts dtypes, picks the backend's
kernel and applies the reduction. It holds no numerical formulas: those live in
``cestudy.kernels.cpu`` (and ``cestudy.kernels.cuda``), which document their error behaviour.

Conventions shared by every function:
- logits are (N, C) or (C,) numpy arrays (element-wise losses accept any shape);
- float64 and float32 are computed natively, float16 and bfloat16 with float32 kernels; results
  and gradients have the input dtype;
- ``reduction`` is "none", "mean" or "sum"; "mean" with class weights is the weighted mean over
  non-ignored targets, and a batch whose targets are all ignored gives NaN for "mean" (0 / 0, as
  torch does);
- inputs are never modified; read-only, non-contiguous and Fortran-ordered arrays work;
- ``<name>_with_grad`` returns ``(loss, grad)``, grad = d(reduced loss)/d(logits), which is what
  torch autograd gives for the same call with an upstream gradient of ones;
- with ``backend="cuda"``, numpy arrays in give numpy arrays out, and device arrays in (anything
  with ``__cuda_array_interface__``: numba device arrays, CuPy arrays, torch CUDA tensors) give
  device arrays out with no host round trip (a reduced loss is a device array of shape (1,));
  see ``cestudy.kernels.cuda.device_loss`` for the in-place gradient option.
"""
from __future__ import annotations

import math

import numpy as np

from . import dtypes
from .kernels import cpu, cpu_fast

REDUCTIONS = ("none", "mean", "sum")
BACKENDS = ("cpu", "cuda")


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------
def _check_choice(name, value, allowed):
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _as_float_array(name, a):
    """np.asarray(a) checked to be of a supported floating dtype (no copy)."""
    arr = np.asarray(a)
    if not dtypes.is_float_dtype(arr.dtype):
        kind = {"i": "integer", "u": "integer", "b": "boolean", "c": "complex"}.get(arr.dtype.kind,
                                                                                  str(arr.dtype))
        raise TypeError(f"{name} must be a floating-point array (float64, float32, float16 or "
                        f"bfloat16); got {kind} dtype {arr.dtype}")
    return arr


def _logits_2d(name, logits):
    """Validate (N, C) or (C,) logits; return (array, 2-D working copy/view, squeeze flag)."""
    arr = _as_float_array(name, logits)
    if arr.ndim not in (1, 2):
        raise ValueError(f"{name} must have shape (N, C) or (C,); got shape {arr.shape}")
    if arr.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one class (last axis of length >= 1); "
                         f"got shape {arr.shape}")
    work = dtypes.working_dtype(arr.dtype)
    x2 = np.ascontiguousarray(arr.reshape(1, -1) if arr.ndim == 1 else arr, dtype=work)
    return arr, x2, arr.ndim == 1


def _check_backend(backend):
    _check_choice("backend", backend, BACKENDS)
    if backend == "cuda":
        from . import backends

        return backends.require_cuda()
    return None


def _device_call(variant, logits, target, backend, with_grad, reduction, **opts):
    """Device arrays with backend="cuda": run on the device, return device arrays (or None when
    ``logits`` is a host array and the numpy path applies)."""
    if backend != "cuda" or isinstance(logits, np.ndarray):
        return None
    if not (hasattr(logits, "__cuda_array_interface__")
            or type(logits).__name__ == "FakeCUDAArray"):
        return None
    _check_choice("reduction", reduction, REDUCTIONS)
    ck = _check_backend(backend)
    return ck.device_loss(variant, logits, target, reduction=reduction, with_grad=with_grad,
                          **opts)


def _class_weight(weight, n_classes):
    """Validate a per-class weight vector; return float64 contiguous (C,) (ones if None)."""
    if weight is None:
        return np.ones(n_classes, dtype=np.float64)
    w = _as_float_array("weight", weight)
    if w.ndim != 1 or w.shape[0] != n_classes:
        raise ValueError(f"weight must have shape ({n_classes},) (one entry per class); "
                         f"got shape {w.shape}")
    w = np.ascontiguousarray(w, dtype=np.float64)
    if np.any(w < 0):
        raise ValueError("weight must be non-negative; got a negative entry at index "
                         f"{int(np.flatnonzero(w < 0)[0])}")
    return w


def _index_target(target, n_rows, n_classes, ignore_index, squeeze):
    t = np.asarray(target)
    if t.dtype.kind not in "iu":
        raise TypeError(f"target must be integer class indices (or float probabilities of the "
                        f"logits' shape); got dtype {t.dtype}")
    expected = () if squeeze else (n_rows,)
    if t.shape != expected:
        raise ValueError(f"target of class indices must have shape {expected} to match logits; "
                         f"got shape {t.shape}")
    t = np.ascontiguousarray(t.reshape(n_rows), dtype=np.int64)
    bad = (t != ignore_index) & ((t < 0) | (t >= n_classes))
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"target[{i}] = {int(t[i])} is out of range for {n_classes} classes "
                         f"(expected 0 <= target < {n_classes} or ignore_index={ignore_index})")
    return t


def _prob_target(target, logits_shape, work_dtype, name="target"):
    t = _as_float_array(name, target)
    if t.shape != logits_shape:
        raise ValueError(f"{name} of probabilities must have the logits' shape {logits_shape}; "
                         f"got shape {t.shape}")
    t2 = np.ascontiguousarray(t.reshape(-1, logits_shape[-1]), dtype=work_dtype)
    if np.any(t2 < 0):
        raise ValueError(f"{name} probabilities must be non-negative; got a negative entry")
    return t2


def _check_smoothing(label_smoothing):
    ls = float(label_smoothing)
    if not 0.0 <= ls <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1]; got {label_smoothing!r}")
    return ls


def _finish_loss(per_sample, reduction, denominator, out_dtype, out_shape):
    """Reduce float64 per-sample losses (compensated sum) and round once to ``out_dtype``."""
    if reduction == "none":
        return per_sample.reshape(out_shape).astype(out_dtype)
    total = cpu.compensated_sum(np.ascontiguousarray(per_sample.reshape(-1)))
    if reduction == "sum":
        return out_dtype.type(total)
    with np.errstate(invalid="ignore", divide="ignore"):
        return out_dtype.type(np.float64(total) / np.float64(denominator))


def _grad_scale(reduction, denominator):
    if reduction != "mean":
        return 1.0
    return 1.0 / denominator if denominator != 0 else math.nan


def _index_denominator(target, weight, ignore_index):
    """Sum of w_{y_i} over non-ignored rows: torch's denominator for reduction='mean'."""
    keep = target != ignore_index
    return float(weight[target[keep]].sum()) if np.any(keep) else 0.0


def _elementwise_weights(name, weight, shape):
    """Broadcast an element-wise weight to ``shape`` as a float64 2-D view (no copy if possible)."""
    if weight is None:
        w = np.ones((1,), dtype=np.float64)
    else:
        w = np.asarray(_as_float_array(name, weight), dtype=np.float64)
        if np.any(w < 0):
            raise ValueError(f"{name} must be non-negative; got a negative entry")
    try:
        b = np.broadcast_to(w, shape)
    except ValueError:
        raise ValueError(f"{name} of shape {w.shape} cannot be broadcast to the logits' shape "
                         f"{shape}") from None
    return b.reshape(_shape_2d(shape))


def _contiguous_rows(w2):
    """A broadcast (N, C) weight view as contiguous rows: (1, C) when every row is the same
    (stride 0 along rows), else (N, C)."""
    if w2.shape[0] > 1 and w2.strides[0] == 0:
        return np.ascontiguousarray(w2[:1])
    return np.ascontiguousarray(w2)


def _shape_2d(shape):
    if len(shape) == 0:
        return (1, 1)
    return (int(np.prod(shape[:-1], dtype=np.int64)), shape[-1])


# --------------------------------------------------------------------------------------------
# Softmax cross-entropy
# --------------------------------------------------------------------------------------------
def _cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing, backend,
                   with_grad):
    t_kind = getattr(getattr(target, "dtype", None), "kind", "f")
    dev = _device_call("ce_index" if t_kind in "iu" else "ce_prob", logits, target, backend,
                       with_grad, reduction, weight=weight, ignore_index=int(ignore_index),
                       label_smoothing=_check_smoothing(label_smoothing))
    if dev is not None:
        return dev
    _check_choice("reduction", reduction, REDUCTIONS)
    cuda = _check_backend(backend)
    arr, x, squeeze = _logits_2d("logits", logits)
    n, c = x.shape
    w = _class_weight(weight, c)
    eps = _check_smoothing(label_smoothing)
    out_shape = () if squeeze else (n,)
    tgt = np.asarray(target)
    loss = np.empty(n, dtype=np.float64)
    grad = np.empty_like(x) if with_grad else None
    if tgt.dtype.kind in "iu":
        t = _index_target(tgt, n, c, int(ignore_index), squeeze)
        denom = _index_denominator(t, w, ignore_index)
        scale = _grad_scale(reduction, denom)
        # float32 rows take the vectorised kernels (float64 arithmetic, same contract)
        k = cuda or (cpu_fast if x.dtype == np.float32 else cpu)
        if with_grad:
            k.cross_entropy_index_fwd_grad(x, t, w, int(ignore_index), eps, scale, loss, grad)
        else:
            k.cross_entropy_index_fwd(x, t, w, int(ignore_index), eps, loss)
    else:
        t = _prob_target(tgt, arr.shape, x.dtype)
        denom = float(n)
        scale = _grad_scale(reduction, denom)
        k = cuda or (cpu_fast if x.dtype == np.float32 else cpu)
        if with_grad:
            k.cross_entropy_prob_fwd_grad(x, t, w, eps, scale, loss, grad)
        else:
            k.cross_entropy_prob_fwd(x, t, w, eps, loss)
    out = _finish_loss(loss, reduction, denom, arr.dtype, out_shape)
    if not with_grad:
        return out
    return out, grad.reshape(arr.shape).astype(arr.dtype, copy=False)


def cross_entropy(logits, target, *, weight=None, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, backend: str = "cpu"):
    """Softmax cross-entropy, ``torch.nn.functional.cross_entropy`` semantics.

    With class indices y:  loss_i = (1 - eps) w_y (-log p_y) + (eps / C) sum_c w_c (-log p_c),
    p = softmax(logits_i). With probabilities P (N, C):  loss_i = -sum_c w_c P'_c log p_c,
    P' = (1 - eps) P + eps / C, which is H(P', p) (with unit weights).

    Accuracy: each per-sample loss within a few ulp of the exact value in the input dtype, also
    for confident-correct rows whose loss is 1e-30 (``lse - x_y``, torch and optax return 0
    there) and for equal logits at offsets of 1e8 in float32. See ``cestudy.kernels.cpu``.

    Args:
        logits: (N, C) or (C,) floating array.
        target: (N,) integer class indices or (N, C) floating probabilities.
        weight: optional (C,) non-negative class weights.
        ignore_index: class index whose rows are skipped (index targets only).
        reduction: "mean" (weighted mean over non-ignored rows; NaN if all are ignored),
            "sum" or "none".
        label_smoothing: eps in [0, 1].
        backend: "cpu" (Numba) or "cuda" (numba-cuda, needs the ``cuda`` extra and a GPU).

    Returns:
        The loss in the logits' dtype: a scalar, or an (N,) array for reduction="none".

    Example:
        >>> import numpy as np, cestudy
        >>> z = np.array([[100.0, 0.0, -5.0]], dtype=np.float32)
        >>> float(cestudy.cross_entropy(z, np.array([0])))   # exp(-100) + exp(-105)
        3.7266...e-44

    Semantics differ from torch in one documented place: with probability targets, a class
    with target 0 contributes 0 even when its logit is -inf (torch gives 0 * -inf = NaN).
    """
    return _cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing,
                          backend, with_grad=False)


def cross_entropy_with_grad(logits, target, *, weight=None, ignore_index: int = -100,
                            reduction: str = "mean", label_smoothing: float = 0.0,
                            backend: str = "cpu"):
    """Fused :func:`cross_entropy` and its gradient d(loss)/d(logits): returns (loss, grad).

    grad_ij = scale [(1 - eps) w_y (p_j - [j == y]) + (eps / C)(W p_j - w_j)], W = sum w; the
    true-class entry p_y - 1 is computed as -S / (1 + S) so it keeps its relative accuracy when
    p_y rounds to 1 (``softmax - onehot`` returns 0 there).
    """
    return _cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing,
                          backend, with_grad=True)


# --------------------------------------------------------------------------------------------
# KL divergence and entropy
# --------------------------------------------------------------------------------------------
def _kl(logits, target, reduction, backend, with_grad):
    dev = _device_call("kl", logits, target, backend, with_grad, reduction)
    if dev is not None:
        return dev
    _check_choice("reduction", reduction, REDUCTIONS)
    cuda = _check_backend(backend)
    arr, x, squeeze = _logits_2d("logits", logits)
    n = x.shape[0]
    t = _prob_target(target, arr.shape, x.dtype)
    loss = np.empty(n, dtype=np.float64)
    k = cuda or cpu
    if with_grad:
        grad = np.empty_like(x)
        k.kl_divergence_fwd_grad(x, t, _grad_scale(reduction, n), loss, grad)
    else:
        k.kl_divergence_fwd(x, t, loss)
    out = _finish_loss(loss, reduction, n, arr.dtype, () if squeeze else (n,))
    if not with_grad:
        return out
    return out, grad.reshape(arr.shape).astype(arr.dtype, copy=False)


def kl_divergence(logits, target, *, reduction: str = "mean", backend: str = "cpu"):
    """KL(target || softmax(logits)) per row: sum_c p_c log(p_c / q_c), with 0 log 0 = 0.

    "mean" averages over rows (torch's ``kl_div(..., reduction="batchmean")``; torch's own "mean"
    averages over elements). Together with :func:`entropy` it decomposes the cross-entropy:
    ``cross_entropy(z, p, reduction="none") == entropy(p) + kl_divergence(z, p, reduction="none")``
    within a few ulp (H(p, q) = H(p) + KL(p || q)).

    KL is ill-conditioned where p is close to q: there its relative error is bounded by the
    condition number times the unit roundoff, not by a few ulp.
    """
    return _kl(logits, target, reduction, backend, with_grad=False)


def kl_divergence_with_grad(logits, target, *, reduction: str = "mean", backend: str = "cpu"):
    """Fused :func:`kl_divergence` and its gradient (sum(p) q_j - p_j, scaled by the reduction)."""
    return _kl(logits, target, reduction, backend, with_grad=True)


def entropy(p, *, reduction: str = "none"):
    """Shannon entropy H(p) = -sum_c p_c log p_c (nats) over the last axis, 0 log 0 = 0.

    Args:
        p: (N, C) or (C,) non-negative floating array (rows need not be normalised).
        reduction: "none" (default), "mean" or "sum" over rows.
    """
    _check_choice("reduction", reduction, REDUCTIONS)
    arr, x, squeeze = _logits_2d("p", p)
    if np.any(x < 0):
        raise ValueError("p must be non-negative; got a negative entry")
    out = np.empty(x.shape[0], dtype=np.float64)
    cpu.entropy_fwd(x, out)
    return _finish_loss(out, reduction, x.shape[0], arr.dtype, () if squeeze else (x.shape[0],))


# --------------------------------------------------------------------------------------------
# Binary cross-entropy
# --------------------------------------------------------------------------------------------
def _elementwise_inputs(logits, target):
    arr = _as_float_array("logits", logits)
    tgt = _as_float_array("target", target)
    if tgt.shape != arr.shape:
        raise ValueError(f"target must have the logits' shape {arr.shape}; got shape {tgt.shape}")
    work = dtypes.working_dtype(arr.dtype)
    shape2 = _shape_2d(arr.shape)
    x = np.ascontiguousarray(arr.reshape(shape2), dtype=work)
    t = np.ascontiguousarray(tgt.reshape(shape2), dtype=work)
    return arr, x, t


def _bce_logits(logits, target, weight, pos_weight, reduction, backend, with_grad):
    dev = _device_call("bce_logits", logits, target, backend, with_grad, reduction,
                       weight=weight, pos_weight=pos_weight)
    if dev is not None:
        return dev
    _check_choice("reduction", reduction, REDUCTIONS)
    cuda = _check_backend(backend)
    arr, x, t = _elementwise_inputs(logits, target)
    w = _elementwise_weights("weight", weight, arr.shape)
    pw = _elementwise_weights("pos_weight", pos_weight, arr.shape)
    loss = np.empty(x.shape, dtype=np.float64)
    k = cuda or (cpu_fast if x.dtype == np.float32 else cpu)
    if k is cpu_fast:
        w, pw = _contiguous_rows(w), _contiguous_rows(pw)
    if with_grad:
        grad = np.empty_like(x)
        k.bce_with_logits_fwd_grad(x, t, w, pw, _grad_scale(reduction, arr.size), loss, grad)
    else:
        k.bce_with_logits_fwd(x, t, w, pw, loss)
    out = _finish_loss(loss, reduction, arr.size, arr.dtype, arr.shape)
    if not with_grad:
        return out
    return out, grad.reshape(arr.shape).astype(arr.dtype, copy=False)


def binary_cross_entropy_with_logits(logits, target, *, weight=None, pos_weight=None,
                                     reduction: str = "mean", backend: str = "cpu"):
    """Binary cross-entropy on logits, ``torch.nn.functional.binary_cross_entropy_with_logits``.

    loss = w [pw t softplus(-x) + (1 - t) softplus(x)],  softplus(x) = max(x, 0) + log1p(e^-|x|).

    Both terms are non-negative for t in [0, 1], so the loss keeps full relative accuracy: at
    x = 18, t = 1 in float32 it returns 1.523e-8, where ``-log(sigmoid(x))`` gives 0 and torch's
    BCELoss on probabilities gives 100. ``weight`` broadcasts to the logits' shape,
    ``pos_weight`` too (usually shape (C,)). Any shape is accepted; "mean" averages all elements.
    """
    return _bce_logits(logits, target, weight, pos_weight, reduction, backend, with_grad=False)


def binary_cross_entropy_with_logits_with_grad(logits, target, *, weight=None, pos_weight=None,
                                               reduction: str = "mean", backend: str = "cpu"):
    """Fused BCE with logits and its gradient w [(1 - t) sigmoid(x) - pw t sigmoid(-x)]."""
    return _bce_logits(logits, target, weight, pos_weight, reduction, backend, with_grad=True)


def binary_cross_entropy(probs, target, *, weight=None, reduction: str = "mean"):
    """Binary cross-entropy on probabilities, ``torch.nn.functional.binary_cross_entropy``.

    loss = -w [t max(log p, -100) + (1 - t) max(log(1 - p), -100)].

    The clamp of each log at -100 is torch's formulation choice, kept here so results match: it
    keeps the loss finite at p = 0 or 1 but caps it at 100 and biases it wherever p rounds to 0 or
    1 (in float32 sigmoid(18) rounds to 1, so a true loss of 1.5e-8 becomes 100 on the wrong
    side). Prefer :func:`binary_cross_entropy_with_logits` when logits are available.
    """
    _check_choice("reduction", reduction, REDUCTIONS)
    arr = _as_float_array("probs", probs)
    tgt = _as_float_array("target", target)
    if tgt.shape != arr.shape:
        raise ValueError(f"target must have the shape of probs {arr.shape}; got {tgt.shape}")
    p = np.asarray(arr, dtype=np.float64)
    if np.any((p < 0) | (p > 1)):
        raise ValueError("probs must lie in [0, 1] (torch raises for values outside)")
    t = np.asarray(tgt, dtype=np.float64)
    w = np.broadcast_to(np.asarray(_elementwise_weights("weight", weight, arr.shape)),
                        _shape_2d(arr.shape)).reshape(arr.shape)
    # The probabilities are first rounded in the working precision, as torch computes them.
    work = dtypes.working_dtype(arr.dtype)
    p = p.astype(work).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_p = np.maximum(np.log(p), -100.0)
        log_1mp = np.maximum(np.log1p(-p), -100.0)
        loss = -w * (t * log_p + (1.0 - t) * log_1mp)
    return _finish_loss(np.asarray(loss, dtype=np.float64), reduction, arr.size, arr.dtype,
                        arr.shape)


# --------------------------------------------------------------------------------------------
# Focal losses
# --------------------------------------------------------------------------------------------
def _softmax_focal(logits, target, gamma, weight, ignore_index, reduction, backend, with_grad):
    dev = _device_call("focal_softmax", logits, target, backend, with_grad, reduction,
                       weight=weight, ignore_index=int(ignore_index), gamma=float(gamma))
    if dev is not None:
        return dev
    _check_choice("reduction", reduction, REDUCTIONS)
    cuda = _check_backend(backend)
    gamma = float(gamma)
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0; got {gamma!r}")
    arr, x, squeeze = _logits_2d("logits", logits)
    n, c = x.shape
    w = _class_weight(weight, c)
    t = _index_target(target, n, c, int(ignore_index), squeeze)
    denom = _index_denominator(t, w, ignore_index)
    loss = np.empty(n, dtype=np.float64)
    k = cuda or cpu
    if with_grad:
        grad = np.empty_like(x)
        k.softmax_focal_fwd_grad(x, t, w, int(ignore_index), gamma,
                                 _grad_scale(reduction, denom), loss, grad)
    else:
        k.softmax_focal_fwd(x, t, w, int(ignore_index), gamma, loss)
    out = _finish_loss(loss, reduction, denom, arr.dtype, () if squeeze else (n,))
    if not with_grad:
        return out
    return out, grad.reshape(arr.shape).astype(arr.dtype, copy=False)


def softmax_focal_loss(logits, target, *, gamma: float = 2.0, weight=None,
                       ignore_index: int = -100, reduction: str = "mean", backend: str = "cpu"):
    """Multiclass focal loss (Lin et al. 2017, "Focal loss for dense object detection"):

        FL_i = -w_y (1 - p_y)^gamma log p_y,   p = softmax(logits_i).

    1 - p_y is computed as sum_{j != y} p_j, so it keeps relative accuracy on confident rows
    (where ``1 - p_y`` rounds to 0 and the loss would vanish). "mean" is the weighted mean over
    non-ignored rows, as for :func:`cross_entropy`; gamma = 0 gives cross_entropy.
    """
    return _softmax_focal(logits, target, gamma, weight, ignore_index, reduction, backend, False)


def softmax_focal_loss_with_grad(logits, target, *, gamma: float = 2.0, weight=None,
                                 ignore_index: int = -100, reduction: str = "mean",
                                 backend: str = "cpu"):
    """Fused :func:`softmax_focal_loss` and its gradient:
    d FL / d x_j = w_y (p_j - [j == y]) (1 - p_y)^(gamma - 1) (gamma (-log p_y) p_y + 1 - p_y)."""
    return _softmax_focal(logits, target, gamma, weight, ignore_index, reduction, backend, True)


def _sigmoid_focal(logits, target, alpha, gamma, reduction, backend, with_grad):
    dev = _device_call("sigmoid_focal", logits, target, backend, with_grad, reduction,
                       alpha=float(alpha), gamma=float(gamma))
    if dev is not None:
        return dev
    _check_choice("reduction", reduction, REDUCTIONS)
    cuda = _check_backend(backend)
    gamma = float(gamma)
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0; got {gamma!r}")
    alpha = float(alpha)
    if alpha > 1:
        raise ValueError(f"alpha must be <= 1 (a negative alpha disables it); got {alpha!r}")
    arr, x, t = _elementwise_inputs(logits, target)
    loss = np.empty(x.shape, dtype=np.float64)
    k = cuda or cpu
    if with_grad:
        grad = np.empty_like(x)
        k.sigmoid_focal_fwd_grad(x, t, alpha, gamma, _grad_scale(reduction, arr.size), loss, grad)
    else:
        k.sigmoid_focal_fwd(x, t, alpha, gamma, loss)
    out = _finish_loss(loss, reduction, arr.size, arr.dtype, arr.shape)
    if not with_grad:
        return out
    return out, grad.reshape(arr.shape).astype(arr.dtype, copy=False)


def sigmoid_focal_loss(logits, target, *, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "none", backend: str = "cpu"):
    """Sigmoid focal loss, ``torchvision.ops.sigmoid_focal_loss`` semantics:

        loss = alpha_t * BCE_with_logits(x, t) * (1 - p_t)^gamma,
        p_t = p t + (1 - p)(1 - t),  alpha_t = alpha t + (1 - alpha)(1 - t) (alpha < 0: off).

    1 - p_t is computed as t sigmoid(-x) + (1 - t) sigmoid(x), without cancellation.
    """
    return _sigmoid_focal(logits, target, alpha, gamma, reduction, backend, False)


def sigmoid_focal_loss_with_grad(logits, target, *, alpha: float = 0.25, gamma: float = 2.0,
                                 reduction: str = "none", backend: str = "cpu"):
    """Fused :func:`sigmoid_focal_loss` and its gradient."""
    return _sigmoid_focal(logits, target, alpha, gamma, reduction, backend, True)


# --------------------------------------------------------------------------------------------
# logsumexp, log_softmax, softmax
# --------------------------------------------------------------------------------------------
def _rowwise(logits, kernel_name, per_row):
    arr = _as_float_array("logits", logits)
    if arr.ndim == 0:
        raise ValueError("logits must have at least one axis")
    work = dtypes.working_dtype(arr.dtype)
    x = np.ascontiguousarray(arr.reshape(-1, arr.shape[-1]) if arr.shape[-1] else
                             arr.reshape(-1, 0), dtype=work)
    if per_row:
        out = np.empty(x.shape[0], dtype=np.float64)
        getattr(cpu, kernel_name)(x, out)
        return out.reshape(arr.shape[:-1]).astype(arr.dtype)
    out = np.empty(x.shape, dtype=np.float64)
    getattr(cpu, kernel_name)(x, out)
    return out.reshape(arr.shape).astype(arr.dtype)


def logsumexp(logits):
    """log(sum_j exp(x_j)) over the last axis, as m + log1p(sum_{j != k} exp(x_j - m))
    (Blanchard, Higham & Higham 2021); the form scipy.special.logsumexp also uses."""
    return _rowwise(logits, "logsumexp_rows", per_row=True)


def log_softmax(logits):
    """x_j - logsumexp(x) over the last axis, with x_j - m in double-double."""
    return _rowwise(logits, "log_softmax_rows", per_row=False)


def softmax(logits):
    """exp(x_j - m) / (1 + sum_{j != k} exp(x_j - m)) over the last axis (softmax by division)."""
    return _rowwise(logits, "softmax_rows", per_row=False)


__all__ = [
    "cross_entropy", "cross_entropy_with_grad", "binary_cross_entropy_with_logits",
    "binary_cross_entropy_with_logits_with_grad", "binary_cross_entropy", "kl_divergence",
    "kl_divergence_with_grad", "entropy", "softmax_focal_loss", "softmax_focal_loss_with_grad",
    "sigmoid_focal_loss", "sigmoid_focal_loss_with_grad", "logsumexp", "log_softmax", "softmax",
]
