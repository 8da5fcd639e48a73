"""Floating-point types cestudy accepts, and how each is computed.

float64 and float32 are computed natively (the CPU kernels use float64 arithmetic internally and
round once); float16 and bfloat16 (from ml_dtypes) are computed with float32 kernels and the
result is rounded to the input dtype, as the public API documents.
"""

import ml_dtypes
import numpy as np

bfloat16 = np.dtype(ml_dtypes.bfloat16)
float16 = np.dtype(np.float16)
float32 = np.dtype(np.float32)
float64 = np.dtype(np.float64)

SUPPORTED = {"float64": float64, "float32": float32, "float16": float16, "bfloat16": bfloat16}
DTYPE_NAMES = tuple(SUPPORTED)


def dtype_from_name(name):
    """np.dtype for one of ``DTYPE_NAMES``; ValueError naming the allowed names otherwise."""
    try:
        return SUPPORTED[str(name)]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; allowed: {', '.join(DTYPE_NAMES)}") from None


def dtype_name(dtype):
    dtype = np.dtype(dtype)
    for name, dt in SUPPORTED.items():
        if dt == dtype:
            return name
    return dtype.name


_SUPPORTED_SET = frozenset(SUPPORTED.values())


def is_float_dtype(dtype):
    """Whether ``dtype`` is one of the supported floating dtypes (a set lookup: it runs on every
    array argument of every call)."""
    return np.dtype(dtype) in _SUPPORTED_SET


def working_dtype(dtype):
    """The dtype the kernels compute in for an input of ``dtype``: float16/bfloat16 -> float32."""
    dtype = np.dtype(dtype)
    return float64 if dtype == float64 else float32


def finfo(dtype):
    """np.finfo that also knows bfloat16."""
    dtype = np.dtype(dtype)
    if dtype == bfloat16:
        return ml_dtypes.finfo(ml_dtypes.bfloat16)
    return np.finfo(dtype)


def mantissa_bits(dtype):
    """Precision p in bits (including the implicit bit): 53, 24, 11, 8."""
    return int(finfo(dtype).nmant) + 1


def unit_roundoff(dtype):
    return 2.0 ** (-mantissa_bits(dtype))
