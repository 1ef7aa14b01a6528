"""Array-API helpers shared by the algorithms.

The algorithms in :mod:`dualhess` never import a framework. They take the namespace of
the vectors they are given (``array_namespace``) and move small results to numpy float64
for dense work on the host. This module is the only place that knows how to turn a
native array into numpy and back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from array_api_compat import array_namespace, device, is_array_api_obj

__all__ = [
    "array_namespace",
    "device",
    "is_array_api_obj",
    "to_numpy",
    "from_numpy",
    "default_rng",
    "is_float64",
    "dtype_name",
]


def to_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a numpy array on the host (copying from a GPU when needed)."""
    if isinstance(x, np.ndarray):
        return x
    detach = getattr(x, "detach", None)
    if detach is not None:  # torch: leave autograd, leave the device
        return detach().cpu().numpy()
    return np.asarray(x)


def from_numpy(x: np.ndarray, like: Any) -> Any:
    """Convert a numpy array to the namespace, dtype and device of the array ``like``."""
    if isinstance(like, np.ndarray):
        return np.asarray(x, dtype=like.dtype)
    xp = array_namespace(like)
    return xp.asarray(np.ascontiguousarray(x), dtype=like.dtype, device=device(like))


def default_rng(seed: Any) -> np.random.Generator:
    """Turn ``seed`` (an int, a ``numpy.random.Generator`` or None) into a Generator.

    ``None`` is truly random (fresh OS entropy); a Generator is used as it is, so a caller
    can thread one generator through several calls.
    """
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None or isinstance(seed, (int, np.integer)):
        return np.random.default_rng(seed)
    raise TypeError(
        f"seed must be an int, a numpy.random.Generator or None, got {type(seed).__name__}"
    )


def dtype_name(dtype: Any) -> str:
    """A short, framework-neutral name for a dtype: 'float64', 'float32', ..."""
    name = str(dtype)
    for prefix in ("torch.", "dtype(", "<class 'numpy.", "'"):
        name = name.replace(prefix, "")
    return name.strip("')>")


def is_float64(dtype: Any) -> bool:
    """True when ``dtype`` is a 64-bit float in any framework."""
    return dtype_name(dtype) in ("float64", "double")
