"""Small helpers the rule families share: torch dtypes in JAX, dims, matmul precision."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._registry import RuleError

HIGHEST = lax.Precision.HIGHEST

_DTYPES = {
    "float64": jnp.float64, "float32": jnp.float32, "float16": jnp.float16,
    "bfloat16": jnp.bfloat16, "int64": jnp.int64, "int32": jnp.int32, "int16": jnp.int16,
    "int8": jnp.int8, "uint8": jnp.uint8, "bool": jnp.bool_,
}


def jax_dtype(dtype: Any) -> Any:
    """A torch dtype (or None) as a JAX dtype (canonicalised: int64 is int32 without x64)."""
    if dtype is None:
        return None
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise RuleError(f"dtype {dtype} is not supported")
    return jax.dtypes.canonicalize_dtype(_DTYPES[name])


def ntuple(value: Any, n: int) -> tuple[int, ...]:
    """``2 -> (2, 2)``, ``[3] -> (3, 3)``, ``[1, 2] -> (1, 2)``."""
    if isinstance(value, (tuple, list)):
        if len(value) == 1 and n > 1:
            return (int(value[0]),) * n
        if len(value) != n:
            raise RuleError(f"expected {n} values, got {tuple(value)}")
        return tuple(int(v) for v in value)
    return (int(value),) * n


def axes(dim: Any, ndim: int) -> tuple[int, ...] | None:
    """Torch's ``dim`` argument (int, list, None or []) as non-negative axes; None = all."""
    if dim is None:
        return None
    if isinstance(dim, (tuple, list)):
        if len(dim) == 0:
            return None
        return tuple(int(d) % max(ndim, 1) for d in dim)
    return (int(dim) % max(ndim, 1),)


def asarray(x: Any) -> Any:
    """A rule argument as an array (Python scalars become weakly typed 0-d arrays)."""
    return x if hasattr(x, "dtype") and hasattr(x, "shape") else jnp.asarray(x)


def float_dtype_of(*xs: Any) -> Any:
    """The floating dtype of the first floating array among ``xs`` (default float)."""
    for x in xs:
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            return x.dtype
    return jnp.result_type(float)


def static_shape(shape: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in shape)


__all__ = ["HIGHEST", "jax_dtype", "ntuple", "axes", "asarray", "float_dtype_of",
           "static_shape", "np"]
