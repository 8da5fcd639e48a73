"""cestudy: cross-entropy under a microscope.

Accurate, fast Numba kernels for the common cross-entropy variants with PyTorch's semantics,
the baseline formulations they are compared with, a high-precision oracle, and the study runner
and reports that measure them. See README.md for a tour.
"""
from .losses import (
    binary_cross_entropy,
    binary_cross_entropy_with_logits,
    binary_cross_entropy_with_logits_with_grad,
    cross_entropy,
    cross_entropy_with_grad,
    entropy,
    kl_divergence,
    kl_divergence_with_grad,
    log_softmax,
    logsumexp,
    sigmoid_focal_loss,
    sigmoid_focal_loss_with_grad,
    softmax,
    softmax_focal_loss,
    softmax_focal_loss_with_grad,
)

__version__ = "0.1.0"

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "binary_cross_entropy_with_logits_with_grad",
    "cross_entropy",
    "cross_entropy_with_grad",
    "entropy",
    "kl_divergence",
    "kl_divergence_with_grad",
    "log_softmax",
    "logsumexp",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_with_grad",
    "softmax",
    "softmax_focal_loss",
    "softmax_focal_loss_with_grad",
]
