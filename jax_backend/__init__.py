"""dualhess JAX/Flax backend: Hessian and GGN operators over pytrees, Flax adapters.

Everything here imports jax (and, inside the Flax adapters, flax); the framework-neutral
algorithms live in :mod:`dualhess` and take these operators directly.

Examples
--------
>>> import jax.numpy as jnp, numpy as np, dualhess
>>> from jax_backend import hessian
>>> x = np.ones((5, 3), dtype=np.float32)
>>> op = hessian(lambda w, batch: jnp.mean((batch @ w) ** 2), jnp.zeros(3), x)
>>> isinstance(op, dualhess.Operator), op.n
(True, 3)
"""

from __future__ import annotations

from ._curvature import GGNOperator, ggn
from ._data import Dataset, prepare_data
from ._flax import from_linen, from_nnx
from ._hessian import (
    DEFAULT_DENSE_HESSIAN_LIMIT,
    HessianOperator,
    PytreeOperator,
    dense_hessian,
    hessian,
    reduce_loss,
)
from ._input import InputHessianOperator, input_hessian
from ._sharding import ParamPlacement, ParamShardingError, shard_largest_axis
from .monitor import HessianMonitor
from .twin import Twin, UnsupportedOpError, batch_from_torch, from_torch, loss_from_torch

__all__ = [
    "from_torch",
    "Twin",
    "UnsupportedOpError",
    "loss_from_torch",
    "batch_from_torch",
    "HessianMonitor",
    "hessian",
    "ggn",
    "dense_hessian",
    "from_linen",
    "from_nnx",
    "HessianOperator",
    "GGNOperator",
    "PytreeOperator",
    "Dataset",
    "prepare_data",
    "reduce_loss",
    "DEFAULT_DENSE_HESSIAN_LIMIT",
    "input_hessian",
    "InputHessianOperator",
    "shard_largest_axis",
    "ParamPlacement",
    "ParamShardingError",
]
