"""Other libraries' implementations of the variants: the peers cestudy is measured against.

For a variant ``name`` whose registry entry lists peer ``P``, this module has ``P_<name>(x,
target, **options) -> (loss, grad)`` with the conventions of ``cestudy.reference.formulations``:
per-sample loss in the dtype under test and the gradient of the summed loss from the peer's own
autodiff (None where it has none). Each peer is imported when first called, so that cestudy
imports without it; ``AVAILABLE`` says how to find out whether it is installed.
"""
from __future__ import annotations

import importlib.util

import numpy as np

from .. import dtypes

PACKAGES = {"torch": "torch", "scipy": "scipy"}
DESCRIPTIONS = {
    "torch": "torch.nn.functional (CPU) and autograd",
    "scipy": "scipy.special.log_softmax / softmax",
}


def available(peer: str) -> tuple[bool, str]:
    """(installed, reason when not) for ``peer``, with the command that would install it."""
    package = PACKAGES[peer]
    if importlib.util.find_spec(package) is None:
        hint = "pip install torch==2.13.0 (CPU build)" if peer == "torch" else f"pip install {package}"
        return False, f"{package} is not installed ({hint})"
    return True, ""


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
        return F.cross_entropy(xt, tt, weight=wt, ignore_index=ignore_index,
                               label_smoothing=label_smoothing, reduction="none")

    return _torch_call(fn, x, target, True, weight)


def torch_cross_entropy_probs(x, target, weight=None, label_smoothing=0.0, **_):
    import torch.nn.functional as F

    def fn(xt, tt, wt):
        return F.cross_entropy(xt, tt, weight=wt, label_smoothing=label_smoothing,
                               reduction="none")

    return _torch_call(fn, x, target, False, weight)


def torch_kl_divergence(x, target, **_):
    import torch.nn.functional as F

    def fn(xt, tt, wt):
        return F.kl_div(F.log_softmax(xt, dim=-1), tt, reduction="none").sum(-1)

    return _torch_call(fn, x, target, False)


def torch_softmax_focal_loss(x, target, gamma=2.0, weight=None, ignore_index=-100, **_):
    """-w_y (1 - p_y)^gamma log p_y written with torch ops (torch has no softmax focal loss)."""
    import torch
    import torch.nn.functional as F

    def fn(xt, tt, wt):
        logp = F.log_softmax(xt, dim=-1)
        keep = tt != ignore_index
        ys = torch.where(keep, tt, torch.zeros_like(tt))
        lp = logp.gather(1, ys[:, None])[:, 0]
        wy = torch.ones_like(lp) if wt is None else wt[ys]
        return torch.where(keep, -wy * (1 - lp.exp()) ** gamma * lp, torch.zeros_like(lp))

    return _torch_call(fn, x, target, True, weight)


def torch_binary_cross_entropy_with_logits(x, target, weight=None, pos_weight=None, **_):
    import torch
    import torch.nn.functional as F

    def fn(xt, tt, wt):
        pwt = None if pos_weight is None else torch.as_tensor(np.asarray(pos_weight)).to(xt.dtype)
        return F.binary_cross_entropy_with_logits(xt, tt, weight=wt, pos_weight=pwt,
                                                  reduction="none")

    return _torch_call(fn, x, target, False, weight)


def torch_binary_cross_entropy(probs, target, weight=None, **_):
    import torch.nn.functional as F

    def fn(xt, tt, wt):
        return F.binary_cross_entropy(xt, tt, weight=wt, reduction="none")

    return _torch_call(fn, probs, target, False, weight, with_grad=False)


def torch_sigmoid_focal_loss(x, target, alpha=0.25, gamma=2.0, **_):
    """torchvision.ops.sigmoid_focal_loss, verbatim."""
    import torch
    import torch.nn.functional as F

    def fn(xt, tt, wt):
        p = torch.sigmoid(xt)
        ce = F.binary_cross_entropy_with_logits(xt, tt, reduction="none")
        p_t = p * tt + (1 - p) * (1 - tt)
        loss = ce * ((1 - p_t) ** gamma)
        if alpha >= 0:
            loss = (alpha * tt + (1 - alpha) * (1 - tt)) * loss
        return loss

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
