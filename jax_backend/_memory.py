"""``chunk_size="auto"`` for JAX operators: free device memory.

The per-column cost of a product is read from XLA's memory analysis of the compiled product
(``PytreeOperator.auto_chunk_size``); the chunk rule is the core's
(:func:`dualhess._memory.chunk_for_memory`), shared with the torch backend.
"""

from __future__ import annotations

import jax

from dualhess._memory import host_available_memory

__all__ = ["free_device_memory"]


def free_device_memory() -> int:
    """Free bytes on JAX's default device: ``bytes_limit - bytes_in_use`` where the device
    reports them (GPU, TPU), else the host's MemAvailable (CPU)."""
    stats = jax.devices()[0].memory_stats()
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return host_available_memory()
