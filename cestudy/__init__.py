"""cestudy: cross-entropy under a microscope.

Accurate, fast Numba kernels for the common cross-entropy variants with PyTorch's semantics,
the baseline formulations they are compared with, a high-precision oracle, and the study runner
and reports that measure them. See README.md for a tour.
"""

from . import losses
from .linear import linear_cross_entropy, linear_cross_entropy_with_grad
from .losses import *  # noqa: F403  (the public functions: losses.__all__)

__version__ = "0.2.0"

__all__ = list(losses.__all__) + ["linear_cross_entropy", "linear_cross_entropy_with_grad"]
