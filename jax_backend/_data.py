"""Data for the JAX operators: one batch or an iterable of batches, checked and grouped.

A *batch* is a pytree of arrays (an array, a tuple such as ``(inputs, targets)``, a dict,
a namedtuple) whose leaves all share the leading *batch dimension*. ``data`` given to an
operator is either

- one batch: an array, a ``tuple`` (including namedtuples) or a ``dict``/``Mapping``, or
- an iterable of batches: a ``list``, a generator, or any other iterable (a data loader).

The operators are *fixed*: every product sees the same samples, so the batches are read
once, converted to device arrays and kept. Batches of the same shape are stacked into a
*group*, so a whole-data-set product is one ``lax.scan`` per group inside one compiled
function; an unequal last batch simply forms its own group.

**The loss's normaliser.** The whole-data-set loss is ``sum_b sum_i l_bi / sum_b m_b``, where
``m_b`` is what batch ``b``'s loss divides by: its number of samples by default, the count
returned by a ``normalizer=`` function (kept tokens under a mask, the sum of class weights), or
the second element of a loss that returns ``(loss_sum, normalizer)``. Each batch therefore
enters with the weight ``m_b / sum m`` (a batch-mean loss) or ``1 / sum m`` (a loss that
returns its sum), so the result is the exact loss of the whole data set, not a mean of batch
means. A batch whose normaliser is 0 (every label masked) contributes nothing and is left
out of the products (its mean would be 0/0). The weights are per batch, so a group of
equally shaped batches is scanned together with an array of its batches' weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Dataset",
    "prepare_data",
    "is_single_batch",
    "path_name",
    "x64_enabled",
    "check_normalizers",
]


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


def check_normalizers(values: Any, where: str) -> tuple[float, ...]:
    """Check per-batch normalisers: finite, non-negative numbers with a positive sum.

    Examples
    --------
    >>> check_normalizers([3, 0, 2.5], "demo")
    (3.0, 0.0, 2.5)
    """
    out = []
    for index, value in enumerate(values):
        try:
            number = float(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{where}: the normalizer of batch {index} is {value!r}, not a number (it must be "
                "what the batch's loss divides by: a count of kept labels, a sum of weights)"
            ) from err
        if not np.isfinite(number) or number < 0:
            raise ValueError(
                f"{where}: the normalizer of batch {index} is {number}; it must be a finite "
                "number >= 0 (what the batch's loss divides by: kept labels, a sum of weights)"
            )
        out.append(number)
    if not out or sum(out) <= 0:
        raise ValueError(
            f"{where}: the normalizers sum to {sum(out)} over the data (every label masked?); "
            "the whole-data-set loss sum_b loss_sum_b / sum_b normalizer_b is undefined (a "
            "loss returning a pair is read as (loss_sum, normalizer): auxiliary outputs are "
            "not supported)"
        )
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Batches checked, moved to the device and stacked into groups of equal shape.

    Attributes
    ----------
    groups : tuple of pytrees
        One stacked pytree per distinct batch shape; leaves have shape
        ``(num_batches_in_group, batch_size, ...)``. Batches whose normaliser is 0 are left
        out (they contribute nothing).
    group_weights : tuple of numpy arrays
        For each group, the weight of each of its batches in the whole-data-set sum:
        ``m_b / sum m`` for a loss that is a mean over ``m_b``, ``1 / sum m`` for a loss that
        returns its sum (``summed``).
    batch_sizes : tuple of int
        The size of every batch, in the order given.
    first : pytree
        The first batch (unstacked), for shape checks.
    normalizers : tuple of float
        What each batch's loss divides by (``m_b``), in the order given; by default the
        batch sizes.
    summed : bool
        True when the loss returns ``(loss_sum, normalizer)``: the operator divides the sums
        once by :attr:`total_normalizer`.
    group_index : tuple of tuple of int
        For each group, the positions (in the order given) of its batches.
    """

    groups: tuple[Any, ...]
    group_weights: tuple[np.ndarray, ...]
    batch_sizes: tuple[int, ...]
    first: Any
    normalizers: tuple[float, ...] = ()
    summed: bool = False
    group_index: tuple[tuple[int, ...], ...] = ()

    @property
    def num_samples(self) -> int:
        """The number of samples over all batches."""
        return int(sum(self.batch_sizes))

    @property
    def num_batches(self) -> int:
        return len(self.batch_sizes)

    @property
    def total_normalizer(self) -> float:
        """``sum_b m_b``: what the whole-data-set loss divides by."""
        return float(sum(self.normalizers))

    @property
    def weights(self) -> tuple[float, ...]:
        """The weight of every batch in the order given (0 for a batch left out)."""
        out = [0.0] * self.num_batches
        for index, weights in zip(self.group_index, self.group_weights):
            for position, weight in zip(index, weights):
                out[position] = float(weight)
        return tuple(out)

    def batches(self) -> list[tuple[float, Any]]:
        """Every kept batch (unstacked) with its weight, ``(weight, batch)`` as torch's
        ``Dataset.batches()``; for reference computations."""
        out = []
        for group, weights in zip(self.groups, self.group_weights):
            for i, weight in enumerate(weights):
                out.append((float(weight), jax.tree_util.tree_map(lambda a, i=i: a[i], group)))
        return out

    def all_batches(self) -> list[Any]:
        """Every batch held (unstacked), in the order given."""
        out: list[Any] = [None] * len(self.batch_sizes)
        for group, index in zip(self.groups, self.group_index):
            for i, position in enumerate(index):
                out[position] = jax.tree_util.tree_map(lambda a, i=i: a[i], group)
        return out

    def with_normalizers(self, values: Any, *, summed: bool, where: str) -> Dataset:
        """This data set with the loss's normalisers ``values`` (one per batch, in the order
        given): weights ``m_b / sum m`` (``summed=False``) or ``1 / sum m``; batches whose
        normaliser is 0 are dropped from the groups."""
        if len(self.group_index) and any(
            len(index) != _group_length(group)
            for index, group in zip(self.group_index, self.groups)
        ):  # pragma: no cover - normalisers are set once, on the full data set
            raise AssertionError("with_normalizers: batches were already dropped")
        values = check_normalizers(values, where)
        if len(values) != self.num_batches:
            raise ValueError(
                f"{where}: {len(values)} normalizers for {self.num_batches} batches"
            )
        total = sum(values)
        groups, group_weights, group_index = [], [], []
        for group, index in zip(self.groups, self.group_index):
            keep = [i for i, position in enumerate(index) if values[position] > 0]
            if not keep:
                continue
            if len(keep) < len(index):
                rows = np.asarray(keep)
                group = jax.tree_util.tree_map(lambda leaf, rows=rows: leaf[rows], group)
            kept = tuple(index[i] for i in keep)
            scale = [1.0 if summed else values[p] for p in kept]
            groups.append(group)
            group_weights.append(np.asarray(scale, dtype=np.float64) / total)
            group_index.append(kept)
        return dataclasses.replace(
            self,
            groups=tuple(groups),
            group_weights=tuple(group_weights),
            group_index=tuple(group_index),
            normalizers=values,
            summed=summed,
        )


def _group_length(group: Any) -> int:
    return int(jax.tree_util.tree_leaves(group)[0].shape[0])


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
    >>> ds.batch_sizes, ds.weights, ds.total_normalizer
    ((4, 4, 2), (0.4, 0.4, 0.2), 10.0)
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
    positions: dict[Any, list[int]] = {}
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
        positions.setdefault(size, []).append(index)
    if not sizes:
        raise ValueError(f"{where}: data holds no batches")

    total = sum(sizes)
    groups, weights = [], []
    for size, members in by_signature.items():
        stacked = [jnp.stack(column) for column in zip(*members)]
        groups.append(jax.tree_util.tree_unflatten(first_def, stacked))
        weights.append(np.full(len(members), size / total))
    return Dataset(
        tuple(groups),
        tuple(weights),
        tuple(sizes),
        first_batch,
        normalizers=tuple(float(size) for size in sizes),
        summed=False,
        group_index=tuple(tuple(positions[size]) for size in by_signature),
    )
