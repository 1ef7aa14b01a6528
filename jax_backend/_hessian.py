"""Hessian and GGN operators over JAX pytrees: jitted, vectorised, fixed on their data.

The parameter pytree is flattened with :func:`jax.flatten_util.ravel_pytree`; the operator
acts on flat jax vectors of length ``n`` (the number of parameters) and keeps the explicit
parameter map in ``op.layout`` (leaf path names such as ``"params.Dense_0.kernel"`` in
ravel order). ``op.unravel(flat)`` and ``op.ravel(tree)`` go between the two forms.

A product over the whole data set is one compiled function: for every group of equally
shaped batches a ``lax.scan`` accumulates the per-batch products, each weighted by
``m_b / sum m`` where ``m_b`` is what batch ``b``'s loss divides by (its size by default;
see the loss's normaliser in :mod:`jax_backend._data`). ``matvec`` is compiled once;
``matmat`` is ``jax.vmap`` of the same function over columns, compiled once per column
count (``chunk_size`` columns; a last, smaller chunk is zero-padded so it reuses the
compiled function).

References
----------
B. A. Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 6 (1994)
(Hessian-vector products by forward-over-reverse differentiation).
N. N. Schraudolph, "Fast curvature matrix-vector products for second-order gradient
descent", Neural Computation 14 (2002) (the generalised Gauss-Newton product ``J^T H_L J``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from dualhess._errors import LossUnavailableError
from dualhess._memory import chunk_for_memory
from dualhess._operator import Operator, OperatorError, ParamLayout

from ._data import Dataset, path_name, prepare_data, x64_enabled
from ._memory import free_device_memory
from ._sharding import ParamPlacement, ParamShardingError, resolve_param_sharding
from ._validity import check_loss_depends_on_params, check_normalizer_is_fixed, computation_dtype
from ._validity import check_symmetric as check_symmetric_probe

__all__ = [
    "PytreeOperator",
    "HessianOperator",
    "hessian",
    "dense_hessian",
    "reduce_loss",
    "DEFAULT_DENSE_HESSIAN_LIMIT",
]

#: Largest number of parameters :func:`dense_hessian` accepts without an explicit ``max_size``
#: (``jax.hessian`` pushes all ``n`` tangents through the model at once).
DEFAULT_DENSE_HESSIAN_LIMIT = 2048


# ---------------------------------------------------------------------- parameters
def _resolve_dtype(leaves: list[tuple[str, Any]], dtype: Any, where: str) -> Any:
    for name, leaf in leaves:
        kind = np.dtype(leaf.dtype).kind if hasattr(leaf, "dtype") else None
        if kind != "f" and not (
            hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)
        ):
            raise TypeError(
                f"{where}: parameter {name!r} has dtype "
                f"{getattr(leaf, 'dtype', type(leaf).__name__)}; curvature needs floating-point "
                "parameters (move integer state out of the parameter pytree)"
            )
    if dtype is None:
        wide = [name for name, leaf in leaves if np.dtype(leaf.dtype) == np.float64]
        if wide and not x64_enabled():
            raise TypeError(
                f"{where}: the parameters are float64 but jax_enable_x64 is off, so JAX would "
                "silently compute in float32. Enable it first with "
                "jax.config.update('jax_enable_x64', True), or pass dtype=jnp.float32 "
                f"(float64 parameters: {wide[:5]})."
            )
        dtype = jnp.result_type(*[leaf.dtype for _, leaf in leaves])
    else:
        try:
            np_dtype = np.dtype(dtype)
        except TypeError as err:
            raise TypeError(f"{where}: dtype={dtype!r} is not a dtype") from err
        if not jnp.issubdtype(np_dtype, jnp.floating):
            raise TypeError(f"{where}: dtype must be a floating dtype, got {np_dtype}")
        if np_dtype == np.float64 and not x64_enabled():
            raise TypeError(
                f"{where}: dtype=float64 was asked for but jax_enable_x64 is off, so JAX would "
                "silently compute in float32. Call jax.config.update('jax_enable_x64', True) "
                "at startup (before creating arrays), or set JAX_ENABLE_X64=1."
            )
    return jnp.dtype(dtype)


def _prepare_params(
    params: Any, dtype: Any, where: str, prefix: str, param_sharding: Any = None
) -> tuple[Any, ...]:
    flat_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not flat_with_path:
        raise ValueError(f"{where}: the parameter pytree has no leaves")
    named = [(prefix + path_name(path), leaf) for path, leaf in flat_with_path]
    named = [(name, leaf if hasattr(leaf, "dtype") else np.asarray(leaf)) for name, leaf in named]
    dtype = _resolve_dtype(named, dtype, where)
    leaves = [jnp.asarray(leaf, dtype=dtype) for _, leaf in named]
    bad = [name for (name, _), leaf in zip(named, leaves) if not bool(jnp.all(jnp.isfinite(leaf)))]
    if bad:
        raise ValueError(f"{where}: parameters contain NaN or Inf: {bad}")
    layout = ParamLayout.from_shapes([(name, leaf.shape) for (name, _), leaf in zip(named, leaves)])
    if param_sharding is not None:
        # The leaves go straight to their shardings; the flat vector is joined by a compiled
        # function with the vector sharding, so no device ever holds a gathered copy.
        placement = resolve_param_sharding(param_sharding, params, layout, where)
        tree = jax.tree_util.tree_unflatten(treedef, placement.place(leaves))
        return placement.ravel(tree), placement.split, treedef, layout, dtype, placement
    tree = jax.tree_util.tree_unflatten(treedef, leaves)
    flat, unravel = ravel_pytree(tree)
    if layout.size != flat.shape[0]:  # pragma: no cover - ravel_pytree contract
        raise AssertionError("layout and ravel_pytree disagree")
    return flat, unravel, treedef, layout, dtype, None


def reduce_loss(value: Any, batch_size: int, where: str = "loss") -> jax.Array:
    """Reduce a loss to the mean over the batch.

    ``value`` may be a scalar (already the batch mean) or per-sample / per-element values
    with a leading batch dimension (as ``optax.softmax_cross_entropy_with_integer_labels``
    returns), which are averaged.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> float(reduce_loss(jnp.array([1.0, 3.0]), 2))
    2.0
    """
    shape = tuple(getattr(value, "shape", ()))
    if isinstance(value, (tuple, list, dict)):
        raise ValueError(f"{where} must return an array, got a {type(value).__name__}")
    if shape == ():
        return value
    if shape[0] != batch_size:
        raise ValueError(
            f"{where} returned shape {shape}: expected a scalar (the batch mean) or per-sample "
            f"values with leading dimension batch_size={batch_size}"
        )
    return jnp.mean(value)


def _batch_size(batch: Any) -> int:
    return int(jax.tree_util.tree_leaves(batch)[0].shape[0])


def _group_length(group: Any) -> int:
    """How many batches a group of same-shape batches stacks (its leading axis)."""
    return int(jax.tree_util.tree_leaves(group)[0].shape[0])


def _weighted_sum(
    per_batch: Callable[[Any], Any],
    groups: tuple[Any, ...],
    group_weights: tuple[np.ndarray, ...],
    zero: Any,
    direct_single: bool = True,
) -> Any:
    """``sum_b w_b per_batch(batch_b)`` over groups of stacked batches, one ``lax.scan`` per
    group. A group whose batches share one weight sums first and multiplies once (as before
    the per-batch weights: the same rounding); otherwise the scan carries the weights too."""
    acc = zero
    for group, weights in zip(groups, group_weights):
        if direct_single and _group_length(group) == 1:
            # One batch of this shape: call it directly. XLA optimises a product
            # outside a loop better (measured: the digits CNN's HVP took 1.6x as
            # long inside a one-step scan as outside it, on the CPU).
            batch = jax.tree_util.tree_map(lambda leaf: leaf[0], group)
            acc = acc + float(weights[0]) * per_batch(batch)
            continue
        if np.all(weights == weights[0]):
            def body(carry: Any, batch: Any) -> tuple[Any, None]:
                return carry + per_batch(batch), None

            summed, _ = jax.lax.scan(body, jnp.zeros_like(zero), group)
            acc = acc + float(weights[0]) * summed
            continue

        def weighted(carry: Any, item: tuple[Any, jax.Array]) -> tuple[Any, None]:
            batch, weight = item
            return carry + weight * per_batch(batch), None

        column = jnp.asarray(weights, dtype=jnp.result_type(zero))
        summed, _ = jax.lax.scan(weighted, jnp.zeros_like(zero), (group, column))
        acc = acc + summed
    return acc


def _free_device_memory() -> int:
    return free_device_memory()  # looked up here at call time, so tests can patch it


def _count_random_draws(jaxpr: Any) -> int:
    """How many ``random_bits`` (the primitive every jax.random sampler uses) a jaxpr runs,
    sub-jaxprs (jit, scan, cond, custom derivatives) included."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "random_bits":
            count += 1
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(item, "jaxpr", item)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    count += _count_random_draws(inner)
    return count


# ---------------------------------------------------------------------- operator
class PytreeOperator(Operator):
    """A curvature operator on the flattened parameters of a pytree, fixed on its data.

    Subclasses provide ``_batch_product(flat_params, batch, v) -> (n,)`` for one batch
    (the curvature of the batch's loss); this class sums batches with weights ``m_b / sum m``
    (``1 / sum m`` for a loss that returns ``(loss_sum, normalizer)``) inside one jitted
    function and vmaps it over columns.

    Attributes
    ----------
    layout : dualhess.ParamLayout
        Names (leaf paths), shapes and slices of the parameters in the flat vector.
    params_flat : jax.Array
        The flat parameter vector the curvature is taken at.
    dataset : jax_backend.data.Dataset
        The batches, on the device, grouped by shape.
    placement : jax_backend.ParamPlacement or None
        Where the parameters and the flat vectors live when the operator was built with
        ``param_sharding=`` (see :func:`hessian`); None otherwise.
    num_traces : int
        How many times the whole-data-set product has been traced (compiled): one for
        ``matvec`` plus one per distinct column count of ``matmat``.
    """

    placement: ParamPlacement | None = None

    @property
    def _linear_tree(self) -> bool:
        """Whether :meth:`_batch_linearization` maps parameter pytrees to pytrees (applied
        between an unravel and a ravel of their own) rather than flat vectors."""
        return False

    def __init__(
        self,
        params: Any,
        data: Any,
        *,
        chunk_size: int | str | None = None,
        dtype: Any = None,
        where: str = "hessian",
        prefix: str = "",
        check_deterministic: bool = True,
        normalizer: Callable[[Any], Any] | None = None,
        check_symmetric: bool = True,
        param_sharding: Any = None,
    ) -> None:
        auto_chunk = chunk_size == "auto"
        chunk_size = None if auto_chunk else chunk_size
        flat, unravel, treedef, layout, dtype, placement = _prepare_params(
            params, dtype, where, prefix, param_sharding
        )
        self.placement: ParamPlacement | None = placement
        self._where = where
        self._unravel_fn = unravel
        self._treedef = treedef
        self.params_flat = flat
        self.dataset: Dataset = prepare_data(data, dtype, where)
        n = int(flat.shape[0])
        like = jnp.zeros((0,), dtype)
        if placement is not None:  # op.asarray(...) then makes vectors with this sharding
            like = jax.device_put(like, placement.vector_sharding)
        super().__init__((n, n), dtype, like=like, chunk_size=chunk_size)
        self.layout = layout
        self.num_traces = 0
        self._normalizer = normalizer
        self._check_batch_function()
        self._set_normalizers(normalizer)
        self._check_finite_loss()
        if check_deterministic:
            self._check_no_random_draws()
        self._check_loss_depends_on_params()

        group_weights = self.dataset.group_weights
        product = self._batch_product

        def total(flat_params: jax.Array, groups: tuple[Any, ...], v: jax.Array) -> jax.Array:
            self.num_traces += 1  # Python side effect: runs only while tracing
            return _weighted_sum(
                lambda batch: product(flat_params, batch, v), groups, group_weights,
                jnp.zeros_like(v),
            )

        vector_out = None if placement is None else placement.vector_sharding
        matrix_out = None if placement is None else placement.matrix_sharding
        self._matvec_jit = jax.jit(total, out_shardings=vector_out)
        self._matmat_jit = jax.jit(
            jax.vmap(total, in_axes=(None, None, 1), out_axes=1), out_shardings=matrix_out
        )
        self._linearized: Any = None  # see _linearization()

        def apply(linear_fn: Any, v: jax.Array) -> jax.Array:
            self.num_traces += 1  # Python side effect: runs only while tracing
            return linear_fn(v)

        self._apply_jit = jax.jit(apply, out_shardings=vector_out)
        self._apply_mat_jit = jax.jit(
            jax.vmap(apply, in_axes=(None, 1), out_axes=1), out_shardings=matrix_out
        )
        # A linearisation over pytrees is applied between an unravel and a ravel compiled
        # on their own: fused into one program with the tangent pass, the slices of the flat
        # vector made XLA's CPU code run 17 to 88 ms by process (878k parameters, the same
        # inputs), where the three programs take 16-17 ms in every process.
        unravel, ravel = self._unravel_fn, lambda tree: ravel_pytree(tree)[0]
        self._unravel_jit = jax.jit(unravel)
        self._ravel_jit = jax.jit(ravel)
        self._unravel_cols_jit = jax.jit(jax.vmap(unravel, in_axes=1))
        self._ravel_cols_jit = jax.jit(jax.vmap(ravel, out_axes=1))
        self._apply_tree_mat_jit = jax.jit(jax.vmap(apply, in_axes=(None, 0)))
        #: The relative asymmetry |u^T H v - v^T H u| / (|u||Hv| + |v||Hu|) the probe
        #: measured at construction (None when skipped with check_symmetric=False).
        self.asymmetry: float | None = None
        if check_symmetric:
            traced = jax.make_jaxpr(self._batch_product)(
                self.params_flat, self.dataset.first, self.params_flat
            )
            rounding = computation_dtype(traced, self.dtype)
            self.asymmetry = check_symmetric_probe(
                self._matvec, self.n, self.dtype, where, rounding_dtype=rounding
            )
        if auto_chunk:
            self.chunk_size = self.auto_chunk_size()

    def auto_chunk_size(self) -> int:
        """The largest ``chunk_size`` whose vectorised product fits in free device memory.

        XLA's own accounting of the compiled product (``memory_analysis()``) for 1 and 2
        columns gives the fixed and the per-column bytes; free memory is the device's
        ``bytes_limit - bytes_in_use`` (GPU/TPU) or the host's MemAvailable (CPU). 20% is
        kept as head-room. Peak memory is then about ``chunk_size`` x one product.
        With one batch the kept linearisation (:meth:`_linearization`) is built first, so
        free memory is read with it in place, and the product measured is its tangent pass.
        """
        linear = self._linearization()

        def bytes_for(k: int) -> int:
            cols = jnp.zeros((self.n, k), self.dtype)
            if linear is not None and self._linear_tree:  # the three programs in one
                lowered = jax.jit(
                    lambda f, c: jax.vmap(lambda x: ravel_pytree(f(self._unravel_fn(x)))[0],
                                          in_axes=1, out_axes=1)(c)
                ).lower(linear, cols)
            elif linear is not None:
                lowered = self._apply_mat_jit.lower(linear, cols)
            else:
                lowered = self._matmat_jit.lower(self.params_flat, self.dataset.groups, cols)
            stats = lowered.compile().memory_analysis()
            if stats is None:  # pragma: no cover - backends without the analysis
                return 4 * self.n * k * jnp.dtype(self.dtype).itemsize
            return int(stats.temp_size_in_bytes + stats.output_size_in_bytes)

        return chunk_for_memory(
            one=bytes_for(1), two=bytes_for(2), free=_free_device_memory(),
            vector_bytes=self.n * jnp.dtype(self.dtype).itemsize, n=self.n,
        )

    # -- to be provided by subclasses
    def _batch_product(self, flat_params: jax.Array, batch: Any, v: jax.Array) -> jax.Array:
        raise NotImplementedError

    def _batch_loss(self, flat_params: jax.Array, batch: Any) -> jax.Array:
        """The loss of one batch, whose curvature the operator is: its mean over the batch's
        normaliser, or its sum when the loss returns ``(loss_sum, normalizer)``."""
        raise LossUnavailableError(f"{type(self).__name__} defines no loss (no _batch_loss)")

    def _batch_normalizer(self, flat_params: jax.Array, batch: Any) -> Any:
        """The normaliser a ``(loss_sum, normalizer)`` loss returns for one batch."""
        raise NotImplementedError  # pragma: no cover - only called in the pair form

    #: True when the loss returns ``(loss_sum, normalizer)`` (set by _check_batch_function).
    _summed = False

    # -- the loss's normaliser
    def _set_normalizers(self, normalizer: Callable[[Any], Any] | None) -> None:
        """Evaluate every batch's normaliser once and weight the batches by it.

        ``(loss_sum, normalizer)`` losses: the second element, evaluated at the parameters
        (and checked not to depend on them); ``normalizer=fn``: ``fn(batch)`` on each batch;
        neither: the batch sizes (the dataset's default weights are kept).
        """
        where = self._where
        if self._summed:
            if normalizer is not None:
                raise ValueError(
                    f"{where}: the loss returns (loss_sum, normalizer) and normalizer= was "
                    "passed too; give the normaliser one way"
                )
            check_normalizer_is_fixed(
                self._batch_normalizer, self.params_flat, self.dataset.first, where
            )
            per_group = jax.jit(
                lambda flat, group: jax.lax.map(
                    lambda batch: jnp.asarray(self._batch_normalizer(flat, batch)), group
                )
            )
            values = [0.0] * self.dataset.num_batches
            for group, index in zip(self.dataset.groups, self.dataset.group_index):
                got = np.asarray(per_group(self.params_flat, group), dtype=np.float64)
                for position, value in zip(index, got.reshape(len(index), -1)):
                    if value.size != 1:
                        raise ValueError(
                            f"{where}: the normalizer returned by the loss has shape "
                            f"{value.shape}; it must be a scalar (what the loss sum is divided by)"
                        )
                    values[position] = float(value[0])
        elif normalizer is not None:
            if not callable(normalizer):
                raise TypeError(
                    f"{where}: normalizer must be a function fn(batch) -> number (what the "
                    f"batch's loss divides by), got {type(normalizer).__name__}"
                )
            values = [normalizer(batch) for batch in self.dataset.all_batches()]
        else:
            return
        self.dataset = self.dataset.with_normalizers(values, summed=self._summed, where=where)

    def _check_loss_depends_on_params(self) -> None:
        """Refuse a loss with no gradient in the parameters (see :mod:`jax_backend._validity`)."""
        try:
            jax.eval_shape(self._batch_loss, self.params_flat, self.dataset.first)
        except LossUnavailableError:
            return
        check_loss_depends_on_params(
            self._batch_loss, self.params_flat, self.dataset.first, self._where
        )

    # -- the loss behind the curvature
    def _whole_data(
        self, per_batch: Callable[[jax.Array, Any], jax.Array], out_shardings: Any = None
    ) -> Callable:
        """Jit ``flat -> sum_b weight_b * per_batch(flat, batch_b)`` over the data set."""
        group_weights = self.dataset.group_weights

        def total(flat_params: jax.Array, groups: tuple[Any, ...]) -> jax.Array:
            first = jax.tree_util.tree_map(lambda leaf: leaf[0], groups[0])
            zero = jnp.zeros_like(jax.eval_shape(per_batch, flat_params, first))
            return _weighted_sum(
                lambda batch: per_batch(flat_params, batch), groups, group_weights, zero,
                direct_single=False,
            )

        return jax.jit(total, out_shardings=out_shardings)

    @functools.cached_property
    def _loss_jit(self) -> Callable[..., Any]:
        return self._whole_data(self._batch_loss)

    @functools.cached_property
    def _gradient_jit(self) -> Callable[..., Any]:
        placement = getattr(self, "placement", None)
        out = None if placement is None else placement.vector_sharding
        return self._whole_data(jax.grad(self._batch_loss), out)

    def loss_at(self, delta: jax.Array) -> float:
        """The whole-data-set loss at ``theta + delta`` (batches weighted as in the products:
        ``sum_b sum_i l_bi / sum_b m_b``, see the loss's normaliser in :func:`hessian`).

        Parameters
        ----------
        delta : jax.Array, shape (n,)
            The shift, in the flat order of ``op.layout`` (``ravel_pytree``).

        Examples
        --------
        >>> import jax.numpy as jnp, numpy as np
        >>> from jax_backend import hessian
        >>> x = np.ones((4, 2), np.float32)
        >>> op = hessian(lambda w, b: jnp.mean((b @ w) ** 2), jnp.ones(2), x)
        >>> op.loss_at(jnp.zeros(2)), op.loss_at(jnp.ones(2))
        (4.0, 16.0)
        """
        shape = tuple(getattr(delta, "shape", ()))
        if shape != (self.n,):
            raise OperatorError(
                f"{self._where}: loss_at expects a flat shift of shape ({self.n},) in the order "
                f"of op.layout, got shape {shape}"
            )
        shifted = self.params_flat + jnp.asarray(delta, dtype=self.dtype)
        return float(self._loss_jit(shifted, self.dataset.groups))

    def gradient(self) -> jax.Array:
        """The gradient of the whole-data-set loss at ``theta``, a flat ``(n,)`` jax vector."""
        return self._gradient_jit(self.params_flat, self.dataset.groups)

    def _check_finite_loss(self) -> None:
        """Evaluate the whole-data-set loss once and refuse NaN/Inf (as the torch backend).

        Products can be finite where the loss is not (the derivatives of ``log(loss - c)``
        at a negative argument are finite numbers), so the value itself is checked. It is
        kept as ``op.loss_value``.
        """
        try:
            value = float(self._loss_jit(self.params_flat, self.dataset.groups))
        except LossUnavailableError:
            return
        if not np.isfinite(value):
            raise ValueError(
                f"{self._where}: the loss is {value} on the data: check the parameters and data "
                "for NaN/Inf and the loss for log(0) or overflow (and integer class labels for "
                "values outside [0, C): JAX fills out-of-range gathers with NaN)"
            )
        self.loss_value = value

    def _check_no_random_draws(self) -> None:
        """Refuse a loss whose trace draws random numbers (``random_bits``), e.g. Dropout.

        JAX functions are pure, so a loss with a fixed PRNG key repeats the same draw in
        every product: the operator is fixed, but it is the curvature of one random sample
        of the loss, rarely what was meant. One abstract trace of the first batch's loss
        (``jax.make_jaxpr``, no computation) finds it.
        """
        try:
            closed = jax.make_jaxpr(self._batch_loss)(self.params_flat, self.dataset.first)
        except LossUnavailableError:
            closed = jax.make_jaxpr(self._batch_product)(
                self.params_flat, self.dataset.first, self.params_flat
            )
        draws = _count_random_draws(closed.jaxpr)
        if draws:
            raise ValueError(
                f"{self._where}: the loss draws random numbers ({draws} jax.random sampling "
                "op(s) in its trace), so the curvature is that of one fixed random draw. "
                "Likely causes: Dropout or stochastic depth with deterministic=False, an nnx "
                "module calling its Rngs in __call__, rngs= passed to a linen apply, or a loss "
                "that reads a PRNG key. Run the model in inference mode (deterministic=True, "
                "train=False, model.eval()), or pass check_deterministic=False to analyse "
                "the loss with that one draw held fixed."
            )

    def _check_batch_function(self) -> None:
        """Trace the per-batch function abstractly on the first batch (shape checks)."""
        jax.eval_shape(self._batch_product, self.params_flat, self.dataset.first, self.params_flat)

    def _batch_linearization(self, flat_params: jax.Array, batch: Any) -> Any:
        """``v -> product(flat_params, batch, v)`` as a linear function whose primal work is
        done once, or None where a subclass has no such form (see :meth:`_linearization`)."""
        return None

    def _linearization(self) -> Any:
        """The product as a linearised function, computed once, for a one-batch data set.

        The operator is fixed (same parameters, same data), so the primal part of every
        product (forward pass, gradient and the intermediates the tangent pass needs) is
        the same each time. For a single batch it is computed once with ``jax.linearize``
        and kept; each product then runs only the tangent (linear) part. This is the JAX
        counterpart of reusing the autograd graph, and costs the memory of those
        intermediates for as long as the operator lives. With several batches the
        intermediates of every batch would have to be kept, so they are recomputed instead.
        """
        if self._linearized is None:
            groups = self.dataset.groups
            if len(groups) != 1 or _group_length(groups[0]) != 1:
                self._linearized = False
            else:
                batch = jax.tree_util.tree_map(lambda leaf: leaf[0], groups[0])
                linear = self._linearize_jit(self.params_flat, batch)
                self._linearized = False if linear is None else linear
        return self._linearized or None

    def _linear_scaled(self, out: jax.Array) -> jax.Array:
        """The kept linearisation's product times the one batch's weight (1 for a
        batch-mean loss, ``1 / normalizer`` for a ``(loss_sum, normalizer)`` loss)."""
        weight = float(self.dataset.group_weights[0][0])
        return out if weight == 1.0 else weight * out

    @functools.cached_property
    def _linearize_jit(self) -> Callable[..., Any]:
        return jax.jit(self._batch_linearization)

    # -- products
    def _matvec(self, v: jax.Array) -> jax.Array:
        if self.placement is not None:
            v = self.placement.make(v)
        linear = self._linearization()
        if linear is not None and self._linear_tree:
            tree = self._apply_jit(linear, self._unravel_jit(v))
            return self._linear_scaled(self._ravel_jit(tree))
        if linear is not None:
            return self._linear_scaled(self._apply_jit(linear, v))
        return self._matvec_jit(self.params_flat, self.dataset.groups, v)

    def _matmat(self, V: jax.Array) -> jax.Array:
        if self.placement is not None:
            V = self.placement.make(V)
        k = V.shape[1]
        width = self.chunk_size
        linear = self._linearization()
        if linear is not None and self._linear_tree:
            def run(cols: jax.Array) -> jax.Array:
                trees = self._apply_tree_mat_jit(linear, self._unravel_cols_jit(cols))
                return self._linear_scaled(self._ravel_cols_jit(trees))
        elif linear is not None:
            run = lambda cols: self._linear_scaled(self._apply_mat_jit(linear, cols))  # noqa: E731
        else:
            run = lambda cols: self._matmat_jit(self.params_flat, self.dataset.groups, cols)  # noqa: E731
        if width is not None and k < width:  # pad the last chunk: no second compilation
            return run(jnp.pad(V, ((0, 0), (0, width - k))))[:, :k]
        return run(V)

    # -- multi-device
    def shard(self, devices: Any = None) -> PytreeOperator:
        """Spread every product over ``devices`` by sharding the batch axis (data parallel).

        A :class:`jax.sharding.Mesh` with one axis ``"batch"`` is built over ``devices``
        (default: all of ``jax.devices()``); each batch is split along its samples across
        the mesh and the parameters are replicated, so one product runs on every device and
        XLA sums the per-device contributions. Batches whose size is not a multiple of the
        number of devices stay replicated (computed whole on each device, still exact).
        Results equal the single-device ones up to the order of floating-point sums.

        With several processes (``jax.distributed.initialize()`` on every host), pass
        ``jax.devices()`` (all global devices) and give every process the same ``data``.

        Examples
        --------
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> from jax_backend import hessian
        >>> x = np.ones((8, 3), np.float32)
        >>> op = hessian(lambda w, b: jnp.mean((b @ w) ** 2), jnp.zeros(3), x).shard()
        >>> op.mesh.axis_names
        ('batch',)
        """
        from ._distributed import shard_operator

        if getattr(self, "placement", None) is not None:
            raise ParamShardingError(
                f"{self._where}: this operator's parameters are sharded (param_sharding=), so "
                "its batches cannot also be spread with shard()/devices=: the two would use "
                "two meshes over the same devices. Use one: param_sharding= for parameters "
                "too large for one device, devices= for data parallelism"
            )
        return shard_operator(self, devices)

    # -- pytree helpers
    @property
    def params(self) -> Any:
        """The parameter pytree the curvature is taken at (cast to the operator's dtype;
        with ``param_sharding=``, every leaf on its sharding)."""
        return self.unravel(self.params_flat)

    def unravel(self, flat: Any) -> Any:
        """Turn a flat ``(n,)`` vector into a pytree shaped like the parameters."""
        shape = tuple(getattr(flat, "shape", ()))
        if shape != (self.n,):
            raise OperatorError(f"unravel expects a flat vector of shape ({self.n},), got {shape}")
        if self.placement is not None:
            return self.placement.unravel(self.placement.make(flat, self.dtype))
        return self._unravel_fn(jnp.asarray(flat, dtype=self.dtype))

    def ravel(self, tree: Any) -> jax.Array:
        """Turn a pytree shaped like the parameters into a flat ``(n,)`` vector."""
        treedef = jax.tree_util.tree_structure(tree)
        if treedef != self._treedef:
            raise OperatorError(
                f"ravel expects a pytree with the parameters' structure {self._treedef}, "
                f"got {treedef}"
            )
        leaves = jax.tree_util.tree_leaves(tree)
        for entry, leaf in zip(self.layout, leaves):
            if tuple(jnp.shape(leaf)) != entry.shape:
                raise OperatorError(
                    f"ravel: leaf {entry.name!r} has shape {tuple(jnp.shape(leaf))}, "
                    f"expected {entry.shape}"
                )
        if self.placement is not None:
            cast = [jnp.asarray(x, dtype=self.dtype) for x in leaves]
            return self.placement.ravel(jax.tree_util.tree_unflatten(self._treedef, cast))
        return jnp.concatenate([jnp.ravel(jnp.asarray(x, dtype=self.dtype)) for x in leaves])


class HessianOperator(PytreeOperator):
    """The Hessian of ``loss_fn`` averaged over the data; see :func:`hessian`."""

    def __init__(
        self, loss_fn: Callable[[Any, Any], Any], params: Any, data: Any, **options: Any
    ) -> None:
        # options: chunk_size, dtype, prefix, check_deterministic, normalizer,
        # check_symmetric, param_sharding (see PytreeOperator)
        if not callable(loss_fn):
            raise TypeError(f"hessian: loss_fn must be callable, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        super().__init__(params, data, where="hessian", **options)

    def _flat_loss(self, flat_params: jax.Array, batch: Any) -> jax.Array:
        value = self.loss_fn(self._unravel_fn(flat_params), batch)
        return value[0] if self._summed else value

    def _batch_normalizer(self, flat_params: jax.Array, batch: Any) -> Any:
        return self.loss_fn(self._unravel_fn(flat_params), batch)[1]

    def _check_batch_function(self) -> None:
        raw = jax.eval_shape(
            lambda p, b: self.loss_fn(self._unravel_fn(p), b), self.params_flat, self.dataset.first
        )
        self._summed = check_pair(raw, "hessian: loss_fn(params, batch)")
        out = raw[0] if self._summed else raw
        shape = getattr(out, "shape", None)
        if shape is None:
            raise ValueError(
                "hessian: loss_fn(params, batch) must return a scalar array (the mean over the "
                f"batch) or a pair (loss_sum, normalizer), got a {type(out).__name__} "
                "(auxiliary outputs are not supported)"
            )
        if tuple(shape) != ():
            raise ValueError(
                f"hessian: loss_fn(params, batch) must return a scalar (the mean over the "
                f"batch), got shape {tuple(shape)}; reduce it with jnp.mean"
            )
        if not jnp.issubdtype(out.dtype, jnp.floating):
            raise ValueError(f"hessian: loss_fn returned dtype {out.dtype}, expected a float")
        super()._check_batch_function()

    def _batch_loss(self, flat_params: jax.Array, batch: Any) -> jax.Array:
        return self._flat_loss(flat_params, batch)

    def _batch_product(self, flat_params: jax.Array, batch: Any, v: jax.Array) -> jax.Array:
        grad = jax.grad(self._flat_loss)
        return jax.jvp(lambda p: grad(p, batch), (flat_params,), (v,))[1]

    @property
    def _linear_tree(self) -> bool:
        return self.placement is None  # sharded parameters keep the flat form

    def _batch_linearization(self, flat_params: jax.Array, batch: Any) -> Any:
        if self._linear_tree:  # over the parameter pytree (see PytreeOperator.__init__)
            def tree_loss(params: Any) -> jax.Array:
                value = self.loss_fn(params, batch)
                return value[0] if self._summed else value

            return jax.linearize(jax.grad(tree_loss), self._unravel_fn(flat_params))[1]
        grad = jax.grad(self._flat_loss)
        return jax.linearize(lambda p: grad(p, batch), flat_params)[1]


def check_pair(out: Any, what: str) -> bool:
    """True when a loss's (abstract) value is the pair ``(loss_sum, normalizer)``; checks the
    normaliser is a scalar number. Other tuples are left to the caller's error."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        return False
    norm = out[1]
    if (
        not hasattr(norm, "shape")
        or tuple(norm.shape) != ()
        or not (jnp.issubdtype(norm.dtype, jnp.number) or jnp.issubdtype(norm.dtype, jnp.bool_))
    ):
        raise ValueError(
            f"{what} returned a pair, read as (loss_sum, normalizer), but its second element "
            f"is {getattr(norm, 'shape', type(norm).__name__)} "
            f"{getattr(norm, 'dtype', '')}, not a scalar number. Return the sum of the losses "
            "and what it is divided by (a count of kept labels, a sum of class weights); "
            "auxiliary outputs are not supported"
        )
    return True


_NORMALIZER_DOC = """
    **The loss's normaliser.** The operator is the Hessian of the whole-data-set loss
    ``sum_b sum_i l_bi / sum_b m_b``, where ``m_b`` is what batch ``b``'s loss divides by.
    Three ways to say what ``m_b`` is:

    - default: the loss is a mean over the batch's samples, ``m_b`` = the batch size;
    - ``normalizer=fn``: the loss is a mean over ``fn(batch)`` (kept tokens under a mask,
      the sum of class weights); batch ``b`` gets the weight ``m_b / sum m``;
    - the loss returns ``(loss_sum, normalizer)``: the operator uses ``loss_sum`` and divides
      once by ``sum_b normalizer_b``. The normaliser must not depend on the parameters; it is
      evaluated once, at construction.

    A batch whose normaliser is 0 (every label masked) contributes nothing (it is left out,
    so its 0/0 mean never enters). A loss that is a sum (``reduction="sum"``) needs nothing.
    The values are ``op.dataset.normalizers`` (per batch) and ``op.dataset.total_normalizer``.
"""


# ---------------------------------------------------------------------- public functions
def hessian(
    loss_fn: Callable[[Any, Any], Any],
    params: Any,
    data: Any,
    *,
    chunk_size: int | None = None,
    dtype: Any = None,
    devices: Any = None,
    check_deterministic: bool = True,
    normalizer: Callable[[Any], Any] | None = None,
    check_symmetric: bool = True,
    param_sharding: Any = None,
) -> HessianOperator:
    """The Hessian of a loss over a data set, as a :class:`dualhess.Operator` on jax vectors.
%(normalizer)s
    Parameters
    ----------
    loss_fn : callable
        ``loss_fn(params, batch) -> scalar``: the **mean** loss over the samples of
        ``batch`` (or over ``normalizer(batch)``), or a pair ``(loss_sum, normalizer)``:
        the sum of the batch's losses and what it is divided by. A non-scalar result is an
        error (reduce per-sample losses with ``jnp.mean``).
    params : pytree
        The parameters (any pytree of floating arrays: dicts, lists, Flax ``params``).
    data : batch or iterable of batches
        One batch (an array, a tuple such as ``(x, y)``, a dict) or an iterable of
        batches (a list, a generator); every leaf has a leading batch dimension. The
        operator is the exact mean over all samples: batches are weighted by size, so an
        unequal last batch is handled exactly. Batches are kept on the device.
    chunk_size : int or "auto", optional
        Columns per vectorised call in ``matmat`` (peak memory ``chunk_size`` products);
        ``"auto"``: the largest chunk that fits in free device memory, from XLA's memory
        analysis of the compiled product (:meth:`PytreeOperator.auto_chunk_size`).
    dtype : dtype, optional
        Computation dtype; default: that of the parameters. ``jnp.float64`` needs
        ``jax.config.update("jax_enable_x64", True)``; without it this is an error, never
        a silent float32.
    devices : list of jax devices, optional
        Shard the batches over these devices (data parallel); see
        :meth:`PytreeOperator.shard`.
    check_deterministic : bool
        Refuse a loss whose trace draws random numbers (default True): with a fixed PRNG
        key (Dropout, noise) every product repeats one draw. One abstract trace, no
        computation. ``False`` analyses the loss with that draw held fixed.
    normalizer : callable, optional
        ``normalizer(batch) -> number``: what ``loss_fn`` divides by on that batch (e.g.
        ``lambda b: (b[1] != -100).sum()`` for a loss averaged over kept tokens); batches
        are then weighted by it. Default: the batch size. Not with a pair-returning loss.
    check_symmetric : bool
        Probe the symmetry at construction (default True): two products ``Hu``, ``Hv`` with
        seeded random ``u, v``; ``|u^T H v - v^T H u|`` beyond rounding
        (:func:`jax_backend._validity.symmetry_tolerance`) raises
        :class:`dualhess.AsymmetricOperatorError` (a ``custom_jvp``/``custom_vjp`` with an
        inconsistent rule). ``False`` skips it.
    param_sharding : pytree of NamedSharding, "largest_axis" or Mesh, optional
        Shard the parameters over a device mesh (model parallelism, GSPMD): one
        :class:`jax.sharding.NamedSharding` per parameter leaf, all on one mesh (a pytree
        shaped like ``params``); ``"largest_axis"``: each leaf split along its largest axis
        that the number of devices divides, over all of ``jax.devices()``
        (:func:`jax_backend.shard_largest_axis`, which also takes a mesh); a
        :class:`jax.sharding.Mesh`: that rule on that mesh. The parameters are placed leaf
        by leaf, every product runs on the sharded leaves, and the products, the flat
        parameters and the vectors ``op.asarray`` makes keep ``op.placement.vector_sharding``
        (split over the mesh when ``n`` is a multiple of its device count, replicated
        otherwise). Results equal the unsharded operator's up to the order of sums. Not
        with ``devices=``.

    Returns
    -------
    HessianOperator
        ``op.matvec`` is a jitted forward-over-reverse product (``jax.jvp`` of
        ``jax.grad``), ``op.matmat`` its ``jax.vmap`` over columns. With one batch, the
        primal part is linearised once (``jax.linearize``) and each product runs only the
        tangent pass (:meth:`PytreeOperator._linearization`). ``op.layout``,
        ``op.unravel`` and ``op.ravel`` map between flat vectors and pytrees.

    Raises
    ------
    ValueError
        Non-scalar loss, NaN/Inf in parameters, data or the loss, batches of different
        structure, random draws in the loss, normalisers that are negative, not finite or
        sum to 0.
    TypeError
        Non-floating parameters, float64 without ``jax_enable_x64``.
    dualhess.OperatorError
        The loss does not depend on the parameters (no gradient in them), or its returned
        normaliser does.
    dualhess.AsymmetricOperatorError
        The products are not symmetric (see ``check_symmetric``).
    jax_backend.ParamShardingError
        ``param_sharding`` does not fit the parameters (another pytree structure, not
        ``NamedSharding``s, several meshes, a split that does not divide a dimension), or
        comes with ``devices=``.

    References
    ----------
    B. A. Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 6 (1994).

    Examples
    --------
    >>> import jax.numpy as jnp, numpy as np
    >>> from jax_backend import hessian
    >>> x = np.linspace(-1, 1, 8, dtype=np.float32)[:, None]
    >>> y = 3 * x[:, 0]
    >>> def loss_fn(p, batch):
    ...     inputs, targets = batch
    ...     return jnp.mean((inputs @ p["w"] + p["b"] - targets) ** 2)
    >>> op = hessian(loss_fn, {"w": jnp.ones(1), "b": jnp.zeros(())}, (x, y))
    >>> op.shape, op.layout.names
    ((2, 2), ['b', 'w'])
    >>> np.asarray(op.to_dense(), dtype=np.float64).round(3).tolist()  # 2 mean([1, x; x, x^2])
    [[2.0, 0.0], [0.0, 0.857]]
    """
    check_one_placement(devices, param_sharding, "hessian")
    op = HessianOperator(
        loss_fn,
        params,
        data,
        chunk_size=chunk_size,
        dtype=dtype,
        check_deterministic=check_deterministic,
        normalizer=normalizer,
        check_symmetric=check_symmetric,
        param_sharding=param_sharding,
    )
    return op if devices is None else op.shard(devices)


def check_one_placement(devices: Any, param_sharding: Any, where: str) -> None:
    """Refuse ``devices=`` (data parallel) together with ``param_sharding=`` (model parallel)."""
    if devices is not None and param_sharding is not None:
        raise ParamShardingError(
            f"{where}: devices= (batches split over devices) and param_sharding= (parameters "
            "split over a mesh) were both given; they would use two meshes over the same "
            "devices. Use one: param_sharding= for parameters too large for one device, "
            "devices= for data parallelism"
        )


hessian.__doc__ = (hessian.__doc__ or "").replace("%(normalizer)s", _NORMALIZER_DOC)


def dense_hessian(
    loss_fn: Callable[[Any, Any], Any],
    params: Any,
    data: Any,
    *,
    max_size: int | None = None,
    dtype: Any = None,
    normalizer: Callable[[Any], Any] | None = None,
) -> jax.Array:
    """The full ``n x n`` Hessian via :func:`jax.hessian`, for small models and tests.

    Same conventions as :func:`hessian` (batches weighted by their normalisers: sizes by
    default, ``normalizer=`` or a ``(loss_sum, normalizer)`` loss); the flat order is that
    of ``ravel_pytree(params)``, the same as the operator's.

    Parameters
    ----------
    max_size : int, optional
        Refuse when ``n`` exceeds this (default :data:`DEFAULT_DENSE_HESSIAN_LIMIT`):
        ``jax.hessian`` pushes ``n`` tangents through the model at once.

    Examples
    --------
    >>> import jax.numpy as jnp, numpy as np
    >>> from jax_backend import dense_hessian
    >>> x = np.ones((4, 2), dtype=np.float32)
    >>> dense_hessian(lambda w, b: jnp.mean((b @ w) ** 2), jnp.ones(2), x).tolist()
    [[2.0, 2.0], [2.0, 2.0]]
    """
    n = sum(int(np.prod(jnp.shape(leaf))) for leaf in jax.tree_util.tree_leaves(params))
    limit = DEFAULT_DENSE_HESSIAN_LIMIT if max_size is None else int(max_size)
    if n > limit:
        raise OperatorError(
            f"dense_hessian refuses n={n} parameters > max_size={limit}: the matrix needs "
            f"{8 * n * n / 2**30:.2f} GiB and jax.hessian pushes {n} tangents at once. Use "
            "hessian(...) with the matrix-free algorithms, or pass max_size= explicitly."
        )
    op = HessianOperator(
        loss_fn, params, data, dtype=dtype, normalizer=normalizer, check_symmetric=False
    )
    hess = jax.jit(jax.hessian(op._flat_loss))
    total = jnp.zeros((op.n, op.n), dtype=op.dtype)
    for weight, batch in op.dataset.batches():
        total = total + weight * hess(op.params_flat, batch)
    if not bool(jnp.all(jnp.isfinite(total))):
        raise OperatorError("dense_hessian: the Hessian contains NaN or Inf")
    return total
