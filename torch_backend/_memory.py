"""``chunk_size="auto"``: the largest column chunk whose products fit in free memory.

Peak memory of ``matmat`` is about ``chunk_size`` times that of one Hessian-vector product
(plus a fixed part: the model, the data, the first-order graph). The per-column cost is
*measured*: one product of 1 column and one of 2 columns, their peak memory above the baseline
(``torch.cuda.max_memory_allocated`` on CUDA; the process's resident-set high-water mark,
reset through ``/proc/self/clear_refs``, on the CPU under Linux). The chunk is then
``(free - fixed) / per_column`` with 20% head-room, at least 1 and at most ``n``
(:func:`dualhess._memory.chunk_for_memory`, shared with the JAX backend).
"""

from __future__ import annotations

from typing import Any

import torch

from dualhess._memory import chunk_for_memory, host_available_memory

__all__ = ["auto_chunk_size", "free_memory", "resolve_auto_chunk"]


def free_memory(device: torch.device) -> int:
    """Free bytes on ``device`` (CUDA: ``mem_get_info``; CPU: the host's MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return host_available_memory()


def _rss_peak_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak resident set size (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _peak_of(product: Any, V: torch.Tensor, device: torch.device) -> int:
    """Bytes above the baseline at the peak of ``product(V)``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        product(V)
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    if not _rss_peak_reset():
        raise RuntimeError("cannot measure peak memory on this platform")
    base = _status("VmRSS")
    product(V)
    return max(int(_status("VmHWM") - base), 0)


def auto_chunk_size(op: Any, *, max_chunk: int | None = None) -> int:
    """Measure one product's memory and return the largest chunk that fits.

    Parameters
    ----------
    op : torch_backend.TorchCurvatureOperator
        Its raw ``_matmat`` is measured (2 + 3 columns of products, not counted).
    max_chunk : int, optional
        An upper bound (default ``n``).
    """
    device = op.dataset.device
    n = op.n
    product = op._matmat
    generator = torch.Generator().manual_seed(0)
    V = torch.randn(n, 2, dtype=op.dtype, generator=generator).to(device)
    product(V[:, :1])  # warm-up: caches, lazily built graphs
    one = _peak_of(product, V[:, :1], device)
    two = _peak_of(product, V, device)
    return chunk_for_memory(
        one=one, two=two, free=free_memory(device), vector_bytes=n * V.element_size(), n=n,
        max_chunk=max_chunk,
    )


def resolve_auto_chunk(op: Any, chunk_size: Any) -> None:
    """Set ``op.chunk_size`` from a measurement when the caller asked for ``"auto"``."""
    if chunk_size == "auto":
        op.chunk_size = auto_chunk_size(op)
