"""Data for the JAX operators: one batch or an iterable of batches, checked and grouped.

A *batch* is a pytree of arrays (an array, a tuple such as ``(inputs, targets)``, a dict,
a namedtuple) whose leaves all share the leading *batch dimension*. ``data`` given to an
operator is either

- one batch: an array, a ``tuple`` (including namedtuples) or a ``dict``/``Mapping``, or
- an iterable of batches: a ``list``, a generator, or any other iterable (a data loader).

The operators are *fixed*: every product sees the same samples, so the batches are read
once, converted to device arrays and kept. Batches of the same shape are stacked into a
*group*, so a whole-data-set product is one ``lax.scan`` per group inside one compiled
function; an unequal last batch simply forms its own group. Each batch enters with the
weight ``batch_size / num_samples``, so the result is the exact mean over all samples
(not a mean of batch means).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Dataset", "prepare_data", "is_single_batch", "path_name", "x64_enabled"]


def x64_enabled() -> bool:
    """True when ``jax_enable_x64`` is on (float64 arrays are possible)."""
    return bool(jax.config.read("jax_enable_x64"))


def path_name(path: tuple[Any, ...]) -> str:
    """A ``'.'``-joined name for a pytree key path: ``('params', 'Dense_0', 'kernel')`` ->
    ``"params.Dense_0.kernel"``.

    The separator is the one PyTorch's ``named_parameters()`` uses, so layer grouping
    (:func:`dualhess._per_layer.group_by_layer`: the name without its last component) sees
    the same structure for torch, linen and nnx models.
    """
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts) if parts else "<root>"


def is_single_batch(data: Any) -> bool:
    """True when ``data`` is one batch (array, tuple, dict) rather than an iterable of batches."""
    return hasattr(data, "shape") or isinstance(data, (tuple, Mapping))


def _to_device(leaf: Any, dtype: Any, where: str, name: str) -> jax.Array:
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        leaf = np.asarray(leaf)
    kind = np.dtype(leaf.dtype).kind
    if kind == "f" or jnp.issubdtype(leaf.dtype, jnp.floating):  # bfloat16's numpy kind is "V"
        return jnp.asarray(leaf, dtype=dtype)
    if kind in "iu" and np.dtype(leaf.dtype).itemsize == 8 and not x64_enabled():
        return jnp.asarray(np.asarray(leaf).astype(np.int32 if kind == "i" else np.uint32))
    if kind in "iub":
        return jnp.asarray(leaf)
    raise TypeError(
        f"{where}: data leaf {name!r} has dtype {leaf.dtype}; batches must hold numeric arrays"
    )


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Batches checked, moved to the device and stacked into groups of equal shape.

    Attributes
    ----------
    groups : tuple of pytrees
        One stacked pytree per distinct batch shape; leaves have shape
        ``(num_batches_in_group, batch_size, ...)``.
    weights : tuple of float
        The weight ``batch_size / num_samples`` of each batch in a group.
    batch_sizes : tuple of int
        The size of every batch, in the order given.
    first : pytree
        The first batch (unstacked), for shape checks.
    """

    groups: tuple[Any, ...]
    weights: tuple[float, ...]
    batch_sizes: tuple[int, ...]
    first: Any

    @property
    def num_samples(self) -> int:
        """The number of samples over all batches."""
        return int(sum(self.batch_sizes))

    @property
    def num_batches(self) -> int:
        return len(self.batch_sizes)

    def batches(self) -> list[tuple[float, Any]]:
        """Every batch (unstacked) with its weight, ``(weight, batch)`` as torch's
        ``Dataset.batches()``; for reference computations."""
        out = []
        for group, weight in zip(self.groups, self.weights):
            count = jax.tree_util.tree_leaves(group)[0].shape[0]
            for i in range(count):
                out.append((weight, jax.tree_util.tree_map(lambda a, i=i: a[i], group)))
        return out


def prepare_data(data: Any, dtype: Any, where: str) -> Dataset:
    """Check ``data`` and turn it into a :class:`Dataset`.

    Parameters
    ----------
    data : batch or iterable of batches
        See the module docstring for what counts as one batch.
    dtype : jnp dtype
        Floating leaves are cast to this dtype (the operator's); integer leaves (labels)
        keep their kind.
    where : str
        The caller's name, for error messages.

    Raises
    ------
    ValueError
        Empty data, an empty batch, leaves without a common leading batch dimension,
        a batch whose pytree structure or per-sample shapes differ from the first, or
        NaN/Inf in a floating leaf.

    Examples
    --------
    >>> import numpy as np, jax.numpy as jnp
    >>> x, y = np.ones((10, 3)), np.zeros(10, dtype=np.int32)
    >>> ds = prepare_data([(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])], jnp.float32, "demo")
    >>> ds.batch_sizes, ds.weights
    ((4, 4, 2), (0.4, 0.2))
    """
    if data is None:
        raise ValueError(f"{where}: data is None; pass one batch or an iterable of batches")
    if is_single_batch(data):
        raw_batches: Iterable[Any] = [data]
    elif isinstance(data, Iterable):
        raw_batches = data
    else:
        raise TypeError(
            f"{where}: data must be one batch (an array, tuple or dict of arrays) or an "
            f"iterable of batches, got {type(data).__name__}"
        )

    first_def = None
    first_sig: list[tuple[str, tuple[int, ...], Any]] | None = None
    first_batch = None
    by_signature: dict[Any, list[Any]] = {}
    sizes: list[int] = []
    for index, batch in enumerate(raw_batches):
        flat, treedef = jax.tree_util.tree_flatten_with_path(batch)
        if not flat:
            raise ValueError(f"{where}: batch {index} has no array leaves")
        names = [path_name(p) for p, _ in flat]
        leaves = [_to_device(leaf, dtype, where, name) for (_, leaf), name in zip(flat, names)]
        if first_def is None:
            first_def = treedef
        elif treedef != first_def:
            raise ValueError(
                f"{where}: batch {index} has pytree structure {treedef}, but the first batch "
                f"has {first_def}; every batch must have the same structure"
            )
        for name, leaf in zip(names, leaves):
            if leaf.ndim == 0:
                raise ValueError(
                    f"{where}: leaf {name!r} of batch {index} is a scalar; every leaf needs a "
                    "leading batch dimension"
                )
        lead = {name: int(leaf.shape[0]) for name, leaf in zip(names, leaves)}
        if len(set(lead.values())) != 1:
            hint = (
                " (a tuple or dict is read as ONE batch; pass a list for several batches)"
                if index == 0 and is_single_batch(data)
                else ""
            )
            raise ValueError(
                f"{where}: the leaves of batch {index} disagree on the batch size (leading "
                f"dimension): {lead}{hint}"
            )
        size = next(iter(lead.values()))
        if size == 0:
            raise ValueError(f"{where}: batch {index} is empty")
        sig = [(name, tuple(leaf.shape[1:]), leaf.dtype) for name, leaf in zip(names, leaves)]
        if first_sig is None:
            first_sig = sig
            first_batch = jax.tree_util.tree_unflatten(treedef, leaves)
        elif sig != first_sig:
            diff = [
                f"{a[0]!r}: {a[1]} {a[2]} vs first {b[1]} {b[2]}"
                for a, b in zip(sig, first_sig)
                if a != b
            ]
            raise ValueError(
                f"{where}: batch {index} differs from the first batch in per-sample shape or "
                f"dtype ({'; '.join(diff)})"
            )
        for name, leaf in zip(names, leaves):
            if jnp.issubdtype(leaf.dtype, jnp.floating) and not bool(jnp.all(jnp.isfinite(leaf))):
                raise ValueError(f"{where}: leaf {name!r} of batch {index} contains NaN or Inf")
        sizes.append(size)
        by_signature.setdefault(size, []).append(leaves)
    if not sizes:
        raise ValueError(f"{where}: data holds no batches")

    total = sum(sizes)
    groups, weights = [], []
    for size, members in by_signature.items():
        stacked = [jnp.stack(column) for column in zip(*members)]
        groups.append(jax.tree_util.tree_unflatten(first_def, stacked))
        weights.append(size / total)
    return Dataset(tuple(groups), tuple(weights), tuple(sizes), first_batch)
