"""Parameters sharded over a device mesh: the placement part of a JAX operator's layout.

A :class:`ParamPlacement` says where every parameter leaf lives (one
:class:`jax.sharding.NamedSharding` per leaf, all on one :class:`jax.sharding.Mesh`) and where
the operator's flat vectors live. It makes, splits and joins those vectors, so the Krylov
algorithms of :mod:`dualhess` keep working on plain ``(n,)`` jax arrays and never ask where a
block is (see the design's section 7, "Parameter placement").

Inside every compiled product the flat vectors are split into leaves constrained to their
shardings (``jax.lax.with_sharding_constraint``), so XLA's GSPMD partitioner runs the forward,
gradient and tangent passes on sharded parameters; the product is joined back into a flat
vector with the *vector sharding*:

- ``n`` a multiple of the mesh's device count: the flat vector is split evenly over every
  device of the mesh (``PartitionSpec(<all mesh axes>)``), so a Krylov basis of ``k`` vectors
  costs ``k n / d`` entries per device;
- otherwise replicated (``PartitionSpec()``): JAX refuses an uneven ``NamedSharding`` of an
  array that leaves a compiled function (``IndivisibleError``), and padding the flat vector
  would change its length ``n``, which the algorithms see. The parameter leaves and the
  products' intermediates stay sharded either way.

Examples
--------
>>> import jax.numpy as jnp
>>> from jax_backend import shard_largest_axis
>>> tuple(shard_largest_axis({"w": jnp.zeros((8, 3))})["w"].spec)  # rows over all devices
('params', None)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dualhess._operator import OperatorError

from ._data import path_name

__all__ = [
    "LARGEST_AXIS",
    "ParamPlacement",
    "ParamShardingError",
    "default_mesh",
    "resolve_param_sharding",
    "shard_largest_axis",
]

#: The ``param_sharding=`` rule that shards every leaf along its largest divisible axis.
LARGEST_AXIS = "largest_axis"

_FIX = (
    "Give one jax.sharding.NamedSharding per parameter leaf, all on one Mesh (e.g. "
    "jax.tree_util.tree_map(lambda leaf: NamedSharding(mesh, PartitionSpec()), params)), or "
    "pass param_sharding='largest_axis' (or shard_largest_axis(params, mesh)) to shard each "
    "leaf along its largest axis that the mesh divides"
)


class ParamShardingError(OperatorError):
    """A ``param_sharding=`` that does not fit the parameters (structure, type, mesh, shape)."""


def default_mesh(devices: Any = None) -> Mesh:
    """A one-axis mesh ``("params",)`` over ``devices`` (default: all of ``jax.devices()``).

    Examples
    --------
    >>> default_mesh().axis_names
    ('params',)
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ParamShardingError("param_sharding: no devices to build a mesh over")
    return Mesh(np.array(devices), ("params",))


def _axes_entry(names: tuple[str, ...]) -> Any:
    """One PartitionSpec entry splitting a dimension over ``names`` (a name or a tuple)."""
    return names[0] if len(names) == 1 else names


def shard_largest_axis(params: Any, mesh: Mesh | None = None, *, axis_names: Any = None) -> Any:
    """One :class:`~jax.sharding.NamedSharding` per leaf of ``params``: its largest axis split.

    Each leaf is split along its largest dimension whose size is a multiple of the number of
    devices along ``axis_names`` (the first such dimension on a tie); a leaf with none (a
    bias of odd length, a scalar) is replicated. Pass the result as ``param_sharding=`` to
    :func:`jax_backend.hessian` / :func:`jax_backend.ggn`, or edit it first.

    Parameters
    ----------
    params : pytree
        The parameters (only their shapes are read).
    mesh : jax.sharding.Mesh, optional
        Default: a one-axis mesh ``("params",)`` over all of ``jax.devices()``.
    axis_names : str or tuple of str, optional
        The mesh axes a leaf is split over (jointly). Default: every axis of ``mesh``.

    Returns
    -------
    pytree of jax.sharding.NamedSharding
        Shaped like ``params``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from jax.sharding import Mesh
    >>> from jax_backend import shard_largest_axis
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
    >>> tree = shard_largest_axis({"w": jnp.zeros((4, 6)), "b": jnp.zeros(())}, mesh)
    >>> tuple(tree["w"].spec), tuple(tree["b"].spec)
    ((None, 'model'), ())
    """
    mesh = default_mesh() if mesh is None else mesh
    if not isinstance(mesh, Mesh):
        raise ParamShardingError(
            f"shard_largest_axis: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}"
        )
    if axis_names is None:
        names = tuple(mesh.axis_names)
    else:
        names = (axis_names,) if isinstance(axis_names, str) else tuple(axis_names)
    unknown = [name for name in names if name not in mesh.shape]
    if unknown or not names:
        raise ParamShardingError(
            f"shard_largest_axis: axis_names {names} are not axes of the mesh "
            f"{tuple(mesh.axis_names)}; name some of them"
        )
    count = math.prod(mesh.shape[name] for name in names)

    def rule(leaf: Any) -> NamedSharding:
        shape = tuple(np.shape(leaf))
        fits = [axis for axis, size in enumerate(shape) if size % count == 0 and size >= count]
        if not fits:
            return NamedSharding(mesh, PartitionSpec())
        axis = max(fits, key=lambda a: (shape[a], -a))
        spec = [None] * len(shape)
        spec[axis] = _axes_entry(names)
        return NamedSharding(mesh, PartitionSpec(*spec))

    return jax.tree_util.tree_map(rule, params)


class ParamPlacement:
    """Where a sharded operator's parameters and vectors live; it makes, splits and joins them.

    Built by :func:`resolve_param_sharding` (``param_sharding=`` of the operators).

    Attributes
    ----------
    mesh : jax.sharding.Mesh
        The mesh every leaf is sharded over.
    shardings : pytree of jax.sharding.NamedSharding
        One per parameter leaf, shaped like the parameters.
    vector_sharding : jax.sharding.NamedSharding
        The sharding of the operator's flat ``(n,)`` vectors (products, Krylov vectors, the
        flat parameters): split over every mesh device when ``vectors_split``, else replicated.
    matrix_sharding : jax.sharding.NamedSharding
        The sharding of ``(n, k)`` blocks (``matmat``): rows as ``vector_sharding``.
    vectors_split : bool
        Whether flat vectors are split (``n`` is a multiple of the mesh's device count).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from jax_backend import hessian
    >>> op = hessian(lambda w, b: jnp.mean((b @ w) ** 2), jnp.ones(4), np.ones((2, 4)),
    ...              param_sharding="largest_axis")
    >>> v = op.placement.make(np.arange(4.0))
    >>> v.sharding == op.placement.vector_sharding
    True
    """

    def __init__(self, shardings: list[NamedSharding], layout: Any, treedef: Any) -> None:
        self.layout = layout
        self.treedef = treedef
        self.leaf_shardings = list(shardings)
        self.shardings = jax.tree_util.tree_unflatten(treedef, self.leaf_shardings)
        self.mesh: Mesh = shardings[0].mesh
        names = tuple(self.mesh.axis_names)
        self.vectors_split = layout.size % self.mesh.size == 0
        rows = _axes_entry(names) if self.vectors_split else None
        self.vector_sharding = NamedSharding(self.mesh, PartitionSpec(rows))
        self.matrix_sharding = NamedSharding(self.mesh, PartitionSpec(rows, None))
        self._split_jit = jax.jit(self.split, out_shardings=self.shardings)
        self._join_jit = jax.jit(self.join, out_shardings=self.vector_sharding)

    def __repr__(self) -> str:
        return (
            f"ParamPlacement(mesh={dict(self.mesh.shape)}, leaves={len(self.leaf_shardings)}, "
            f"vectors_split={self.vectors_split})"
        )

    # -- inside compiled functions: split / join with sharding constraints
    def split(self, flat: jax.Array) -> Any:
        """The flat vector as a pytree of leaves constrained to their shardings (traceable)."""
        leaves = [
            jax.lax.with_sharding_constraint(
                jnp.reshape(flat[entry.start : entry.stop], entry.shape), sharding
            )
            for entry, sharding in zip(self.layout, self.leaf_shardings)
        ]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def join(self, tree: Any) -> jax.Array:
        """A pytree shaped like the parameters as one flat vector in layout order (traceable)."""
        leaves = jax.tree_util.tree_leaves(tree)
        return jnp.concatenate([jnp.ravel(leaf) for leaf in leaves])

    # -- eager: what the operator hands out
    def make(self, x: Any, dtype: Any = None) -> jax.Array:
        """A flat vector (or ``(n, k)`` block) placed with the vector sharding."""
        x = jnp.asarray(x, dtype=dtype)
        target = self.vector_sharding if x.ndim == 1 else self.matrix_sharding
        if getattr(x, "sharding", None) == target:
            return x
        return jax.device_put(x, target)

    def place(self, leaves: list[jax.Array]) -> list[jax.Array]:
        """The parameter leaves, each put on its sharding."""
        return [jax.device_put(leaf, s) for leaf, s in zip(leaves, self.leaf_shardings)]

    def unravel(self, flat: jax.Array) -> Any:
        """A flat vector as a pytree of sharded leaves (compiled; nothing gathered)."""
        return self._split_jit(flat)

    def ravel(self, tree: Any) -> jax.Array:
        """A pytree of leaves as one flat vector with the vector sharding (compiled)."""
        return self._join_jit(tree)


def _describe(paths: list[str], limit: int = 6) -> str:
    shown = paths[:limit]
    return str(shown) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def resolve_param_sharding(
    param_sharding: Any, params: Any, layout: Any, where: str
) -> ParamPlacement:
    """Check ``param_sharding`` against the parameters and build their :class:`ParamPlacement`.

    ``param_sharding`` is ``"largest_axis"`` (:func:`shard_largest_axis` on the default mesh),
    a :class:`jax.sharding.Mesh` (the same rule on that mesh) or a pytree of
    :class:`~jax.sharding.NamedSharding` shaped like ``params``. Anything else, a pytree of
    another structure, leaves on different meshes or a split that does not divide a leaf's
    dimension raise :class:`ParamShardingError` (a :class:`dualhess.OperatorError`).
    """
    if isinstance(param_sharding, str):
        if param_sharding != LARGEST_AXIS:
            raise ParamShardingError(
                f"{where}: param_sharding={param_sharding!r} is not a rule; the one rule by "
                f"name is {LARGEST_AXIS!r}. {_FIX}"
            )
        param_sharding = shard_largest_axis(params)
    elif isinstance(param_sharding, Mesh):
        param_sharding = shard_largest_axis(params, param_sharding)
    is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)  # noqa: E731
    want, treedef = jax.tree_util.tree_flatten_with_path(params)
    got, got_def = jax.tree_util.tree_flatten_with_path(param_sharding, is_leaf=is_sharding)
    if got_def != treedef:
        want_names = [path_name(p) for p, _ in want]
        got_names = [path_name(p) for p, _ in got]
        missing = [name for name in want_names if name not in got_names]
        extra = [name for name in got_names if name not in want_names]
        detail = []
        if missing:
            detail.append(f"no sharding for {_describe(missing)}")
        if extra:
            detail.append(f"shardings for unknown leaves {_describe(extra)}")
        if not detail:
            detail.append(f"structure {got_def} differs from the parameters' {treedef}")
        raise ParamShardingError(
            f"{where}: param_sharding does not match the parameters pytree "
            f"({len(got)} shardings for {len(want)} parameter leaves): {'; '.join(detail)}. "
            f"{_FIX}."
        )
    shardings = []
    for (path, sharding), entry in zip(got, layout):
        if not isinstance(sharding, NamedSharding):
            raise ParamShardingError(
                f"{where}: param_sharding for {path_name(path)!r} is a "
                f"{type(sharding).__name__}, not a jax.sharding.NamedSharding. {_FIX}."
            )
        shardings.append((entry, sharding))
    mesh = shardings[0][1].mesh
    for entry, sharding in shardings:
        if sharding.mesh != mesh:
            raise ParamShardingError(
                f"{where}: param_sharding puts {entry.name!r} on mesh {dict(sharding.mesh.shape)} "
                f"and {shardings[0][0].name!r} on mesh {dict(mesh.shape)}; one operator's "
                f"leaves share one Mesh. {_FIX}."
            )
        spec = tuple(sharding.spec)
        if len(spec) > len(entry.shape):
            raise ParamShardingError(
                f"{where}: param_sharding for {entry.name!r} has {len(spec)} entries "
                f"({sharding.spec}) for a leaf of shape {entry.shape}. {_FIX}."
            )
        for axis, names in enumerate(spec):
            if names is None:
                continue
            names = (names,) if isinstance(names, str) else tuple(names)
            count = math.prod(mesh.shape[name] for name in names)
            if entry.shape[axis] % count:
                raise ParamShardingError(
                    f"{where}: param_sharding splits axis {axis} of {entry.name!r} (shape "
                    f"{entry.shape}) over {count} devices ({sharding.spec}), which does not "
                    f"divide {entry.shape[axis]}: JAX places only even splits. Split an axis "
                    f"whose size is a multiple of {count}, replicate that leaf with "
                    "PartitionSpec(), or pass param_sharding='largest_axis', which picks such "
                    "axes"
                )
    return ParamPlacement([s for _, s in shardings], layout, treedef)

