"""Indexing and view ATen rules: reshapes, permutations, slices, gathers, scatters,
concatenation, padding, embedding lookups and triangular masks.

JAX arrays are values, so every view is a copy with the view's shape; the functional graph
``torch.export`` produces has no aliasing left for a view to observe.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ._common import static_shape
from ._registry import RuleError, rule

_F = "index"


def _shape(x: Any, size: Any) -> tuple[int, ...]:
    return static_shape(size)


@rule("aten.view.default", "aten._unsafe_view.default", "aten.reshape.default",
      "aten.view_copy.default", family=_F)
def view(x: Any, size: Any) -> Any:
    return jnp.reshape(x, _shape(x, size))


@rule("aten.permute.default", "aten.permute_copy.default", family=_F)
def permute(x: Any, dims: Any) -> Any:
    return jnp.transpose(x, tuple(int(d) % x.ndim for d in dims))


@rule("aten.transpose.int", family=_F)
def transpose(x: Any, dim0: int, dim1: int) -> Any:
    return jnp.swapaxes(x, dim0, dim1) if x.ndim else x


@rule("aten.t.default", family=_F)
def t(x: Any) -> Any:
    return x.T


@rule("aten.expand.default", "aten.expand_copy.default", family=_F)
def expand(x: Any, size: Any, *, implicit: bool = False) -> Any:
    size = static_shape(size)
    lead = len(size) - x.ndim
    target = tuple(x.shape[i - lead] if s == -1 else s for i, s in enumerate(size))
    return jnp.broadcast_to(x, target)


@rule("aten.unsqueeze.default", "aten.unsqueeze_copy.default", family=_F)
def unsqueeze(x: Any, dim: int) -> Any:
    return jnp.expand_dims(x, int(dim) % (x.ndim + 1))


@rule("aten.squeeze.dims", "aten.squeeze.dim", "aten.squeeze_copy.dims", family=_F)
def squeeze_dims(x: Any, dim: Any) -> Any:
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    if x.ndim == 0:
        return x
    keep = tuple(sorted({int(d) % x.ndim for d in dims if x.shape[int(d)] == 1}))
    return jnp.squeeze(x, axis=keep) if keep else x


@rule("aten.squeeze.default", family=_F)
def squeeze(x: Any) -> Any:
    return jnp.squeeze(x)


@rule("aten.slice.Tensor", "aten.slice_copy.Tensor", family=_F)
def slice_(x: Any, dim: int = 0, start: Any = None, end: Any = None, step: int = 1) -> Any:
    index = [slice(None)] * x.ndim
    size = x.shape[int(dim)]
    start = 0 if start is None else max(min(int(start), size), -size)
    end = size if end is None else max(min(int(end), size), -size)
    index[int(dim)] = slice(start, end, int(step))
    return x[tuple(index)]


@rule("aten.select.int", "aten.select_copy.int", family=_F)
def select(x: Any, dim: int, index: int) -> Any:
    return jnp.take(x, int(index), axis=int(dim))


@rule("aten.narrow.default", family=_F)
def narrow(x: Any, dim: int, start: int, length: int) -> Any:
    return lax.slice_in_dim(x, int(start) % x.shape[dim], int(start) % x.shape[dim] + length,
                            axis=int(dim))


def _index_tuple(indices: Any) -> tuple[Any, ...]:
    out = []
    for item in indices:
        if item is None:
            out.append(slice(None))
        elif item.dtype == jnp.bool_:
            raise RuleError("boolean-mask indexing has a data-dependent shape; use "
                            "torch.where instead")
        else:
            out.append(item)
    return tuple(out)


@rule("aten.index.Tensor", family=_F)
def index(x: Any, indices: Any) -> Any:
    return x[_index_tuple(indices)]  # numpy's rule for the placement of advanced indices


@rule("aten.index_put.default", family=_F)
def index_put(x: Any, indices: Any, values: Any, accumulate: bool = False) -> Any:
    ref = x.at[_index_tuple(indices)]
    return ref.add(values) if accumulate else ref.set(values)


@rule("aten.index_select.default", family=_F)
def index_select(x: Any, dim: int, index_: Any) -> Any:
    return jnp.take(x, index_, axis=int(dim))


@rule("aten.gather.default", family=_F)
def gather(x: Any, dim: int, index_: Any, *, sparse_grad: bool = False) -> Any:
    dim = int(dim) % max(x.ndim, 1)
    if x.ndim:  # torch allows an index smaller than the input in the other dims
        x = x[tuple(slice(None) if d == dim else slice(0, index_.shape[d])
                    for d in range(x.ndim))]
    return jnp.take_along_axis(x, index_, axis=dim)


def _scatter_index(x: Any, dim: int, index_: Any) -> tuple[Any, ...]:
    dim = int(dim) % x.ndim
    grids = jnp.meshgrid(*[jnp.arange(s) for s in index_.shape], indexing="ij")
    grids[dim] = index_
    return tuple(grids)


@rule("aten.scatter.src", "aten.scatter.value", family=_F)
def scatter(x: Any, dim: int, index_: Any, src: Any) -> Any:
    if hasattr(src, "shape") and src.ndim:
        src = src[tuple(slice(0, s) for s in index_.shape)]
    return x.at[_scatter_index(x, dim, index_)].set(src)


@rule("aten.scatter_add.default", family=_F)
def scatter_add(x: Any, dim: int, index_: Any, src: Any) -> Any:
    src = src[tuple(slice(0, s) for s in index_.shape)]
    return x.at[_scatter_index(x, dim, index_)].add(src)


@rule("aten.slice_scatter.default", family=_F)
def slice_scatter(x: Any, src: Any, dim: int = 0, start: Any = None, end: Any = None,
                  step: int = 1) -> Any:
    index_ = [slice(None)] * x.ndim
    index_[int(dim)] = slice(start, end, step)
    return x.at[tuple(index_)].set(src)


@rule("aten.select_scatter.default", family=_F)
def select_scatter(x: Any, src: Any, dim: int, index_: int) -> Any:
    idx = [slice(None)] * x.ndim
    idx[int(dim)] = int(index_)
    return x.at[tuple(idx)].set(src)


@rule("aten.cat.default", family=_F)
def cat(tensors: Any, dim: int = 0) -> Any:
    # torch skips legacy empty 1-D tensors in cat
    tensors = [t for t in tensors if not (t.ndim == 1 and t.shape[0] == 0)] or list(tensors)
    return jnp.concatenate(tensors, axis=int(dim) % tensors[0].ndim)


@rule("aten.stack.default", family=_F)
def stack(tensors: Any, dim: int = 0) -> Any:
    return jnp.stack(list(tensors), axis=int(dim) % (tensors[0].ndim + 1))


@rule("aten.split_with_sizes.default", "aten.split_with_sizes_copy.default", family=_F)
def split_with_sizes(x: Any, split_sizes: Any, dim: int = 0) -> Any:
    dim = int(dim) % x.ndim
    out, start = [], 0
    for size in split_sizes:
        out.append(lax.slice_in_dim(x, start, start + int(size), axis=dim))
        start += int(size)
    return out


@rule("aten.split.Tensor", "aten.split_copy.Tensor", family=_F)
def split(x: Any, split_size: int, dim: int = 0) -> Any:
    total = x.shape[int(dim)]
    sizes = [min(int(split_size), total - s) for s in range(0, total, int(split_size))]
    return split_with_sizes(x, sizes or [0], dim)


@rule("aten.unbind.int", family=_F)
def unbind(x: Any, dim: int = 0) -> Any:
    return [jnp.take(x, i, axis=int(dim)) for i in range(x.shape[int(dim)])]


@rule("aten.flip.default", family=_F)
def flip(x: Any, dims: Any) -> Any:
    return jnp.flip(x, axis=tuple(int(d) for d in dims))


@rule("aten.roll.default", family=_F)
def roll(x: Any, shifts: Any, dims: Any = ()) -> Any:
    if not dims:
        return jnp.roll(x.reshape(-1), tuple(shifts)).reshape(x.shape)
    return jnp.roll(x, tuple(shifts), axis=tuple(dims))


@rule("aten.repeat.default", family=_F)
def repeat(x: Any, repeats: Any) -> Any:
    repeats = static_shape(repeats)
    x = x.reshape((1,) * (len(repeats) - x.ndim) + x.shape)
    return jnp.tile(x, repeats)


@rule("aten.constant_pad_nd.default", family=_F)
def constant_pad_nd(x: Any, pad: Any, value: Any = 0) -> Any:
    pad = [int(p) for p in pad]
    config = [(0, 0, 0)] * x.ndim
    for i in range(len(pad) // 2):  # pairs from the last dim backwards; negative = crop
        config[x.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1], 0)
    return lax.pad(x, jnp.asarray(value, x.dtype), config)


def _mode_pad(mode: str, nd: int) -> Any:
    def fn(x: Any, padding: Any) -> Any:
        pad = [int(p) for p in padding]
        widths = [(0, 0)] * x.ndim
        for i in range(nd):
            widths[x.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1])
        return jnp.pad(x, widths, mode=mode)

    return fn


for _nd in (1, 2, 3):
    rule(f"aten.reflection_pad{_nd}d.default", family=_F)(_mode_pad("reflect", _nd))
    rule(f"aten.replication_pad{_nd}d.default", family=_F)(_mode_pad("edge", _nd))


@rule("aten.embedding.default", family=_F)
def embedding(weight: Any, indices: Any, padding_idx: int = -1,
              scale_grad_by_freq: bool = False, sparse: bool = False) -> Any:
    if scale_grad_by_freq:
        raise RuleError("scale_grad_by_freq=True changes the gradient")
    if padding_idx is not None and padding_idx >= 0:
        # torch sends no gradient into the padding row: hold it constant
        row = jnp.arange(weight.shape[0]) == padding_idx
        weight = jnp.where(row[:, None], lax.stop_gradient(weight), weight)
    return jnp.take(weight, indices, axis=0)


@rule("aten._embedding_bag.default", "aten._embedding_bag_forward_only.default", family=_F)
def embedding_bag(weight: Any, indices: Any, offsets: Any, scale_grad_by_freq: bool = False,
                  mode: int = 0, sparse: bool = False, per_sample_weights: Any = None,
                  include_last_offset: bool = False, padding_idx: int = -1) -> Any:
    """``nn.EmbeddingBag``: rows of ``weight`` reduced per bag (0 sum, 1 mean, 2 max).

    Bag ``b`` holds ``indices[offsets[b]:offsets[b + 1]]``; entries equal to ``padding_idx``
    are left out (of the sum and of a mean's count); an empty bag gives zeros, as in torch.
    Only the bags are returned: torch's ``offset2bag``, ``bag_size`` and ``max_indices``
    serve its backward, which JAX derives itself (``None`` here).
    """
    if scale_grad_by_freq:
        raise RuleError("scale_grad_by_freq=True changes the gradient")
    if mode not in (0, 1, 2):
        raise RuleError(f"mode={mode} (0 sum, 1 mean, 2 max)")
    if per_sample_weights is not None and mode != 0:
        raise RuleError("per_sample_weights with a mode other than sum")
    indices = jnp.reshape(indices, (-1,))
    num_bags = offsets.shape[0] - (1 if include_last_offset else 0)
    position = jnp.arange(indices.shape[0])
    bag = jnp.clip(jnp.searchsorted(offsets, position, side="right") - 1, 0, num_bags - 1)
    keep = jnp.ones(indices.shape, dtype=bool)
    if padding_idx is not None and padding_idx >= 0:
        keep = indices != padding_idx
    if include_last_offset:  # entries at or past the last offset belong to no bag
        keep = keep & (position < offsets[-1])
    rows = jnp.take(weight, indices, axis=0)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights[:, None].astype(rows.dtype)
    count = jax.ops.segment_sum(keep.astype(weight.dtype), bag, num_segments=num_bags)
    if mode == 2:
        lowest = jnp.asarray(-jnp.inf, dtype=weight.dtype)
        top = jax.ops.segment_max(jnp.where(keep[:, None], rows, lowest), bag,
                                  num_segments=num_bags)
        out = jnp.where(count[:, None] > 0, top, jnp.zeros_like(top))
    else:
        out = jax.ops.segment_sum(jnp.where(keep[:, None], rows, 0), bag, num_segments=num_bags)
        if mode == 1:
            out = out / jnp.maximum(count, 1)[:, None]
    return out, None, None, None


@rule("aten.tril.default", family=_F)
def tril(x: Any, diagonal: int = 0) -> Any:
    return jnp.tril(x, int(diagonal))


@rule("aten.triu.default", family=_F)
def triu(x: Any, diagonal: int = 0) -> Any:
    return jnp.triu(x, int(diagonal))


@rule("aten.diagonal.default", "aten.diagonal_copy.default", family=_F)
def diagonal(x: Any, offset: int = 0, dim1: int = 0, dim2: int = 1) -> Any:
    return jnp.diagonal(x, offset, dim1, dim2)


@rule("aten.unfold.default", family=_F)
def unfold(x: Any, dimension: int, size: int, step: int) -> Any:
    dim = int(dimension) % max(x.ndim, 1)
    count = (x.shape[dim] - size) // step + 1
    starts = jnp.arange(count) * step
    idx = starts[:, None] + jnp.arange(size)[None, :]  # (count, size)
    y = jnp.take(x, idx, axis=dim)  # dim -> (count, size)
    return jnp.moveaxis(y, dim + 1, -1)


@rule("aten._assert_tensor_metadata.default", "aten._assert_scalar.default",
      "aten.sym_constrain_range_for_size.default", family=_F)
def assert_metadata(*args: Any, **kwargs: Any) -> None:
    return None  # checks torch already ran at export time
