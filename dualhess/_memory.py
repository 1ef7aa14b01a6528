"""``chunk_size="auto"``, the framework-neutral part: free host memory and the chunk rule.

A backend measures two numbers for its own products: the bytes of a product of one column
and of two columns (torch: CUDA statistics or the process's resident-set high-water mark;
JAX: XLA's memory analysis of the compiled product). From them, and the free memory of the
device, :func:`chunk_for_memory` picks the largest chunk that fits with 20% head-room:
peak memory of ``matmat`` is then about ``chunk_size`` times one product, never ``k`` times.

Examples
--------
>>> from dualhess._memory import chunk_for_memory
>>> chunk_for_memory(one=150, two=250, free=1000, vector_bytes=8, n=100)
7
"""

from __future__ import annotations

import os

__all__ = ["HEADROOM", "host_available_memory", "chunk_for_memory"]

#: Fraction of the free memory a chunk may use.
HEADROOM = 0.8


def host_available_memory() -> int:
    """Bytes of host memory available to a new allocation (Linux: ``MemAvailable``)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    try:  # pragma: no cover - not Linux
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 2**31


def chunk_for_memory(
    *, one: int, two: int, free: int, vector_bytes: int, n: int, max_chunk: int | None = None
) -> int:
    """The largest chunk whose product fits in ``HEADROOM * free`` bytes.

    ``one`` and ``two`` are the measured bytes of products of one and two columns: their
    difference is the per-column cost (at least four vectors of ``n``, ``vector_bytes``
    each), the rest of ``one`` is fixed. The chunk is at least 1 and at most ``n`` (or
    ``max_chunk``).
    """
    per_column = max(two - one, 4 * vector_bytes)
    fixed = max(one - per_column, 0)
    budget = HEADROOM * free - fixed
    upper = n if max_chunk is None else min(n, max_chunk)
    return int(max(1, min(upper, budget // per_column)))
