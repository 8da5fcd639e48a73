"""Other libraries' implementations of the variants: the peers cestudy is measured against.

For a variant ``name`` whose registry entry lists peer ``P``, this module has ``P_<name>(x,
target, **options) -> (loss, grad)`` with the conventions of ``cestudy.reference.formulations``:
per-sample loss in the dtype under test and the gradient of the summed loss from the peer's own
autodiff (None where it has none). Each peer is imported when first called, so that cestudy
imports without it; ``available(peer)`` says whether it is installed and how to install it.

The peers: ``torch`` (torch.nn.functional and autograd), ``scipy`` (scipy.special), ``jax``
(optax's losses and ``jax.nn``, under ``jax.jit`` on the CPU, gradients by ``jax.vjp``),
``tensorflow`` (``tf.nn`` and the Keras 3 losses, eager on the CPU, gradients by
``tf.GradientTape``) and ``sklearn`` (``sklearn.metrics.log_loss`` per sample; no gradient).
jax, tensorflow and sklearn come with ``pip install 'cestudy[peers]'``.

Each peer computes what its library computes, in the library's own way; where a library has no
equivalent of an option (optax and ``tf.nn`` have no class weights; ``log_loss`` has no logits,
label smoothing or ignored rows) the function raises :class:`Unsupported`, a
``cestudy.backends.Skip`` (the study records the cell as skipped, with the reason) that is also a
``NotImplementedError``. ``limitation(peer, variant, **options)`` gives that reason without
computing anything.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np

from .. import dtypes
from ..backends import Skip

# peer -> the module whose presence makes it available (what ``available`` looks for)
PACKAGES = {
    "torch": "torch",
    "scipy": "scipy",
    "jax": "optax",
    "tensorflow": "tensorflow",
    "sklearn": "sklearn",
}
DESCRIPTIONS = {
    "torch": "torch.nn.functional (CPU) and autograd",
    "scipy": "scipy.special.log_softmax / softmax",
    "jax": "optax losses and jax.nn under jax.jit (CPU, x64 on), gradients by jax.vjp",
    "tensorflow": "tf.nn and Keras 3 losses (CPU, eager), gradients by tf.GradientTape",
    "sklearn": "sklearn.metrics.log_loss per sample (clipped at finfo(dtype).eps), no gradient",
}
# every module a peer imports, and the distributions whose versions describe it
_MODULES = {"jax": ("jax", "optax"), "tensorflow": ("tensorflow", "keras")}
DISTRIBUTIONS = {
    "torch": ("torch",),
    "scipy": ("scipy",),
    "jax": ("jax", "jaxlib", "optax"),
    "tensorflow": ("tensorflow", "tensorflow-cpu", "keras"),
    "sklearn": ("scikit-learn",),
}
_INSTALL = {
    "torch": "pip install torch==2.13.0 (CPU build)",
    "jax": "pip install 'cestudy[peers]'",
    "tensorflow": "pip install 'cestudy[peers]'",
    "sklearn": "pip install 'cestudy[peers]'",
}


def available(peer: str) -> tuple[bool, str]:
    """(installed, reason when not) for ``peer``, with the command that would install it."""
    for module in _MODULES.get(peer, (PACKAGES[peer],)):
        if importlib.util.find_spec(module) is None:
            hint = _INSTALL.get(peer, f"pip install {module}")
            return False, f"{module} is not installed ({hint})"
    return True, ""


def versions() -> dict[str, str]:
    """{distribution: version} of every installed peer package (for a run's manifest)."""
    from importlib import metadata

    out = {}
    for dists in DISTRIBUTIONS.values():
        for dist in dists:
            try:
                out[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                pass
    return out


class Unsupported(Skip, NotImplementedError):
    """The peer's library has no equivalent of an option or input of the call (class weights in
    optax, label smoothing in ``log_loss``, ...). A ``Skip``, so that a study records the cell as
    skipped with this reason rather than as a result, and a ``NotImplementedError``."""


# (peer, option) -> what the library lacks, for the variants where the option means something
_LACKS = {
    ("jax", "weight"): "optax has no class or element weights",
    ("jax", "pos_weight"): "optax has no pos_weight",
    ("tensorflow", "weight"): "tf.nn / Keras losses have no class or element weights",
    ("sklearn", "weight"): "sklearn.metrics.log_loss has no class weights",
    ("sklearn", "label_smoothing"): "sklearn.metrics.log_loss has no label smoothing",
}
# where the peer's own code path takes the option after all
_TAKES = {("jax", "softmax_focal_loss", "weight"), ("tensorflow", "softmax_focal_loss", "weight")}


def limitation(peer: str, variant: str, **options) -> str:
    """Why ``peer`` cannot compute ``variant`` with these options ("" when it can).

    Only the options are looked at; what depends on the data (ignored rows or soft targets for
    ``log_loss``) is checked when the function runs. The peer functions raise
    :class:`Unsupported` with this reason."""
    for name, value in options.items():
        if value is None or (name == "label_smoothing" and value == 0):
            continue
        why = _LACKS.get((peer, name))
        if why and (peer, variant, name) not in _TAKES:
            return f"{why} ({variant} with {name})"
    return ""


def _refuse(peer, variant, **options):
    why = limitation(peer, variant, **options)
    if why:
        raise Unsupported(why)


# --------------------------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------------------------
def _to_torch(a):
    import torch

    a = np.asarray(a)
    if a.dtype == dtypes.bfloat16:
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def _from_torch(t, dtype):
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.to(torch.float32).numpy().astype(dtype)
    return t.numpy().astype(dtype, copy=False)


def _torch_call(loss_fn, x, target, index_target, weight=None, with_grad=True, **options):
    """Run ``loss_fn(xt, tt, wt, **options)`` on torch tensors; the gradient of the summed loss
    comes from autograd."""
    import torch

    xt = _to_torch(x).requires_grad_(with_grad)
    wt = None if weight is None else torch.as_tensor(np.asarray(weight, np.float64)).to(xt.dtype)
    if index_target:
        tt = torch.from_numpy(np.asarray(target, dtype=np.int64))
    else:
        tt = _to_torch(target)
    loss = loss_fn(xt, tt, wt, **options)
    grad = None
    if with_grad:
        loss.sum().backward()
        grad = _from_torch(xt.grad, x.dtype)
    return _from_torch(loss, x.dtype), grad


def torch_cross_entropy(x, target, weight=None, ignore_index=-100, label_smoothing=0.0, **_):
    import torch.nn.functional as F

    def fn(xt, tt, wt):
        return F.cross_entropy(
            xt,
            tt,
            weight=wt,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            reduction="none",
        )

    return _torch_call(fn, x, target, True, weight)


def torch_cross_entropy_probs(x, target, weight=None, label_smoothing=0.0, **_):
    import torch.nn.functional as F

    def fn(xt, tt, wt):
        return F.cross_entropy(xt, tt, weight=wt, label_smoothing=label_smoothing, reduction="none")

    return _torch_call(fn, x, target, False, weight)


def _torch_kl_divergence_rows(xt, tt, wt):
    """KL(t || softmax(x)) per row with torch ops."""
    import torch.nn.functional as F

    return F.kl_div(F.log_softmax(xt, dim=-1), tt, reduction="none").sum(-1)


def _torch_softmax_focal_rows(xt, tt, wt, gamma=2.0, ignore_index=-100):
    """-w_y (1 - p_y)^gamma log p_y per row with torch ops (torch has no softmax focal loss)."""
    import torch
    import torch.nn.functional as F

    logp = F.log_softmax(xt, dim=-1)
    keep = tt != ignore_index
    ys = torch.where(keep, tt, torch.zeros_like(tt))
    lp = logp.gather(1, ys[:, None])[:, 0]
    wy = torch.ones_like(lp) if wt is None else wt[ys]
    return torch.where(keep, -wy * (1 - lp.exp()) ** gamma * lp, torch.zeros_like(lp))


def _torch_sigmoid_focal_elements(xt, tt, wt, alpha=0.25, gamma=2.0):
    """torchvision.ops.sigmoid_focal_loss (reduction 'none'), verbatim."""
    import torch
    import torch.nn.functional as F

    p = torch.sigmoid(xt)
    ce = F.binary_cross_entropy_with_logits(xt, tt, reduction="none")
    p_t = p * tt + (1 - p) * (1 - tt)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * tt + (1 - alpha) * (1 - tt)) * loss
    return loss


_TORCH_EXPRESSIONS = {
    "kl_divergence": _torch_kl_divergence_rows,
    "softmax_focal_loss": _torch_softmax_focal_rows,
    "sigmoid_focal_loss": _torch_sigmoid_focal_elements,
}


def torch_loss_expression(variant: str):
    """f(xt, tt, wt) -> per-sample loss with default options, for the variants torch has no
    functional of its own for (KL of softmax, the focal losses); the benchmark times these."""
    try:
        return _TORCH_EXPRESSIONS[variant]
    except KeyError:
        raise KeyError(f"variant: torch has its own functional for {variant!r}") from None


def torch_kl_divergence(x, target, **_):
    return _torch_call(_torch_kl_divergence_rows, x, target, False)


def torch_softmax_focal_loss(x, target, gamma=2.0, weight=None, ignore_index=-100, **_):
    """-w_y (1 - p_y)^gamma log p_y written with torch ops (torch has no softmax focal loss)."""

    def fn(xt, tt, wt):
        return _torch_softmax_focal_rows(xt, tt, wt, gamma=gamma, ignore_index=ignore_index)

    return _torch_call(fn, x, target, True, weight)


def torch_binary_cross_entropy_with_logits(x, target, weight=None, pos_weight=None, **_):
    import torch
    import torch.nn.functional as F

    def fn(xt, tt, wt):
        pwt = None if pos_weight is None else torch.as_tensor(np.asarray(pos_weight)).to(xt.dtype)
        return F.binary_cross_entropy_with_logits(
            xt, tt, weight=wt, pos_weight=pwt, reduction="none"
        )

    return _torch_call(fn, x, target, False, weight)


def torch_binary_cross_entropy(probs, target, weight=None, **_):
    import torch.nn.functional as F

    def fn(xt, tt, wt):
        return F.binary_cross_entropy(xt, tt, weight=wt, reduction="none")

    return _torch_call(fn, probs, target, False, weight, with_grad=False)


def torch_sigmoid_focal_loss(x, target, alpha=0.25, gamma=2.0, **_):
    """torchvision.ops.sigmoid_focal_loss, verbatim."""

    def fn(xt, tt, wt):
        return _torch_sigmoid_focal_elements(xt, tt, wt, alpha=alpha, gamma=gamma)

    return _torch_call(fn, x, target, False)


# --------------------------------------------------------------------------------------------
# scipy
# --------------------------------------------------------------------------------------------
def scipy_cross_entropy(x, target, **_):
    """-scipy.special.log_softmax(x)[y] and softmax(x) - onehot(y) (no weights or smoothing)."""
    from scipy import special

    with np.errstate(all="ignore"):
        logp = special.log_softmax(x, axis=-1)
        rows = np.arange(x.shape[0])
        loss = -logp[rows, target]
        grad = special.softmax(x, axis=-1)
        grad[rows, target] -= 1
    return np.asarray(loss), np.asarray(grad)


def torch_nll_loss(log_probs, target, weight=None, ignore_index=-100, **_):
    import torch.nn.functional as F

    def fn(xt, tt, wt):
        return F.nll_loss(xt, tt, weight=wt, ignore_index=ignore_index, reduction="none")

    return _torch_call(fn, log_probs, target, True, weight)


def torch_kl_div(log_probs, target, log_target=False, **_):
    import torch.nn.functional as F

    def fn(xt, tt, wt):
        return F.kl_div(xt, tt, reduction="none", log_target=log_target)

    return _torch_call(fn, log_probs, target, False)


# --------------------------------------------------------------------------------------------
# jax / optax
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _jax():
    """(jax, jax.numpy, optax, the CPU device), with 64-bit types enabled: without x64 JAX
    silently computes float64 inputs in float32."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import optax

    return jax, jnp, optax, jax.devices("cpu")[0]


_JAX_JIT: dict = {}


def _jax_call(key, loss_fn, x, target, *arrays, with_grad=True):
    """``loss_fn(x, target, *arrays)`` under ``jax.jit`` on the CPU, and the gradient of its sum
    by ``jax.vjp`` (cotangent ones), as a jitted training step computes them. ``key`` names the
    function and its static options: one jitted function per key (jit itself caches per shape
    and dtype)."""
    jax, jnp, _, cpu = _jax()
    f = _JAX_JIT.get((key, with_grad))
    if f is None:
        if with_grad:

            def fwd_grad(xj, tj, *aj):
                loss, vjp = jax.vjp(lambda a: loss_fn(a, tj, *aj), xj)
                return loss, vjp(jnp.ones_like(loss))[0]

            f = jax.jit(fwd_grad)
        else:
            f = jax.jit(loss_fn)
        _JAX_JIT[(key, with_grad)] = f
    x = np.asarray(x)
    args = [jax.device_put(np.asarray(a), cpu) for a in (x, target, *arrays)]
    out = f(*args)
    loss, grad = out if with_grad else (out, None)
    loss = np.asarray(loss)
    if loss.dtype != x.dtype:  # x64 switched off by someone else after our first call
        raise RuntimeError(f"jax computed {x.dtype} input in {loss.dtype}: jax_enable_x64 is off")
    return loss, (None if grad is None else np.asarray(grad).astype(x.dtype, copy=False))


def jax_cross_entropy(x, target, weight=None, ignore_index=-100, label_smoothing=0.0, **_):
    """``optax.softmax_cross_entropy_with_integer_labels``: ``logsumexp(x) - x_y``, which rounds
    the loss of a confident row to 0 (and its true-class gradient with it) in float32, and the
    loss of equal logits at a large offset (log C at 1e8 in float32) to 0, where torch and
    TensorFlow, which subtract the maximum before the log, keep log C.

    Ignored rows go through optax's ``where`` (a row mask: loss 0, gradient 0). Label smoothing
    is optax's recipe, ``softmax_cross_entropy(x, smooth_labels(one_hot(y), eps))``, the same
    targets as torch's ``(1 - eps) onehot + eps / C``. optax has no class weights: a weighted
    call raises :class:`Unsupported`."""
    _refuse("jax", "cross_entropy", weight=weight, label_smoothing=label_smoothing)
    jax, jnp, optax, _ = _jax()
    ls = float(label_smoothing)

    def fn(xj, tj):
        keep = tj != ignore_index
        if ls == 0:
            return optax.softmax_cross_entropy_with_integer_labels(xj, tj, where=keep)
        onehot = jax.nn.one_hot(jnp.where(keep, tj, 0), xj.shape[-1], dtype=xj.dtype)
        loss = optax.softmax_cross_entropy(xj, optax.smooth_labels(onehot, ls), where=keep)
        return jnp.where(keep, loss, 0)

    return _jax_call(("cross_entropy", ignore_index, ls), fn, x, np.asarray(target, np.int64))


def jax_cross_entropy_probs(x, target, weight=None, label_smoothing=0.0, **_):
    """``optax.softmax_cross_entropy``: ``-sum(p * log_softmax(x))``; label smoothing by
    ``optax.smooth_labels`` (torch's ``(1 - eps) p + eps / C``); no class weights
    (:class:`Unsupported`)."""
    _refuse("jax", "cross_entropy_probs", weight=weight, label_smoothing=label_smoothing)
    _, _, optax, _ = _jax()
    ls = float(label_smoothing)

    def fn(xj, tj):
        return optax.softmax_cross_entropy(xj, optax.smooth_labels(tj, ls) if ls else tj)

    return _jax_call(("cross_entropy_probs", ls), fn, x, target)


def jax_kl_divergence(x, target, **_):
    """``optax.kl_divergence(jax.nn.log_softmax(x), p)``: ``sum(p (log p - log q))`` with the
    ``p = 0`` terms set to 0."""
    jax, _, optax, _ = _jax()

    def fn(xj, tj):
        return optax.kl_divergence(jax.nn.log_softmax(xj, axis=-1), tj)

    return _jax_call(("kl_divergence",), fn, x, target)


def _jax_softmax_focal_rows(xj, tj, wj=None, gamma=2.0, ignore_index=-100):
    """-w_y (1 - p_y)^gamma log p_y per row with jax ops (optax has no softmax focal loss)."""
    jax, jnp, _, _ = _jax()
    keep = tj != ignore_index
    ys = jnp.where(keep, tj, 0)
    lp = jnp.take_along_axis(jax.nn.log_softmax(xj, axis=-1), ys[:, None], axis=-1)[:, 0]
    wy = 1 if wj is None else wj.astype(xj.dtype)[ys]
    return jnp.where(keep, -wy * (1 - jnp.exp(lp)) ** gamma * lp, 0)


def jax_softmax_focal_loss(x, target, gamma=2.0, weight=None, ignore_index=-100, **_):
    """``-w_y (1 - p_y)^gamma log p_y`` written with ``jax.nn.log_softmax`` (optax has no softmax
    focal loss; the torch peer is written the same way): ``p_y = exp(log p_y)`` and
    ``1 - p_y`` in the working dtype, so confident rows lose the loss as the lse form does."""
    g = float(gamma)
    w = np.ones(np.shape(x)[-1]) if weight is None else np.asarray(weight, np.float64)

    def fn(xj, tj, wj):
        return _jax_softmax_focal_rows(xj, tj, wj, g, ignore_index)

    return _jax_call(
        ("softmax_focal_loss", ignore_index, g), fn, x, np.asarray(target, np.int64), w
    )


def jax_binary_cross_entropy_with_logits(x, target, weight=None, pos_weight=None, **_):
    """``optax.sigmoid_binary_cross_entropy``: ``-t log_sigmoid(x) - (1 - t) log_sigmoid(-x)``;
    no element weights or pos_weight (:class:`Unsupported`)."""
    _refuse("jax", "binary_cross_entropy_with_logits", weight=weight, pos_weight=pos_weight)
    _, _, optax, _ = _jax()
    return _jax_call(
        ("binary_cross_entropy_with_logits",), optax.sigmoid_binary_cross_entropy, x, target
    )


def jax_sigmoid_focal_loss(x, target, alpha=0.25, gamma=2.0, **_):
    """``optax.sigmoid_focal_loss`` (optax >= 0.2.5 computes ``(1 - p_t)^gamma`` in log space);
    torchvision's ``alpha < 0`` (no class balancing) is optax's ``alpha=None``."""
    _, _, optax, _ = _jax()
    a = None if alpha is None or alpha < 0 else float(alpha)
    g = float(gamma)

    def fn(xj, tj):
        return optax.sigmoid_focal_loss(xj, tj, alpha=a, gamma=g)

    return _jax_call(("sigmoid_focal_loss", a, g), fn, x, target)


# --------------------------------------------------------------------------------------------
# tensorflow / keras
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _tf():
    """(tensorflow, keras) with Keras on its TensorFlow backend and TF's C++ info logs off."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        raise Skip(
            f"keras runs on its {keras.backend.backend()} backend (KERAS_BACKEND); the "
            "tensorflow peer needs KERAS_BACKEND=tensorflow"
        )
    return tf, keras


def _tf_call(op, loss_fn, x, with_grad=True):
    """``loss_fn(x)`` eagerly on the CPU, and the gradient of its sum by ``tf.GradientTape``
    (output gradient ones). A dtype with no kernel for ``op`` raises :class:`Unsupported`."""
    tf, _ = _tf()
    x = np.asarray(x)
    try:
        with tf.device("/CPU:0"):
            xt = tf.constant(x)
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(xt)
                loss = loss_fn(xt)
            grad = None
            if with_grad:
                grad = tape.gradient(loss, xt, output_gradients=tf.ones_like(loss))
    except tf.errors.NotFoundError as exc:  # no kernel registered for this dtype
        raise Unsupported(
            f"TensorFlow has no {dtypes.dtype_name(x.dtype)} CPU kernel for "
            f"{op}: {str(exc).splitlines()[0][:200]}"
        ) from None
    loss = loss.numpy()
    if grad is not None:
        grad = grad.numpy().astype(x.dtype, copy=False)
    return loss.astype(x.dtype, copy=False), grad


def tensorflow_cross_entropy(x, target, weight=None, ignore_index=-100, label_smoothing=0.0, **_):
    """``tf.nn.sparse_softmax_cross_entropy_with_logits`` (``lse - x_y``).

    The sparse op has no label smoothing and no ignored rows (it rejects a label outside
    [0, C)), so those calls take Keras' routes, which end in the same kernels: ignored rows
    ``keras.losses.sparse_categorical_crossentropy(..., ignore_class=ignore_index)`` (loss and
    gradient 0), label smoothing ``keras.losses.categorical_crossentropy`` on one-hot targets
    with ``label_smoothing`` (``tf.nn.softmax_cross_entropy_with_logits`` on torch's targets).
    Both at once has no Keras route, nor do class weights: :class:`Unsupported`."""
    _refuse("tensorflow", "cross_entropy", weight=weight, label_smoothing=label_smoothing)
    tf, keras = _tf()
    t = np.asarray(target, np.int64)
    ignored = bool((t == ignore_index).any())
    ls = float(label_smoothing)
    if ls and ignored:
        raise Unsupported(
            "TensorFlow/Keras has no cross-entropy with both label smoothing and "
            "ignored rows (cross_entropy with label_smoothing and ignore_index)"
        )
    if ls:
        op = "keras.losses.categorical_crossentropy(label_smoothing)"

        def fn(xt):
            onehot = tf.one_hot(t, xt.shape[-1], dtype=xt.dtype)
            return keras.losses.categorical_crossentropy(
                onehot, xt, from_logits=True, label_smoothing=ls
            )
    elif ignored:
        op = "keras.losses.sparse_categorical_crossentropy(ignore_class)"

        def fn(xt):
            return keras.losses.sparse_categorical_crossentropy(
                t, xt, from_logits=True, ignore_class=ignore_index
            )
    else:
        op = "tf.nn.sparse_softmax_cross_entropy_with_logits"

        def fn(xt):
            return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=t, logits=xt)

    return _tf_call(op, fn, x)


def tensorflow_cross_entropy_probs(x, target, weight=None, label_smoothing=0.0, **_):
    """``tf.nn.softmax_cross_entropy_with_logits``; with label smoothing,
    ``keras.losses.categorical_crossentropy(..., from_logits=True, label_smoothing=eps)``
    (targets ``(1 - eps) p + eps / C``, as torch). No class weights (:class:`Unsupported`)."""
    _refuse("tensorflow", "cross_entropy_probs", weight=weight, label_smoothing=label_smoothing)
    tf, keras = _tf()
    ls = float(label_smoothing)
    t = np.asarray(target)

    def fn(xt):
        if ls:
            return keras.losses.categorical_crossentropy(
                t, xt, from_logits=True, label_smoothing=ls
            )
        return tf.nn.softmax_cross_entropy_with_logits(labels=t, logits=xt)

    return _tf_call("tf.nn.softmax_cross_entropy_with_logits", fn, x)


def tensorflow_kl_divergence(x, target, **_):
    """``keras.losses.kl_divergence(p, tf.nn.softmax(x))``: Keras' KL takes probabilities and
    clips both arguments to [1e-7, 1] (``keras.config.epsilon()``), so a loss below the clip's
    bias is lost and classes with p = 0 contribute ``1e-7 log(1e-7 / q)``."""
    tf, keras = _tf()
    t = np.asarray(target)

    def fn(xt):
        return keras.losses.kl_divergence(t, tf.nn.softmax(xt, axis=-1))

    return _tf_call("keras.losses.kl_divergence", fn, x)


def tensorflow_softmax_focal_loss(x, target, gamma=2.0, weight=None, ignore_index=-100, **_):
    """``keras.losses.categorical_focal_crossentropy(one_hot(y), x, alpha=w, gamma,
    from_logits=True)``: softmax, then probabilities clipped to [1e-7, 1 - 1e-7], so the loss
    never falls below ``1e-7^gamma * -log(1 - 1e-7)`` nor exceeds ``-log(1e-7)``.

    Keras' ``alpha`` (a scalar or one weight per class) plays torch's class weights (1 when
    none). Ignored rows get the all-zero one-hot row that ``tf.one_hot`` gives an out-of-range
    index: loss and gradient 0."""
    tf, keras = _tf()
    t = np.asarray(target, np.int64)
    alpha = 1.0 if weight is None else np.asarray(weight, np.float64)

    def fn(xt):
        onehot = tf.one_hot(np.where(t == ignore_index, -1, t), xt.shape[-1], dtype=xt.dtype)
        a = alpha if np.ndim(alpha) == 0 else tf.constant(alpha, dtype=xt.dtype)
        return keras.losses.categorical_focal_crossentropy(
            onehot, xt, alpha=a, gamma=gamma, from_logits=True
        )

    return _tf_call("keras.losses.categorical_focal_crossentropy", fn, x)


def tensorflow_binary_cross_entropy_with_logits(x, target, weight=None, pos_weight=None, **_):
    """``tf.nn.sigmoid_cross_entropy_with_logits``: ``max(x, 0) - x t + log1p(exp(-|x|))``;
    with ``pos_weight``, ``tf.nn.weighted_cross_entropy_with_logits`` (torch's pos_weight: the
    positive term scaled). No element weights (:class:`Unsupported`)."""
    _refuse("tensorflow", "binary_cross_entropy_with_logits", weight=weight)
    tf, _ = _tf()
    t = np.asarray(target)

    def fn(xt):
        if pos_weight is None:
            return tf.nn.sigmoid_cross_entropy_with_logits(labels=t, logits=xt)
        pw = tf.constant(np.asarray(pos_weight, np.float64), dtype=xt.dtype)
        return tf.nn.weighted_cross_entropy_with_logits(labels=t, logits=xt, pos_weight=pw)

    return _tf_call("tf.nn.sigmoid_cross_entropy_with_logits", fn, x)


def tensorflow_binary_cross_entropy(probs, target, weight=None, **_):
    """``keras.losses.binary_crossentropy`` element by element: probabilities clipped to
    [1e-7, 1 - 1e-7] (``keras.config.epsilon()``), so the loss is capped: at ``-log(1e-7)`` =
    16.12 for p -> 0 and, in float32, where ``1 - 1e-7`` rounds to ``1 - 2^-23``, at 15.94 for
    p -> 1. In float16 and bfloat16 ``1 - 1e-7`` rounds to 1: the clip leaves p = 1 alone and
    p = 1 with t = 1, the right answer, gives ``0 * log(0)`` = NaN. No weights
    (:class:`Unsupported`); no gradient (the variant has none)."""
    _refuse("tensorflow", "binary_cross_entropy", weight=weight)
    _, keras = _tf()
    t = np.asarray(target)

    def fn(pt):
        # Keras means over the last axis: a trailing axis of 1 keeps it element-wise
        return keras.losses.binary_crossentropy(t[..., None], pt[..., None])

    return _tf_call("keras.losses.binary_crossentropy", fn, probs, with_grad=False)


def tensorflow_sigmoid_focal_loss(x, target, alpha=0.25, gamma=2.0, **_):
    """``keras.losses.binary_focal_crossentropy(t, x, apply_class_balancing=alpha >= 0, alpha,
    gamma, from_logits=True)`` element by element: torchvision's formula. Keras applies
    ``ops.sigmoid`` and its BCE recovers the logits the sigmoid recorded (``_keras_logits``), so
    the cross-entropy is ``tf.nn.sigmoid_cross_entropy_with_logits`` (no 1e-7 clip), times
    ``(1 - p_t)^gamma`` from the rounded probabilities."""
    _, keras = _tf()
    t = np.asarray(target)
    balance = alpha is not None and alpha >= 0

    def fn(xt):
        return keras.losses.binary_focal_crossentropy(
            t[..., None],
            xt[..., None],
            apply_class_balancing=balance,
            alpha=float(alpha) if balance else 0.25,
            gamma=float(gamma),
            from_logits=True,
        )

    return _tf_call("keras.losses.binary_focal_crossentropy", fn, x)


# --------------------------------------------------------------------------------------------
# scikit-learn
# --------------------------------------------------------------------------------------------
def _log_loss_dtype(dtype):
    """The dtype ``log_loss`` computes in: its ``check_array`` keeps float64, float32 and
    float16 and converts anything else (bfloat16) to float64."""
    dtype = np.dtype(dtype)
    return dtype if dtype in (dtypes.float64, dtypes.float32, dtypes.float16) else dtypes.float64


def _log_loss_rows(prob_of_target):
    """``-log(clip(p, eps, 1 - eps))`` per sample with eps = finfo(dtype).eps, in p's dtype:
    ``sklearn.metrics._classification._log_loss`` before its average (its ``xlogy`` of a one-hot
    row keeps only the target's term)."""
    eps = np.finfo(prob_of_target.dtype).eps
    one = prob_of_target.dtype.type(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.log(np.clip(prob_of_target, eps, one - eps))


def sklearn_cross_entropy(x, target, weight=None, ignore_index=-100, label_smoothing=0.0, **_):
    """``log_loss(y, softmax(x))`` per sample, as scikit-learn scores a multinomial model:
    ``sklearn.utils.extmath.softmax`` (``predict_proba``'s) in the dtype under test, then
    ``log_loss``'s clip of the probabilities to [eps, 1 - eps] with eps = finfo(dtype).eps
    (float64 for bfloat16, which ``log_loss`` converts), so the loss is capped at
    ``-log(eps)`` (36.0 in float64, 15.9 in float32) and is at least ``-log(1 - eps)``, never
    below ``eps``. ``log_loss`` itself averages (this is its sum term by term) and raises on
    non-finite probabilities, where this gives NaN. No gradient, class weights, label smoothing
    or ignored rows (:class:`Unsupported`)."""
    _refuse("sklearn", "cross_entropy", weight=weight, label_smoothing=label_smoothing)
    from sklearn.utils.extmath import softmax

    t = np.asarray(target, np.int64)
    if (t == ignore_index).any():
        raise Unsupported(
            "sklearn.metrics.log_loss has no ignored rows (cross_entropy with ignore_index)"
        )
    x = np.asarray(x)
    with np.errstate(all="ignore"):
        p = softmax(x, copy=True)
    py = p[np.arange(len(t)), t].astype(_log_loss_dtype(x.dtype))
    return _log_loss_rows(py).astype(x.dtype), None


def sklearn_binary_cross_entropy(probs, target, weight=None, **_):
    """``log_loss`` on each element as a binary sample: ``log_loss`` forms ``[1 - p, p]`` in the
    dtype (float64 for bfloat16), clips both to [eps, 1 - eps] with eps = finfo(dtype).eps and
    takes ``-log`` of the target's column. So p = 1 with t = 0 gives ``-log(eps)`` (15.9 in
    float32, 6.9 in float16), where torch's clamp gives 100 and Keras' 16.1. Targets must be
    labels 0 or 1; weights (:class:`Unsupported`) and gradients are not offered."""
    _refuse("sklearn", "binary_cross_entropy", weight=weight)
    probs = np.asarray(probs)
    t = np.asarray(target)
    if not np.isin(t, (0, 1)).all():
        raise Unsupported(
            "sklearn.metrics.log_loss takes class labels, not soft targets "
            "(binary_cross_entropy with targets other than 0 and 1)"
        )
    p = probs.astype(_log_loss_dtype(probs.dtype))
    q = np.where(t == 1, p, p.dtype.type(1) - p)
    return _log_loss_rows(q).astype(probs.dtype), None


# --------------------------------------------------------------------------------------------
# Timing: each framework run the way its users run it
# --------------------------------------------------------------------------------------------
# the peers whose own autodiff gives no gradient
WITHOUT_GRADIENT = frozenset({"sklearn"})

# the library call each peer is timed with, per variant (the forms the accuracy cells measure),
# with each loss's default options (softmax focal gamma 2; sigmoid focal alpha 0.25, gamma 2).
# Keras' KL and categorical focal loss clip the probabilities to [1e-7, 1 - 1e-7]: on rows with
# many classes below 1e-7 (the bench's 2048 x 32768) they time a different quantity, which the
# timed rows' oracle check shows as a large ulp error
TIMED = {
    "jax": {
        "cross_entropy": "optax.softmax_cross_entropy_with_integer_labels",
        "cross_entropy_probs": "optax.softmax_cross_entropy",
        "binary_cross_entropy_with_logits": "optax.sigmoid_binary_cross_entropy",
        "kl_divergence": "optax.kl_divergence(jax.nn.log_softmax(x), p)",
        "softmax_focal_loss": "-(1 - exp(lp))^2 lp, lp = jax.nn.log_softmax(x)[y]",
        "sigmoid_focal_loss": "optax.sigmoid_focal_loss",
    },
    "tensorflow": {
        "cross_entropy": "tf.nn.sparse_softmax_cross_entropy_with_logits",
        "cross_entropy_probs": "tf.nn.softmax_cross_entropy_with_logits",
        "binary_cross_entropy_with_logits": "tf.nn.sigmoid_cross_entropy_with_logits",
        "kl_divergence": "keras.losses.kl_divergence(p, tf.nn.softmax(x))",
        "softmax_focal_loss": "keras.losses.categorical_focal_crossentropy(from_logits=True)",
        "sigmoid_focal_loss": "keras.losses.binary_focal_crossentropy(from_logits=True)",
    },
    "sklearn": {"cross_entropy": "sklearn.metrics.log_loss(y, softmax(x))"},
}


def _jax_timed_loss(variant):
    """f(x, target) -> per-sample loss, the jax/optax call :data:`TIMED` names."""
    jax, _, optax, _ = _jax()
    return {
        "cross_entropy": optax.softmax_cross_entropy_with_integer_labels,
        "cross_entropy_probs": optax.softmax_cross_entropy,
        "binary_cross_entropy_with_logits": optax.sigmoid_binary_cross_entropy,
        "kl_divergence": lambda xj, tj: optax.kl_divergence(jax.nn.log_softmax(xj, axis=-1), tj),
        "softmax_focal_loss": _jax_softmax_focal_rows,
        "sigmoid_focal_loss": lambda xj, tj: optax.sigmoid_focal_loss(
            xj, tj, alpha=0.25, gamma=2.0
        ),
    }[variant]


def _tf_timed_loss(variant):
    """f(x, target) -> per-sample loss, the TensorFlow/Keras call :data:`TIMED` names."""
    tf, keras = _tf()

    def kl_divergence(xv, tv):
        return keras.losses.kl_divergence(tv, tf.nn.softmax(xv, axis=-1))

    def softmax_focal_loss(xv, tv):
        onehot = tf.one_hot(tv, tf.shape(xv)[-1], dtype=xv.dtype)
        return keras.losses.categorical_focal_crossentropy(
            onehot, xv, alpha=1.0, gamma=2.0, from_logits=True
        )

    def sigmoid_focal_loss(xv, tv):  # a trailing axis of 1: Keras means over the last axis
        return keras.losses.binary_focal_crossentropy(
            tv[..., None],
            xv[..., None],
            apply_class_balancing=True,
            alpha=0.25,
            gamma=2.0,
            from_logits=True,
        )

    def op(fn):
        return lambda xv, tv: fn(labels=tv, logits=xv)

    return {
        "cross_entropy": op(tf.nn.sparse_softmax_cross_entropy_with_logits),
        "cross_entropy_probs": op(tf.nn.softmax_cross_entropy_with_logits),
        "binary_cross_entropy_with_logits": op(tf.nn.sigmoid_cross_entropy_with_logits),
        "kl_divergence": kl_divergence,
        "softmax_focal_loss": softmax_focal_loss,
        "sigmoid_focal_loss": sigmoid_focal_loss,
    }[variant]


def timed_callable(variant: str, peer: str, mode: str, x, t):
    """A zero-argument function computing the mean loss of ``peer`` (and, for
    ``mode="forward_grad"``, its gradient), returning ``(loss, grad or None)`` as
    ``cestudy.bench.cpu.make_callable`` does; KeyError where the peer has no such timing.

    jax: one ``jax.jit`` function (``jax.value_and_grad`` of the mean for the gradient), inputs
    placed on the CPU once, each call ended by ``block_until_ready()``; the first call compiles
    (the bench times it apart). tensorflow: one ``tf.function`` (graph mode, as Keras' ``fit``
    runs, without XLA), the gradient by a ``GradientTape`` inside it. sklearn: ``log_loss`` of
    ``sklearn.utils.extmath.softmax(x)``, its input validation included; no gradient."""
    if variant not in TIMED.get(peer, {}):
        raise KeyError(f"{peer} is not timed for {variant}")
    ok, why = available(peer)
    if not ok:
        raise ImportError(why)
    grad = mode == "forward_grad"
    if peer == "sklearn":
        if grad:
            raise KeyError("sklearn.metrics.log_loss has no gradient")
        from sklearn.metrics import log_loss
        from sklearn.utils.extmath import softmax

        labels = np.arange(x.shape[1])
        return lambda: (float(log_loss(t, softmax(x, copy=True), labels=labels)), None)
    if peer == "jax":
        jax, jnp, _, cpu = _jax()
        fn = _jax_timed_loss(variant)

        def mean_loss(xj, tj):
            return jnp.mean(fn(xj, tj))

        f = jax.jit(jax.value_and_grad(mean_loss) if grad else mean_loss)
        xj, tj = jax.device_put(x, cpu), jax.device_put(t, cpu)

        def run_jax():
            out = jax.block_until_ready(f(xj, tj))
            return (float(out[0]), np.asarray(out[1])) if grad else (float(out), None)

        return run_jax
    tf, _ = _tf()
    loss_fn = _tf_timed_loss(variant)
    with tf.device("/CPU:0"):
        xt, tt = tf.constant(x), tf.constant(t)

    @tf.function
    def forward(xv, tv):
        return tf.reduce_mean(loss_fn(xv, tv))

    @tf.function
    def forward_grad(xv, tv):
        with tf.GradientTape() as tape:
            tape.watch(xv)
            loss = tf.reduce_mean(loss_fn(xv, tv))
        return loss, tape.gradient(loss, xv)

    def run_tf():
        with tf.device("/CPU:0"):
            if grad:
                loss, g = forward_grad(xt, tt)
                return float(loss), g.numpy()
            return float(forward(xt, tt)), None

    return run_tf
