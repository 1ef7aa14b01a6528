"""Multi-device JAX operators: data parallelism over a device mesh (``jax.sharding``).

:func:`shard_operator` (``PytreeOperator.shard``) shards every batch along its samples over a
one-axis mesh and replicates the parameters, so one product runs on every device and XLA sums
the contributions: the JAX counterpart of ``torch_backend/_distributed.py``'s all-reduce.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

__all__ = ["shard_operator"]


def shard_operator(op: Any, devices: Any = None) -> Any:
    """Spread ``op``'s products over ``devices`` (default all of ``jax.devices()``), in place;
    returns ``op``. See :meth:`jax_backend.PytreeOperator.shard`."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("shard: no devices given")
    mesh = Mesh(np.array(devices), ("batch",))
    count = len(devices)
    replicated = NamedSharding(mesh, PartitionSpec())
    split = NamedSharding(mesh, PartitionSpec(None, "batch"))

    def place(leaf: jax.Array) -> jax.Array:
        # group leaves are (num_batches, batch_size, ...): shard the sample axis
        ok = leaf.ndim >= 2 and leaf.shape[1] % count == 0
        return jax.device_put(leaf, split if ok else replicated)

    groups = tuple(jax.tree_util.tree_map(place, g) for g in op.dataset.groups)
    op.dataset = dataclasses.replace(op.dataset, groups=groups)
    op.params_flat = jax.device_put(op.params_flat, replicated)
    op._linearized = None  # recomputed on the mesh at the next product
    op.mesh = mesh
    op._like = jax.device_put(op._like, replicated)
    return op
