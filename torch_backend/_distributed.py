"""``torch.distributed`` support: one operator over the shards of every rank.

When a process group is initialised (``torch.distributed.init_process_group``, e.g. under
``torchrun``), every torch curvature operator treats ``data`` as *this rank's shard*:

* the number of samples ``N`` and the loss's normaliser ``M = sum_b m_b`` (samples, kept
  labels, class-weight sums: :mod:`torch_backend._data`) are sums over the ranks, so batch
  weights (``m_b / M`` for ``reduction="mean"``) are those of the whole data set, uneven
  shards and unevenly padded labels included;
* each product is computed on the local shard and summed over ranks with ``all_reduce``,
  so every rank holds the product of the whole-data-set operator.

The algorithms then run identically on every rank (the same seed draws the same probes in
numpy), and return the same numbers on every rank. Write reports on rank 0 only
(:func:`is_main_process`). Works with the gloo (CPU) and NCCL (GPU) backends.

With a ``DistributedDataParallel`` model pass ``ddp_model.module`` (the wrapped module; DDP's
own forward synchronises gradients and must not be used for curvature products) — or the DDP
object itself, which is unwrapped for you.

Examples
--------
Launch with ``torchrun --nproc_per_node=2 script.py``::

    import torch.distributed as dist
    dist.init_process_group("gloo")
    shard = [(X[i::world], y[i::world]) for i in [dist.get_rank()]]   # this rank's samples
    op = torch_backend.hessian(model, torch.nn.CrossEntropyLoss(), shard)
    top = dualhess.eigsh(op, k=5, seed=0)          # identical on every rank
    if is_main_process():
        print(top.values)
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["active_group", "all_reduce_sum", "is_main_process", "unwrap_ddp"]


def active_group(group: Any = None) -> Any:
    """The process group to reduce over, or ``None`` when not running distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if torch.distributed.get_world_size(group) == 1:
        return None
    return torch.distributed.group.WORLD if group is None else group


def all_reduce_sum(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum ``tensor`` over the ranks of ``group`` (in place, returned for chaining)."""
    if group is not None:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_scalar(value: float, group: Any, dtype: torch.dtype, device: Any) -> float:
    """Sum a Python number over the ranks of ``group``."""
    if group is None:
        return value
    t = torch.tensor([value], dtype=dtype, device=device)
    return float(all_reduce_sum(t, group)[0])


def is_main_process() -> bool:
    """True on rank 0, or when not running distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return True


def unwrap_ddp(model: Any) -> Any:
    """``model.module`` for a ``DistributedDataParallel`` (or ``DataParallel``) wrapper."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model
