"""cestudy for torch users: ``torch.nn.functional``-style functions and ``torch.nn`` Modules whose
values and gradients come from cestudy's fused kernels (``cestudy.losses``).

This module holds the torch glue only: tensors in, tensors out, and a ``torch.autograd.Function``
around each fused ``<name>_with_grad`` function. It holds no formula and no argument check that
``cestudy.dispatch`` already makes. Import it by name (``import cestudy.torch``): ``import cestudy``
never imports torch, which stays an optional dependency.

Signatures, defaults, shapes ((N, C), (C,), (N, C, d1, ..., dk); any shape for the element-wise
losses) and reductions are torch's, legacy ``size_average`` / ``reduce`` included:

=====================================  ==============================================  ==========
here                                   torch                                           kernel
=====================================  ==============================================  ==========
cross_entropy, CrossEntropyLoss        torch.nn.functional.cross_entropy,               CPU, CUDA
                                       torch.nn.CrossEntropyLoss
binary_cross_entropy_with_logits,      ...binary_cross_entropy_with_logits,             CPU, CUDA
BCEWithLogitsLoss                      torch.nn.BCEWithLogitsLoss
nll_loss, NLLLoss                      ...nll_loss, torch.nn.NLLLoss                    CPU
kl_div, KLDivLoss                      ...kl_div, torch.nn.KLDivLoss                    CPU
sigmoid_focal_loss, SigmoidFocalLoss   torchvision.ops.sigmoid_focal_loss               CPU, CUDA
softmax_focal_loss, SoftmaxFocalLoss   (none; Lin et al.'s multiclass focal loss)       CPU, CUDA
=====================================  ==============================================  ==========

How tensors reach the kernels:

- CPU tensors are handed over as numpy views of their memory (``tensor.detach().numpy()``, no
  copy), and the results come back through ``torch.from_numpy`` (no copy). bfloat16 tensors have
  no numpy dtype: their bits are viewed as int16 and then as ``ml_dtypes.bfloat16`` (two views,
  no copy, no float32 tensor); the kernels compute float16 and bfloat16 in float32 and round once
  to the input dtype, as for any cestudy input.
- CUDA tensors go to ``backend="cuda"`` as they are: numba reads them through
  ``__cuda_array_interface__`` without a copy, and the device arrays it returns are wrapped by
  ``torch.as_tensor`` without a copy. The CUDA kernels take float32 and float64, so float16 and
  bfloat16 CUDA tensors are widened to float32 on the device first (one copy) and the results
  rounded back. Element-wise ``weight`` / ``pos_weight`` are expanded to a dense float64 tensor of
  the input's shape on the device (the CUDA kernels' calling convention). The kernels run on
  the tensors' GPU (``numba.cuda.gpus[index]``), on numba's default stream. numba synchronises
  the stream a tensor names in its ``__cuda_array_interface__`` (torch's current stream) when it
  imports it, a host wait per tensor (``NUMBA_CUDA_ARRAY_INTERFACE_SYNC=0`` turns it off); when
  torch's current stream is not its default stream, the two streams also wait for each other
  through events, before the kernels and after them. ``nll_loss`` and ``kl_div`` have no CUDA
  kernel: CUDA tensors are copied to the host and back (with a warning). No GPU was available
  where this module was written: the CUDA route is tested in numba's CUDA simulator with the
  tensor hand-over replaced by host copies (``tests/test_torch_module.py``); the
  ``__cuda_array_interface__`` hand-over itself, the device choice and the stream handling are
  untested.

Gradients: when the input requires a gradient (and grad mode is on), the forward pass runs the
fused kernel, which writes the loss and its gradient in one pass, and saves the gradient (one
tensor of the input's size, as Liger-Kernel does). The backward pass multiplies it by the upstream
gradient: a scalar for reductions "mean", "sum" and "batchmean". For reduction="none" the saved
gradient is that of the sum of the losses; its row i (losses with one value per row of classes)
or element i (element-wise losses) depends on loss i alone, so multiplying row i (element i) by
grad_output[i] gives the gradient of sum_i grad_output[i] loss_i exactly. For float16 and
bfloat16 that product is one more rounding. Gradients flow to ``input`` only: a target or weight
that requires a gradient raises (pass ``.detach()``), and so does a backward pass with
``create_graph=True``: the gradient is the kernel's, with no graph of its own to differentiate
(``torch.autograd.function.once_differentiable`` alone would return it silently as a constant
when the upstream gradient needs no gradient, as in a gradient penalty).

Example:
    >>> import torch, cestudy.torch as ct
    >>> x = torch.tensor([[40.0, 0.0, -3.0], [1.0, 2.0, 0.5]], requires_grad=True)
    >>> loss = ct.cross_entropy(x, torch.tensor([0, 2]))
    >>> loss.backward()
    >>> x.grad[0, 0].item()        # -(1 - p_0) / 2: torch's own softmax - onehot gives 0
    -2.229...e-18
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Optional

import ml_dtypes
import numpy as np

try:
    import torch
except ImportError as exc:  # pragma: no cover - torch is installed wherever the tests run
    raise ImportError(
        "cestudy.torch needs PyTorch (pip install torch); the rest of cestudy does not"
    ) from exc
from torch.autograd.function import once_differentiable

from . import dtypes, losses, variants

__all__ = [
    "cross_entropy",
    "CrossEntropyLoss",
    "binary_cross_entropy_with_logits",
    "BCEWithLogitsLoss",
    "softmax_focal_loss",
    "SoftmaxFocalLoss",
    "sigmoid_focal_loss",
    "SigmoidFocalLoss",
    "kl_div",
    "KLDivLoss",
    "nll_loss",
    "NLLLoss",
]

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# from the registry: one value per element (any shape) or one per row of classes (class axis 1),
# and whether a CUDA kernel exists (every variant of a function agrees on both)
_ELEMENTWISE = {v.function: v.elementwise for v in variants.VARIANTS.values()}
_HAS_CUDA = {v.function: v.cuda for v in variants.VARIANTS.values()}


# --------------------------------------------------------------------------------------------
# Tensors <-> arrays
# --------------------------------------------------------------------------------------------
def _numpy_view(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy array sharing its memory (bfloat16 through ml_dtypes)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _from_numpy(a: Any) -> torch.Tensor:
    """A numpy array (or scalar) as a CPU tensor sharing its memory (bfloat16 through int16)."""
    a = np.asarray(a)
    if a.dtype == dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


# The CUDA hand-over, as three functions so that the simulator tests can stand in host copies
# (numba's CUDA simulator cannot read torch CUDA tensors, and there are none without a GPU).
def _is_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda


def _to_cuda_array(t: torch.Tensor) -> Any:
    """What ``backend="cuda"`` reads: the tensor itself (numba views it through
    ``__cuda_array_interface__``, which torch refuses for tensors that require grad)."""
    return t.detach()


def _from_cuda_array(a: Any, device: torch.device) -> torch.Tensor:
    """A numba device array as a CUDA tensor sharing its memory (``__cuda_array_interface__``)."""
    return torch.as_tensor(a, device=device)


@contextlib.contextmanager
def _on_device(device: torch.device):
    """Run numba's kernels on the tensors' GPU, ordered with torch's current stream: numba's
    default stream waits for torch's current stream before the kernels, and torch's current
    stream for numba's after them, when the two differ (events, no host wait)."""
    if device.type != "cuda":
        yield
        return
    from numba import cuda

    current = torch.cuda.current_stream(device)
    default = torch.cuda.default_stream(device)
    if current != default:
        default.wait_stream(current)
    with cuda.gpus[device.index if device.index is not None else torch.cuda.current_device()]:
        yield
    if current != default:
        current.wait_stream(default)


# --------------------------------------------------------------------------------------------
# Argument checks that only the torch side can make
# --------------------------------------------------------------------------------------------
def _check_input(function: str, input: Any) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor; got {type(input).__name__}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"input must be a floating-point tensor (float64, float32, float16 or "
            f"bfloat16); got {input.dtype}"
        )
    if not _ELEMENTWISE[function]:
        if input.dim() == 0:
            raise ValueError(
                "input must have a class axis: shape (C,), (N, C) or "
                "(N, C, d1, ..., dk); got a 0-d tensor"
            )
    if input.device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"input is on device {input.device}; cestudy.torch takes CPU and CUDA tensors"
        )


def _check_companion(name: str, t: Any, input: torch.Tensor) -> None:
    """A target or weight tensor: on the input's device, and not asking for a gradient."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.device != input.device:
        raise ValueError(
            f"{name} is on device {t.device} but input is on {input.device}; "
            f"move them to one device"
        )
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{name} requires a gradient, but cestudy.torch computes gradients "
            f"with respect to input only; pass {name}.detach()"
        )


def _legacy_reduction(size_average: Optional[bool], reduce: Optional[bool], reduction: str) -> str:
    """torch's reading of the deprecated ``size_average`` / ``reduce`` arguments (they win over
    ``reduction`` when given, with torch's warning)."""
    if size_average is None and reduce is None:
        return reduction
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    ret = "mean" if size_average and reduce else "sum" if reduce else "none"
    warnings.warn(
        f"size_average and reduce args will be deprecated, please use reduction='{ret}' instead.",
        UserWarning,
        stacklevel=3,
    )
    return ret


# --------------------------------------------------------------------------------------------
# Computing: CPU through numpy views, CUDA through device arrays
# --------------------------------------------------------------------------------------------
def _compute(
    function: str,
    input: torch.Tensor,
    target: torch.Tensor,
    reduction: str,
    with_grad: bool,
    options: dict,
):
    """(loss, grad or None) as tensors on the input's device, in torch's layout."""
    if _is_cuda(input):
        if _HAS_CUDA[function]:
            return _compute_cuda(function, input, target, reduction, with_grad, options)
        warnings.warn(
            f"cestudy has no CUDA kernel for {function}: CUDA tensors are copied to "
            f"the host and back",
            UserWarning,
            stacklevel=4,
        )
        host = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in options.items()}
        loss, grad = _compute_cpu(
            function, input.detach().cpu(), target.detach().cpu(), reduction, with_grad, host
        )
        return loss.to(input.device), None if grad is None else grad.to(input.device)
    return _compute_cpu(function, input, target, reduction, with_grad, options)


def _call(function: str, with_grad: bool, x, t, reduction: str, options: dict, **kw):
    if with_grad:
        return getattr(losses, function + "_with_grad")(x, t, reduction=reduction, **options, **kw)
    return getattr(losses, function)(x, t, reduction=reduction, **options, **kw), None


def _compute_cpu(function, input, target, reduction, with_grad, options):
    opts = {k: _numpy_view(v) if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    loss, grad = _call(
        function, with_grad, _numpy_view(input), _numpy_view(target), reduction, opts
    )
    return _from_numpy(loss), None if grad is None else _from_numpy(grad)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(C,), (N, C) or (N, C, d1, ..., dk) as contiguous (rows, C): dispatch.class_rows' layout."""
    if t.dim() == 1:
        return t.reshape(1, -1).contiguous()
    if t.dim() == 2:
        return t.contiguous()
    return t.movedim(1, -1).reshape(-1, t.shape[1]).contiguous()


def _compute_cuda(function, input, target, reduction, with_grad, options):
    shape = tuple(input.shape)
    work = input.detach()
    if work.dtype not in (torch.float32, torch.float64):
        work = work.float()  # the CUDA kernels take float32 and float64
    opts = dict(options)
    if _ELEMENTWISE[function]:
        s2 = (1, 1) if not shape else (int(np.prod(shape[:-1], dtype=np.int64)), shape[-1])
        if tuple(target.shape) != shape:
            raise ValueError(
                f"target must have the shape of input {shape}; got shape {tuple(target.shape)}"
            )
        x = work.reshape(s2).contiguous()
        t = target.detach().to(work.dtype).reshape(s2).contiguous()
        for key in ("weight", "pos_weight"):
            w = opts.get(key)
            if w is not None:
                try:
                    w = torch.broadcast_to(w.detach().to(torch.float64), shape)
                except RuntimeError:
                    raise ValueError(
                        f"{key} of shape {tuple(w.shape)} cannot be broadcast to "
                        f"the input's shape {shape}"
                    ) from None
                opts[key] = _to_cuda_array(w.reshape(s2).contiguous())
    else:
        n_classes = shape[0] if len(shape) == 1 else shape[1]
        x = _rows(work)
        if target.dtype.is_floating_point:
            if tuple(target.shape) != shape:
                raise ValueError(
                    f"target of probabilities must have the input's shape {shape}; "
                    f"got shape {tuple(target.shape)}"
                )
            t = _rows(target.detach().to(work.dtype))
        else:
            lead = () if len(shape) == 1 else (shape[0],) + shape[2:]
            if tuple(target.shape) != lead or target.dtype in (
                torch.bool,
                torch.complex64,
                torch.complex128,
            ):
                raise ValueError(
                    f"target of class indices must be an integer tensor of shape "
                    f"{lead} to match input; got {target.dtype} of shape "
                    f"{tuple(target.shape)}"
                )
            t = target.detach().reshape(-1).to(torch.int64).contiguous()
        w = opts.get("weight")
        if w is not None:
            if tuple(w.shape) != (n_classes,):
                raise ValueError(
                    f"weight must have shape ({n_classes},) (one entry per class); "
                    f"got shape {tuple(w.shape)}"
                )
            opts["weight"] = _to_cuda_array(w.detach().to(torch.float64).contiguous())
    with _on_device(input.device):
        loss, grad = _call(
            function,
            with_grad,
            _to_cuda_array(x),
            _to_cuda_array(t),
            reduction,
            opts,
            backend="cuda",
        )
    loss = _from_cuda_array(loss, input.device)
    if reduction == "none":
        loss_shape = (
            shape
            if _ELEMENTWISE[function]
            else (() if len(shape) == 1 else (shape[0],) + shape[2:])
        )
        loss = loss.reshape(loss_shape)
    else:
        loss = loss.reshape(())
    loss = loss.to(input.dtype)
    if grad is not None:
        grad = _from_cuda_array(grad, input.device)
        if _ELEMENTWISE[function] or len(shape) <= 2:
            grad = grad.reshape(shape)
        else:
            grad = grad.reshape((shape[0],) + shape[2:] + (shape[1],)).movedim(-1, 1)
        grad = grad.to(input.dtype)
    return loss, grad


# --------------------------------------------------------------------------------------------
# The autograd Function
# --------------------------------------------------------------------------------------------
class _FusedLoss(torch.autograd.Function):
    """Forward: the fused kernel's loss, its gradient saved. Backward: that gradient times the
    upstream gradient (a scalar, or row / element scales for reduction="none")."""

    @staticmethod
    def forward(ctx, input, target, function, reduction, options):
        loss, grad = _compute(function, input, target, reduction, True, options)
        ctx.save_for_backward(grad)
        ctx.function = function
        ctx.reduction = reduction
        ctx.input_dim = input.dim()
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            # create_graph=True. torch's once_differentiable would stay silent here when
            # grad_output does not require grad (a gradient penalty: its grad_output is ones):
            # the gradient would come back without a graph and be treated as a constant.
            raise RuntimeError(
                f"cestudy.torch.{ctx.function} does not support double backward "
                f"(create_graph=True): its gradient comes from a fused kernel, not from "
                f"differentiable torch operations; use torch's own loss for higher-order "
                f"gradients"
            )
        return _FusedLoss._first_order(ctx, grad_output)

    @staticmethod
    @once_differentiable
    def _first_order(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none" and not _ELEMENTWISE[ctx.function]:
            # loss_i is a row's: grad_output (N, d1, ..., dk) scales the class axis's rows
            grad_output = grad_output.unsqueeze(0 if ctx.input_dim == 1 else 1)
        return grad * grad_output, None, None, None, None


def _apply(function: str, input: Any, target: Any, reduction: str, **options) -> torch.Tensor:
    _check_input(function, input)
    _check_companion("target", target, input)
    for key in ("weight", "pos_weight"):
        _check_companion(key, options.get(key), input)
    if input.requires_grad and torch.is_grad_enabled():
        return _FusedLoss.apply(input, target, function, reduction, options)
    return _compute(function, input, target, reduction, False, options)[0]


# --------------------------------------------------------------------------------------------
# Functions
# --------------------------------------------------------------------------------------------
def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``torch.nn.functional.cross_entropy`` computed by :func:`cestudy.cross_entropy` (class
    indices or probabilities as targets, (C,), (N, C) or (N, C, d1, ..., dk) input).

    Example:
        >>> import torch, cestudy.torch as ct
        >>> x = torch.tensor([[100.0, 0.0, -5.0]])
        >>> ct.cross_entropy(x, torch.tensor([0])).item()    # torch.nn.functional gives 0.0
        3.78...e-44
    """
    reduction = _legacy_reduction(size_average, reduce, reduction)
    return _apply(
        "cross_entropy",
        input,
        target,
        reduction,
        weight=weight,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )


def binary_cross_entropy_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    size_average: Optional[bool] = None,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    pos_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``torch.nn.functional.binary_cross_entropy_with_logits`` computed by
    :func:`cestudy.binary_cross_entropy_with_logits` (any shape; ``weight`` and ``pos_weight``
    broadcast to the input's shape).

    Example:
        >>> import torch, cestudy.torch as ct
        >>> ct.binary_cross_entropy_with_logits(torch.tensor([18.0]), torch.tensor([1.0])).item()
        1.522997...e-08
    """
    reduction = _legacy_reduction(size_average, reduce, reduction)
    return _apply(
        "binary_cross_entropy_with_logits",
        input,
        target,
        reduction,
        weight=weight,
        pos_weight=pos_weight,
    )


def nll_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """``torch.nn.functional.nll_loss`` (input holds log-probabilities) computed by
    :func:`cestudy.nll_loss`.

    Example:
        >>> import torch, cestudy.torch as ct
        >>> ct.nll_loss(torch.tensor([[-0.5, -2.0]]), torch.tensor([1])).item()
        2.0
    """
    reduction = _legacy_reduction(size_average, reduce, reduction)
    return _apply("nll_loss", input, target, reduction, weight=weight, ignore_index=ignore_index)


def kl_div(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average: Optional[bool] = None,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    log_target: bool = False,
) -> torch.Tensor:
    """``torch.nn.functional.kl_div`` (input holds log-probabilities; "batchmean" divides by the
    batch size, "mean" by the element count, with torch's warning) computed by
    :func:`cestudy.kl_div`.

    Example:
        >>> import torch, cestudy.torch as ct
        >>> p = torch.tensor([[0.5, 0.5]])
        >>> ct.kl_div(torch.log(torch.tensor([[0.25, 0.75]])), p, reduction="batchmean").item()
        0.1438...
    """
    reduction = _legacy_reduction(size_average, reduce, reduction)
    return _apply("kl_div", input, target, reduction, log_target=log_target)


def softmax_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """The multiclass focal loss ``-w_y (1 - p_y)^gamma log p_y`` computed by
    :func:`cestudy.softmax_focal_loss` ("mean": the weighted mean over non-ignored targets, as
    for :func:`cross_entropy`; gamma = 0 is cross-entropy).

    Example:
        >>> import torch, cestudy.torch as ct
        >>> round(ct.softmax_focal_loss(torch.zeros(1, 2), torch.tensor([0])).item(), 6)
        0.173287
    """
    return _apply(
        "softmax_focal_loss",
        input,
        target,
        reduction,
        gamma=gamma,
        weight=weight,
        ignore_index=ignore_index,
    )


def sigmoid_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> torch.Tensor:
    """``torchvision.ops.sigmoid_focal_loss`` (same signature and defaults, reduction="none"
    included) computed by :func:`cestudy.sigmoid_focal_loss`.

    Example:
        >>> import torch, cestudy.torch as ct
        >>> round(ct.sigmoid_focal_loss(torch.tensor([0.0]), torch.tensor([1.0])).item(), 6)
        0.043322
    """
    return _apply("sigmoid_focal_loss", input, target, reduction, alpha=alpha, gamma=gamma)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------
class _LossModule(torch.nn.Module):
    """A loss Module: keeps its function's arguments (tensors as buffers, so that
    ``.to(device)`` moves them) and hands them to the function in ``forward``."""

    _function: Any  # staticmethod(the function) in each subclass

    def __init__(self, buffers: dict, **arguments: Any) -> None:
        super().__init__()
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor)
        for name, value in arguments.items():
            setattr(self, name, value)
        self._arguments = tuple(buffers) + tuple(arguments)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._function(
            input, target, **{name: getattr(self, name) for name in self._arguments}
        )


class CrossEntropyLoss(_LossModule):
    """``torch.nn.CrossEntropyLoss`` computed by cestudy (see :func:`cross_entropy`); ``weight``
    is a buffer, so ``.to(device)`` moves it."""

    _function = staticmethod(cross_entropy)

    def __init__(
        self,
        weight: Optional[torch.Tensor] = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(
            {"weight": weight},
            ignore_index=ignore_index,
            reduction=_legacy_reduction(size_average, reduce, reduction),
            label_smoothing=label_smoothing,
        )


class BCEWithLogitsLoss(_LossModule):
    """``torch.nn.BCEWithLogitsLoss`` computed by cestudy (see
    :func:`binary_cross_entropy_with_logits`); ``weight`` and ``pos_weight`` are buffers."""

    _function = staticmethod(binary_cross_entropy_with_logits)

    def __init__(
        self,
        weight: Optional[torch.Tensor] = None,
        size_average=None,
        reduce=None,
        reduction: str = "mean",
        pos_weight: Optional[torch.Tensor] = None,
    ) -> None:
        super().__init__(
            {"weight": weight, "pos_weight": pos_weight},
            reduction=_legacy_reduction(size_average, reduce, reduction),
        )


class NLLLoss(_LossModule):
    """``torch.nn.NLLLoss`` computed by cestudy (see :func:`nll_loss`)."""

    _function = staticmethod(nll_loss)

    def __init__(
        self,
        weight: Optional[torch.Tensor] = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(
            {"weight": weight},
            ignore_index=ignore_index,
            reduction=_legacy_reduction(size_average, reduce, reduction),
        )


class KLDivLoss(_LossModule):
    """``torch.nn.KLDivLoss`` computed by cestudy (see :func:`kl_div`)."""

    _function = staticmethod(kl_div)

    def __init__(
        self, size_average=None, reduce=None, reduction: str = "mean", log_target: bool = False
    ) -> None:
        super().__init__(
            {},
            reduction=_legacy_reduction(size_average, reduce, reduction),
            log_target=log_target,
        )


class SoftmaxFocalLoss(_LossModule):
    """The multiclass focal loss as a Module (see :func:`softmax_focal_loss`)."""

    _function = staticmethod(softmax_focal_loss)

    def __init__(
        self,
        gamma: float = 2.0,
        weight: Optional[torch.Tensor] = None,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__(
            {"weight": weight}, gamma=gamma, ignore_index=ignore_index, reduction=reduction
        )


class SigmoidFocalLoss(_LossModule):
    """torchvision's sigmoid focal loss as a Module (see :func:`sigmoid_focal_loss`; the default
    reduction is torchvision's "none")."""

    _function = staticmethod(sigmoid_focal_loss)

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none") -> None:
        super().__init__({}, alpha=alpha, gamma=gamma, reduction=reduction)
