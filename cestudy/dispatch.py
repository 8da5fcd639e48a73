"""Dispatch: argument checks, kernel choice and reductions between the public functions and
the raw kernels.

This layer holds no numerical formula. For a variant of ``cestudy.variants`` it
- checks every argument, with errors that name the argument: for host arrays before any kernel
  runs (out-of-range targets and negative weights raise); for device arrays the kernels check
  the same conditions on the device, without a host synchronisation: a bad row gets a NaN loss
  and is counted, never read out of bounds, and ``cestudy.kernels.cuda.raise_device_errors()``
  raises the error (at once on every call with ``CESTUDY_CUDA_CHECKS=sync``);
- converts host inputs to the working dtype (float16 and bfloat16 are computed in float32);
- picks the kernel: ``cestudy.kernels.cpu_fast`` (float32 and float64) where the variant has
  one, else ``cestudy.kernels.cpu``, or ``cestudy.kernels.cuda`` for ``backend="cuda"``;
- reduces the per-sample losses ("mean" is torch's: the weighted mean over non-ignored targets
  for class-index targets, the mean over rows for probability targets, over elements for
  element-wise losses) with a compensated sum, rounding once to the input dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal, NamedTuple

import numpy as np

from . import backends, buffers, dtypes, variants
from .kernels import cpu, cpu_fast

Reduction = Literal["none", "mean", "sum"]
Backend = Literal["cpu", "cuda"]
REDUCTIONS = ("none", "mean", "sum")
_INT64 = np.dtype(np.int64)
_FAST_DTYPES = frozenset((np.dtype(np.float32), np.dtype(np.float64)))
"""The working dtypes of ``cestudy.kernels.cpu_fast`` (a set of dtypes: a hash lookup)."""
BACKENDS = ("cpu", "cuda")


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------
def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def as_float_array(name: str, a: Any) -> np.ndarray:
    """np.asarray(a) checked to be of a supported floating dtype (no copy)."""
    arr = np.asarray(a)
    if not dtypes.is_float_dtype(arr.dtype):
        kind = {"i": "integer", "u": "integer", "b": "boolean", "c": "complex"}.get(
            arr.dtype.kind, str(arr.dtype)
        )
        raise TypeError(
            f"{name} must be a floating-point array (float64, float32, float16 or bfloat16); "
            f"got {kind} dtype {arr.dtype}"
        )
    return arr


def logits_2d(name: str, logits: Any) -> tuple[np.ndarray, np.ndarray, bool]:
    """Validate (N, C) or (C,) logits; return (array, 2-D working copy or view, squeezed)."""
    arr = as_float_array(name, logits)
    if arr.ndim not in (1, 2):
        raise ValueError(f"{name} must have shape (N, C) or (C,); got shape {arr.shape}")
    if arr.shape[-1] == 0:
        raise ValueError(
            f"{name} must have at least one class (last axis of length >= 1); got shape {arr.shape}"
        )
    work = dtypes.working_dtype(arr.dtype)
    x2 = np.ascontiguousarray(arr.reshape(1, -1) if arr.ndim == 1 else arr, dtype=work)
    return arr, x2, arr.ndim == 1


def class_rows(name: str, logits: Any) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Validate logits with classes on axis 1 ((N, C, d1, ..., dk), torch's layout) or axis 0
    ((C,)); return (array, (rows, C) working copy or view, the shape of one loss per row)."""
    if (
        type(logits) is np.ndarray
        and logits.ndim == 2
        and logits.dtype in _FAST_DTYPES
        and logits.shape[1] > 0
        and logits.flags.c_contiguous
    ):
        return logits, logits, logits.shape[:1]  # already the working layout: 0.2 us, not 0.8
    arr = as_float_array(name, logits)
    if arr.ndim == 0:
        raise ValueError(
            f"{name} must have a class axis: shape (C,), (N, C) or "
            f"(N, C, d1, ..., dk); got a 0-d array"
        )
    axis = 0 if arr.ndim == 1 else 1
    if arr.shape[axis] == 0:
        raise ValueError(
            f"{name} must have at least one class (axis {axis} of length >= 1); "
            f"got shape {arr.shape}"
        )
    work = dtypes.working_dtype(arr.dtype)
    if arr.ndim <= 2:
        lead = arr.shape[:-1]
        return arr, as_working(arr, (1, arr.shape[0]) if arr.ndim == 1 else arr.shape, work), lead
    lead = (arr.shape[0],) + arr.shape[2:]
    x2 = np.moveaxis(arr, 1, -1).reshape(-1, arr.shape[1])
    return arr, np.ascontiguousarray(x2, dtype=work), lead


def to_input_layout(g2: np.ndarray, arr: np.ndarray, elementwise: bool) -> np.ndarray:
    """A (rows, C) gradient back in the layout of ``arr`` (classes on axis 1 for K-d input)."""
    if elementwise or arr.ndim <= 2:
        return g2.reshape(arr.shape)
    return np.moveaxis(g2.reshape((arr.shape[0],) + arr.shape[2:] + (arr.shape[1],)), -1, 1)


def as_working(a: np.ndarray, shape: tuple[int, ...], work: np.dtype) -> np.ndarray:
    """``a`` as a C-contiguous array of ``shape`` and dtype ``work``: a view when it already is
    one (the common case, without np.ascontiguousarray's cost on a small call), else a copy."""
    if a.dtype == work and a.flags.c_contiguous:
        return a.reshape(shape)
    return np.ascontiguousarray(a.reshape(shape), dtype=work)


def shape_2d(shape: tuple[int, ...]) -> tuple[int, int]:
    """The (rows, last axis) view of an element-wise loss's input shape; () is (1, 1)."""
    shape = tuple(shape)  # device arrays of the CUDA simulator do not take negative indices
    if len(shape) == 2:
        return (int(shape[0]), int(shape[1]))
    if len(shape) == 0:
        return (1, 1)
    return (math.prod(int(d) for d in shape[:-1]), int(shape[len(shape) - 1]))


def class_weight(weight: Any, n_classes: int) -> np.ndarray:
    """A per-class weight vector as float64 contiguous (C,) (ones if None), checked."""
    if weight is None:
        return ones(n_classes)
    w = as_float_array("weight", weight)
    if w.ndim != 1 or w.shape[0] != n_classes:
        raise ValueError(
            f"weight must have shape ({n_classes},) (one entry per class); got shape {w.shape}"
        )
    w = np.ascontiguousarray(w, dtype=np.float64)
    _check_nonnegative("weight", w)
    return w


@functools.lru_cache(maxsize=32)
def ones(n: int) -> np.ndarray:
    """A float64 vector of n ones, made once per length: the weights of a call that gives none
    (the kernels only read their weights; a new array cost a tenth of a 256 x 10 call)."""
    return np.ones(n, dtype=np.float64)


@functools.lru_cache(maxsize=32)
def ones_row(n: int) -> np.ndarray:
    """:func:`ones` as one (1, n) row: the element-wise weights of a call that gives none."""
    return ones(n).reshape(1, n)


def _has_negative(a: np.ndarray) -> bool:
    """Whether ``a`` holds an entry < 0 (NaN is not): a reduction without the temporary of
    ``np.any(a < 0)``, which took a tenth of a 256 x 10 call."""
    if a.size == 0:
        return False
    low = a.min()
    # min is NaN when a NaN is present: then look at every entry
    return bool(low < 0 or (low != low and np.any(a < 0)))


def _check_nonnegative(name: str, w: np.ndarray) -> None:
    if _has_negative(w):
        bad = w < 0
        raise ValueError(
            f"{name} must be non-negative; got a negative entry at index "
            f"{int(np.flatnonzero(bad.reshape(-1))[0])}"
        )


def index_target(
    target: Any, expected: tuple[int, ...], n_classes: int, ignore_index: int
) -> np.ndarray:
    """Class indices of shape ``expected`` (the logits' shape without the class axis) as a flat
    int64 array, every one in [0, C) or equal to ``ignore_index``."""
    return _checked_indices(target, expected, n_classes, ignore_index)[0]


def _checked_indices(
    target: Any, expected: tuple[int, ...], n_classes: int, ignore_index: int
) -> tuple[np.ndarray, bool]:
    """:func:`index_target`, and whether every target is in [0, C)."""
    if (
        type(target) is np.ndarray
        and target.dtype == _INT64
        and target.shape == expected
        and target.ndim == 1
        and target.flags.c_contiguous
    ):
        t = target  # the common case, without a conversion or a copy
    else:
        t = np.asarray(target)
        if t.dtype.kind not in "iu":
            raise TypeError(
                "target must be integer class indices (or float probabilities of the logits' "
                f"shape); got dtype {t.dtype}"
            )
        if t.shape != tuple(expected):
            raise ValueError(
                f"target of class indices must have shape {expected} to match logits; got "
                f"shape {t.shape}"
            )
        t = as_working(t, (t.size,), _INT64)
    if cpu.indices_in_range(t, n_classes):
        return t, True  # one pass, no temporaries: the common case
    bad = (t != ignore_index) & ((t < 0) | (t >= n_classes))
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"target[{i}] = {int(t[i])} is out of range for {n_classes} classes (expected "
            f"0 <= target < {n_classes} or ignore_index={ignore_index})"
        )
    return t, False


def prob_target(
    target: Any, logits: np.ndarray, work_dtype: np.dtype, name: str = "target"
) -> np.ndarray:
    """Probability targets of the logits' shape, laid out as :func:`class_rows` lays out the
    logits (a 2-D working-dtype array), checked non-negative."""
    t = as_float_array(name, target)
    if t.shape != logits.shape:
        raise ValueError(
            f"{name} of probabilities must have the logits' shape {logits.shape}; got shape "
            f"{t.shape}"
        )
    _, t2, _ = class_rows(name, t)
    t2 = t2.astype(work_dtype, copy=False)
    if _has_negative(t2):
        raise ValueError(f"{name} probabilities must be non-negative; got a negative entry")
    return t2


def elementwise_weights(name: str, weight: Any, shape: tuple[int, ...]) -> np.ndarray:
    """An element-wise weight broadcast to ``shape``, as a float64 2-D view (no copy if
    possible); checked non-negative."""
    if weight is None:
        w = np.ones((), dtype=np.float64)
    else:
        w = np.asarray(as_float_array(name, weight), dtype=np.float64)
        _check_nonnegative(name, w)
    try:
        b = np.broadcast_to(w, shape)
    except ValueError:
        raise ValueError(
            f"{name} of shape {w.shape} cannot be broadcast to the logits' shape {shape}"
        ) from None
    return b.reshape(shape_2d(shape))


def contiguous_rows(w2: np.ndarray) -> np.ndarray:
    """A broadcast (N, C) weight view as contiguous rows: (1, C) when every row is the same
    (stride 0 along rows), else (N, C)."""
    if w2.shape[0] > 1 and w2.strides[0] == 0:
        return np.ascontiguousarray(w2[:1])
    return np.ascontiguousarray(w2)


def check_smoothing(label_smoothing: Any) -> float:
    ls = float(label_smoothing)
    if not 0.0 <= ls <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1]; got {label_smoothing!r}")
    return ls


def check_gamma(gamma: Any) -> float:
    g = float(gamma)
    if not g >= 0:
        raise ValueError(f"gamma must be >= 0; got {gamma!r}")
    return g


def check_alpha(alpha: Any) -> float:
    a = float(alpha)
    if a > 1:
        raise ValueError(f"alpha must be <= 1 (a negative alpha disables it); got {alpha!r}")
    return a


def check_grad_out(out: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``out=`` for a gradient: a writeable C-contiguous array of the logits' shape and dtype."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array; got {type(out).__name__}")
    if out.shape != tuple(shape) or out.dtype != dtype:
        raise ValueError(
            f"out must have the logits' shape {tuple(shape)} and dtype {dtype}; got shape "
            f"{out.shape} and dtype {out.dtype}"
        )
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("out must be a writeable C-contiguous array")
    return out


# --------------------------------------------------------------------------------------------
# Reductions
# --------------------------------------------------------------------------------------------
def finish_loss(
    per_sample: np.ndarray,
    reduction: str,
    denominator: float,
    out_dtype: np.dtype,
    out_shape: tuple[int, ...],
):
    """Reduce float64 per-sample losses (compensated sum) and round once to ``out_dtype``."""
    if reduction == "none":
        return per_sample.reshape(out_shape).astype(out_dtype)
    # "mean" and "batchmean" divide by the denominator the caller computed
    flat = per_sample if per_sample.ndim == 1 else np.ascontiguousarray(per_sample.reshape(-1))
    # one loss (an element-wise call whose rows were merged into one, or one class row): no sum
    total = float(flat[0]) if flat.shape[0] == 1 else float(cpu.compensated_sum(flat))
    if reduction == "sum":
        return _to_scalar(total, out_dtype)
    if denominator != 0:
        return _to_scalar(total / denominator, out_dtype)
    # x / 0 as IEEE (and numpy) give it: NaN for 0 / 0 and NaN / 0, else an infinity of x's sign
    return out_dtype.type(
        math.nan if total == 0 or total != total else math.copysign(math.inf, total)
    )


_CAST_WITHOUT_OVERFLOW = {np.dtype(np.float64): math.inf, np.dtype(np.float32): 3.4e38}


def _to_scalar(value: float, out_dtype: np.dtype):
    """``value`` rounded once to ``out_dtype``; values beyond its range become infinities
    without numpy's overflow warning (numpy's error state is set only for them: entering
    ``np.errstate`` costs more than the rest of a small call's reduction)."""
    if abs(value) <= _CAST_WITHOUT_OVERFLOW.get(out_dtype, 0.0) or value != value:
        return out_dtype.type(value)
    with np.errstate(over="ignore"):
        return out_dtype.type(value)


def grad_scale(reduction: str, denominator: float) -> float:
    if reduction not in ("mean", "batchmean"):
        return 1.0
    return 1.0 / denominator if denominator != 0 else math.nan


def _index_denominator(
    target: np.ndarray,
    weight: np.ndarray,
    ignore_index: int,
    unweighted: bool,
    n_classes: int,
    in_range: bool,
) -> float:
    """Sum of w_{y_i} over non-ignored rows: torch's denominator for reduction="mean" (the
    count of those rows when ``unweighted``); ``in_range``: every target is in [0, C)."""
    if in_range and not 0 <= ignore_index < n_classes:  # no target is ignore_index
        return float(target.size) if unweighted else float(weight[target].sum())
    keep = target != ignore_index
    if unweighted:
        return float(np.count_nonzero(keep))
    return float(weight[target[keep]].sum()) if np.any(keep) else 0.0


# --------------------------------------------------------------------------------------------
# Running a variant
# --------------------------------------------------------------------------------------------
_SCALAR_OPTIONS = {
    "ignore_index": int,
    "label_smoothing": check_smoothing,
    "gamma": check_gamma,
    "alpha": check_alpha,
}

INPUT_NAMES = {"logits": "logits", "probs": "probs", "log_probs": "input"}


class _Plan(NamedTuple):
    """What :func:`run` needs of a variant, worked out once per variant (a small call paid
    about 1 us to rebuild it every time)."""

    option_set: frozenset
    defaults: dict
    checks: tuple  # (option, its check) for the variant's scalar options
    input_name: str
    fwd: str  # the kernels' names
    fwd_grad: str


_PLANS: dict[str, _Plan] = {}


def _plan(v: variants.Variant) -> _Plan:
    plan = _PLANS.get(v.name)
    if plan is None:
        plan = _PLANS[v.name] = _Plan(
            frozenset(v.option_names),
            v.defaults,
            tuple((key, _SCALAR_OPTIONS[key]) for key in v.option_names if key in _SCALAR_OPTIONS),
            INPUT_NAMES[v.input],
            f"{v.kernel}_fwd",
            f"{v.kernel}_fwd_grad",
        )
    return plan


def _kernel_module(variant: variants.Variant, backend: str, work: np.dtype):
    if backend == "cuda":
        return backends.require_cuda()
    if variant.fast_cpu and work in _FAST_DTYPES:
        return cpu_fast
    return cpu


def _kernel(module, name: str, work: int):
    """The CPU kernel ``name`` for a call of ``work`` (``cpu.call_work``: its serial twin for
    small calls, where starting threads costs more than it gives), or the CUDA host wrapper."""
    if module is cpu or module is cpu_fast:
        return cpu.kernel_for(module, name, work)
    return getattr(module, name)


def _is_device(a: Any) -> bool:
    """Whether ``a`` is a device array: it exports ``__cuda_array_interface__`` (numba, CuPy,
    torch CUDA tensors), or it is a device array of the CUDA simulator."""
    if a is None or isinstance(a, np.ndarray):
        return False
    try:
        getattr(a, "__cuda_array_interface__")
    except AttributeError:
        return type(a).__name__ == "FakeCUDAArray"
    except RuntimeError as exc:  # torch: a CUDA tensor that requires grad
        raise TypeError(
            f"a device array that requires grad cannot be read ({exc}); pass "
            f"tensor.detach(), or use cestudy.torch for autograd"
        ) from None
    return True


def run(
    name: str,
    logits: Any,
    target: Any,
    *,
    reduction: str = "mean",
    backend: str = "cpu",
    with_grad: bool = False,
    out: Any = None,
    **options,
):
    """Compute variant ``name`` with the kernels: the loss, or (loss, grad) with ``with_grad``.

    ``options`` are the variant's keyword options (``cestudy.variants``); ``out`` is an optional
    gradient buffer (it may be the logits themselves, to overwrite them with the gradient).
    """
    v = variants.get(name)
    plan = _plan(v)
    check_choice("reduction", reduction, v.reductions)
    check_choice("backend", backend, BACKENDS)
    if not plan.option_set.issuperset(options):
        unknown = [key for key in options if key not in plan.option_set]
        raise TypeError(f"{v.function}() got unexpected options {sorted(unknown)}")
    opts = {**plan.defaults, **options}
    for key, check in plan.checks:
        opts[key] = check(opts[key])
    if backend == "cuda":
        if not v.cuda:
            raise ValueError(f"{v.function} has no CUDA kernel; use backend='cpu'")
        if _is_device(logits):
            return _run_device(v, logits, target, reduction, with_grad, out, opts)
        backends.require_cuda()  # says what is missing before any work
    input_name = plan.input_name

    merge = 1
    if v.elementwise:
        arr = as_float_array(input_name, logits)
        tgt = as_float_array("target", target)
        if tgt.shape != arr.shape:
            raise ValueError(
                f"target must have the shape of {input_name} {arr.shape}; got shape {tgt.shape}"
            )
        work = dtypes.working_dtype(arr.dtype)
        s2 = shape_2d(arr.shape)
        if backend == "cpu":
            merge = merge_factor(*s2)
            s2 = (s2[0] // merge, s2[1] * merge)
        x = as_working(arr, s2, work)
        t = as_working(tgt, s2, work)
        loss_shape = arr.shape
        denom = float(arr.size)
        if reduction == "batchmean":
            denom = float(arr.shape[0]) if arr.ndim else 1.0
    else:
        arr, x, loss_shape = class_rows(input_name, logits)
        if v.target == "index":
            t, in_range = _checked_indices(target, loss_shape, x.shape[1], opts["ignore_index"])
        else:
            t = prob_target(target, arr, x.dtype)
            denom = float(x.shape[0])
    module = _kernel_module(v, backend, x.dtype)
    args = []
    for key in v.option_names:
        value = opts[key]
        if key in ("weight", "pos_weight"):
            if not v.elementwise:
                value = class_weight(value, x.shape[1])
            elif value is None:
                value = ones_row(x.shape[1])
            else:
                value = contiguous_rows(elementwise_weights(key, value, arr.shape))
                value = merged_weight(value, merge, x.shape)
        args.append(value)
    if v.target == "index":
        denom = _index_denominator(
            t, args[0], opts["ignore_index"], opts.get("weight") is None, x.shape[1], in_range
        )
    # element-wise CPU kernels sum each row themselves when no per-element loss is asked for
    row_sums = v.elementwise and reduction != "none" and backend == "cpu"
    loss = np.empty(x.shape[0] if row_sums or not v.elementwise else x.shape, dtype=np.float64)

    if not with_grad:
        _kernel(module, plan.fwd, cpu.call_work(*x.shape, v.elementwise))(x, t, *args, loss)
        return finish_loss(loss, reduction, denom, arr.dtype, loss_shape)
    grad = _grad_buffer(out, arr, x, v.elementwise)
    if np.shares_memory(grad, x) and grad.ctypes.data != x.ctypes.data:
        grad = np.empty_like(x)  # a partial overlap; out=logits itself is safe in every kernel
    _kernel(module, plan.fwd_grad, cpu.call_work(*x.shape, v.elementwise))(
        x, t, *args, grad_scale(reduction, denom), loss, grad
    )
    result = finish_loss(loss, reduction, denom, arr.dtype, loss_shape)
    if out is not None:
        if not np.shares_memory(grad, out):
            out[...] = to_input_layout(grad, arr, v.elementwise)
        return result, out
    return result, to_input_layout(grad, arr, v.elementwise).astype(arr.dtype, copy=False)


MERGED_ROW = 4096
"""Element-wise losses: consecutive rows shorter than this are run as one kernel row of up to
this many elements (:func:`merge_factor`)."""


def merge_factor(n: int, c: int) -> int:
    """How many consecutive rows of an element-wise loss's (n, c) input the CPU kernels run as
    one row. An element-wise loss does not care where rows end, but the kernels pay a fixed
    cost per row (about 80 ns: a row's setup and the remainder of its vector loops), which
    dominated short rows (256 x 10: 20 us in the kernel). So k consecutive rows of C elements
    become one row of k C: k = all the rows, or the largest power of two dividing N, with
    k C <= :data:`MERGED_ROW` (1: rows stay apart). The logits and targets are viewed that way
    (they are C-contiguous), the weights by :func:`merged_weight`."""
    if n * c <= MERGED_ROW:
        return max(n, 1)
    return min(n & -n, 1 << max(0, (MERGED_ROW // c).bit_length() - 1))


def merged_weight(w: np.ndarray, k: int, shape: tuple[int, int]) -> np.ndarray:
    """A (1, C) or (N, C) contiguous weight for rows merged k at a time into ``shape``: the one
    row tiled k times, or the rows viewed as ``shape``."""
    if k <= 1:
        return w
    return np.tile(w, (1, k)) if w.shape[0] == 1 else w.reshape(shape)


def _grad_buffer(out: Any, arr: np.ndarray, x: np.ndarray, elementwise: bool) -> np.ndarray:
    """Where the kernel writes the gradient: ``out`` itself when it has the working dtype (no
    new pages per call), else an array of the working dtype from :mod:`cestudy.buffers` (one
    an earlier call returned and the caller has since dropped, or a new one)."""
    if out is None:
        return buffers.gradient_array(x)
    check_grad_out(out, arr.shape, arr.dtype)
    if out.dtype == x.dtype and (elementwise or arr.ndim <= 2):
        return out.reshape(x.shape)
    return buffers.gradient_array(x)


def _axes(dim: Any, ndim: int, single: bool) -> tuple[int, ...]:
    """``dim`` (an int, or a tuple of ints where ``single`` is False) as sorted axes of an
    array with ``ndim`` axes (a 0-d array counts as one axis, as in torch)."""
    dims = (dim,) if isinstance(dim, (int, np.integer)) else dim
    if (
        single
        and len(dims) != 1
        or not isinstance(dims, (tuple, list))
        or not all(isinstance(d, (int, np.integer)) for d in dims)
    ):
        raise TypeError(f"dim must be an int{'' if single else ' or a tuple of ints'}; got {dim!r}")
    n = max(ndim, 1)
    axes = []
    for d in dims:
        if not -n <= d < n:
            raise ValueError(f"dim {d} is out of range for an array with {ndim} axes")
        axes.append(int(d) % n)
    if len(set(axes)) != len(axes):
        raise ValueError(f"dim {dim!r} names an axis twice")
    return tuple(sorted(axes))


def rows(
    kernel: str, logits: Any, per_row: bool, dim: Any = -1, keepdim: bool = False, dtype: Any = None
) -> np.ndarray:
    """Run a row kernel of ``cestudy.kernels.cpu`` (logsumexp, log_softmax, softmax) over the
    axis (or, for ``per_row`` kernels, axes) ``dim`` of ``logits``; ``dtype`` casts the input
    first, as torch's ``dtype=`` does."""
    arr = as_float_array("logits", logits)
    if dtype is not None:
        arr = arr.astype(as_float_array("dtype", np.empty(0, dtype=dtype)).dtype)
    axes = _axes(dim, arr.ndim, single=not per_row)
    a = arr.reshape(1) if arr.ndim == 0 else arr
    kept = [i for i in range(a.ndim) if i not in axes]
    moved = np.transpose(a, kept + list(axes))
    outer = tuple(a.shape[i] for i in kept)
    width = int(np.prod([a.shape[i] for i in axes], dtype=np.int64))
    work = dtypes.working_dtype(arr.dtype)
    n_rows = int(np.prod(outer, dtype=np.int64))
    x = np.ascontiguousarray(moved.reshape(n_rows, width), dtype=work)
    if per_row:
        out = np.full(x.shape[0], -np.inf) if width == 0 else np.empty(x.shape[0])
        if width and x.shape[0]:
            cpu.kernel_for(cpu, kernel, x.size)(x, out)
        result = out.reshape(outer)
        if keepdim:
            result = np.expand_dims(result, axes) if arr.ndim else result.reshape(())
        elif arr.ndim == 0:
            result = result.reshape(())
        return result.astype(arr.dtype)
    out = np.empty(x.shape, dtype=np.float64)
    if x.size:
        cpu.kernel_for(cpu, kernel, x.size)(x, out)
    back = np.transpose(out.reshape(moved.shape), np.argsort(kept + list(axes)))
    return back.reshape(arr.shape).astype(arr.dtype)


# --------------------------------------------------------------------------------------------
# Device arrays in, device arrays out
# --------------------------------------------------------------------------------------------
DEVICE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), dtypes.float16, dtypes.bfloat16)


def _run_device(v, logits, target, reduction, with_grad, out, opts):
    """Device arrays in, device arrays out, with no host round trip and no host synchronisation.

    Logits: anything with ``__cuda_array_interface__`` (numba, CuPy, torch CUDA tensors) of
    float32, float64 or float16, and bfloat16 as torch tensors, ``__dlpack__`` objects or the
    bits wrapped by ``cestudy.kernels.cuda.bfloat16_bits``; 16-bit logits are computed in
    float32, their loss is float32 and their gradient has their dtype. Shapes, dtypes and host
    weights are checked here. Values on the device are checked by the kernels, which never read
    out of bounds: a target out of range, or a negative device weight or target probability,
    makes its row (element) NaN and is counted on the device; with $CESTUDY_CUDA_CHECKS=sync
    each call reads the counts and raises ValueError (a synchronisation), otherwise
    ``cestudy.kernels.cuda.raise_device_errors()`` does when asked."""
    ck = backends.require_cuda()
    x = ck.as_device_logits(logits)
    if x.dtype not in DEVICE_DTYPES:
        raise TypeError(
            f"logits: device arrays of dtype {x.dtype} are not supported by "
            f"backend='cuda'; use float32, float64, float16 or bfloat16"
        )
    if x.ndim != 2:
        raise ValueError(f"logits must be a 2-D (N, C) device array; got shape {x.shape}")
    n, c = x.shape
    if v.target == "index":
        t = ck.as_device(target)
        if tuple(t.shape) != (n,) or t.dtype.kind not in "iu":
            raise ValueError(
                f"target must be an integer (N,) = ({n},) device array of class "
                f"indices; got {t.dtype} {tuple(t.shape)}"
            )
    else:
        t = ck.as_device_logits(target)
        if tuple(t.shape) != (n, c):
            raise ValueError(f"target must have the logits' shape {(n, c)}; got {tuple(t.shape)}")
    args = []
    for key in v.option_names:
        value = opts[key]
        if key in ("weight", "pos_weight") and value is not None:
            if _is_device(value):
                value = ck.as_device_logits(value)
                wshape = tuple(value.shape)
                ok = (
                    wshape in ((c,), (1, c), (n, c), (n, 1), (1, 1), (1,))
                    if v.elementwise
                    else wshape == (c,)
                )
                if not ok:
                    raise ValueError(
                        f"{key} of shape {wshape} does not fit logits of shape {(n, c)}"
                    )
            elif v.elementwise:
                value = contiguous_rows(elementwise_weights(key, value, (n, c)))
            else:
                value = class_weight(value, c)
        args.append(value)
    grad = None
    if with_grad and out is not None:
        grad = ck.as_device_logits(out)
        if tuple(grad.shape) != (n, c) or grad.dtype != x.dtype:
            raise ValueError(f"out must have the logits' shape {(n, c)} and dtype {x.dtype}")
    loss, g = ck.compute(v.kernel, x, t, args, reduction, with_grad, grad)
    if ck.sync_checks():
        ck.raise_device_errors()
    if not with_grad:
        return loss
    return loss, (out if out is not None else g)
