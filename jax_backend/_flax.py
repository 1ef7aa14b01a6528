"""Flax adapters: curvature operators for linen modules and nnx models.

Both adapters take ``loss(outputs, targets)`` and data whose batches are pairs
``(inputs, targets)``; the model is called as ``model(inputs)``. ``loss`` may return a
scalar (the batch mean) or per-sample values with a leading batch dimension, which are
averaged, so optax losses such as ``optax.softmax_cross_entropy_with_integer_labels`` work
directly; ``loss`` may also return ``(loss_sum, normalizer)``, or ``normalizer=fn(batch)``
says what a mean loss divides by (see the loss's normaliser in :func:`jax_backend.hessian`).
The curvature is taken with respect to the trainable parameters only (the linen ``params``
collection, the nnx ``nnx.Param`` state); everything else (BatchNorm statistics, RNG state)
is held fixed, in inference mode. A module that normalises with the batch's statistics
(BatchNorm in train mode) or draws dropout masks is refused (:mod:`jax_backend._validity`). Floating non-trainable state is cast to the
analysis dtype (Flax keeps ``batch_stats`` in float32 whatever ``param_dtype`` is, which would
put float32 rounding into a float64 analysis); integer and key state is kept as it is.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._curvature import GGNOperator
from ._data import path_name, x64_enabled
from ._hessian import _NORMALIZER_DOC, HessianOperator, PytreeOperator, reduce_loss
from ._validity import check_nnx_mode, linen_batch_statistics_error

__all__ = ["from_linen", "from_nnx", "inference_kwargs"]

#: Keyword flags that switch Flax modules between training and inference, with the value
#: meaning "inference" (``train=False``, ``deterministic=True``, ...).
_INFERENCE_FLAGS = {"train": False, "training": False, "is_training": False, "deterministic": True}


def inference_kwargs(fn: Callable[..., Any]) -> dict[str, Any]:
    """The inference-mode keyword arguments ``fn`` accepts (``train=False``, ...).

    Examples
    --------
    >>> def call(self, x, train: bool = True): ...
    >>> inference_kwargs(call)
    {'train': False}
    """
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return {}
    return {name: value for name, value in _INFERENCE_FLAGS.items() if name in params}


def _analysis_dtype(params: Any, dtype: Any) -> Any:
    """The dtype the operator will compute in: ``dtype``, else that of the parameters."""
    if dtype is not None:
        try:
            return jnp.dtype(dtype)
        except TypeError:
            return None  # the operator reports the bad dtype
    leaves = [
        leaf
        for leaf in jax.tree_util.tree_leaves(params)
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)
    ]
    return jnp.result_type(*[leaf.dtype for leaf in leaves]) if leaves else None


def _cast_state(state: Any, dtype: Any) -> Any:
    """Cast every floating leaf of the non-trainable ``state`` to ``dtype`` (others kept)."""
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        return state
    if np.dtype(dtype) == np.float64 and not x64_enabled():
        return state  # the operator refuses float64 without x64, with the fix in its message

    def cast(leaf: Any) -> Any:
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.asarray(leaf, dtype=dtype)
        return leaf

    return jax.tree_util.tree_map(cast, state)


def _build(
    curvature: str,
    apply_fn: Callable[[Any, Any], Any],
    loss: Callable[[Any, Any], Any],
    params: Any,
    data: Any,
    chunk_size: int | None,
    dtype: Any,
    prefix: str,
    where: str,
    check_deterministic: bool = True,
    normalizer: Callable[[Any], Any] | None = None,
    check_symmetric: bool = True,
    param_sharding: Any = None,
) -> PytreeOperator:
    if not callable(loss):
        raise TypeError(f"{where}: loss must be callable loss(outputs, targets)")
    options = {"chunk_size": chunk_size, "dtype": dtype, "prefix": prefix}
    options["check_deterministic"] = check_deterministic
    options["normalizer"] = normalizer
    options["check_symmetric"] = check_symmetric
    options["param_sharding"] = param_sharding
    if curvature == "ggn":
        return GGNOperator(apply_fn, loss, params, data, **options)
    if curvature != "hessian":
        raise ValueError(f"{where}: curvature must be 'hessian' or 'ggn', got {curvature!r}")

    def loss_fn(p: Any, batch: Any) -> Any:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                f"{where}: every batch must be a pair (inputs, targets), got a "
                f"{type(batch).__name__}"
            )
        inputs, targets = batch
        size = jax.tree_util.tree_leaves(batch)[0].shape[0]
        value = loss(apply_fn(p, inputs), targets)
        if isinstance(value, (tuple, list)):
            return value  # (loss_sum, normalizer): the operator checks and divides it
        if normalizer is not None and tuple(getattr(value, "shape", ())) != ():
            raise ValueError(
                f"{where}: with normalizer=, loss(outputs, targets) must return a scalar (the "
                f"mean over normalizer(batch)), got shape {tuple(value.shape)}"
            )
        return reduce_loss(value, size, f"{where}: loss")

    return HessianOperator(loss_fn, params, data, **options)


def from_linen(
    module: Any,
    variables: Mapping[str, Any],
    loss: Callable[[Any, Any], Any],
    data: Any,
    *,
    curvature: str = "hessian",
    apply_kwargs: Mapping[str, Any] | None = None,
    method: Any = None,
    chunk_size: int | None = None,
    dtype: Any = None,
    check_deterministic: bool = True,
    normalizer: Callable[[Any], Any] | None = None,
    check_symmetric: bool = True,
    param_sharding: Any = None,
) -> PytreeOperator:
    """Curvature of a Flax linen module with respect to its ``params`` collection.

    A module that normalises with the batch's statistics (a ``BatchNorm`` run with
    ``use_running_average=False``: it tries to update ``batch_stats``) is refused, naming it.
%(normalizer)s
    Parameters
    ----------
    module : flax.linen.Module
        The model, called as ``module.apply(variables, inputs, **apply_kwargs)``.
    variables : mapping
        ``{"params": ..., "batch_stats": ..., ...}`` as returned by ``module.init``. Only
        ``params`` is differentiated; the other collections are held fixed (immutable, so
        BatchNorm must run on its stored statistics), their floating leaves cast to the
        analysis dtype.
    loss : callable
        ``loss(outputs, targets)``: scalar batch mean (over ``normalizer(batch)`` if given),
        per-sample values (averaged), or a pair ``(loss_sum, normalizer)``.
    data : batch or iterable of batches
        Pairs ``(inputs, targets)``; see :func:`jax_backend.hessian`.
    curvature : {"hessian", "ggn"}
        The Hessian of the loss, or the generalised Gauss-Newton matrix ``J^T H_L J``.
    apply_kwargs : mapping, optional
        Extra keyword arguments for ``module.apply``. Default: inference mode detected
        from the signature of ``__call__`` (or ``method``): ``train=False``,
        ``training=False``, ``is_training=False`` and/or ``deterministic=True`` for the
        flags it accepts. When given, it is used exactly as given.
    method : callable or str, optional
        The module method to apply (default ``__call__``).
    chunk_size, dtype
        As in :func:`jax_backend.hessian`.
    check_deterministic : bool
        Refuse a module that draws random numbers in the loss (e.g. ``rngs=`` in
        ``apply_kwargs`` with Dropout on), as in :func:`jax_backend.hessian`.
    normalizer : callable, optional
        ``normalizer(batch) -> number`` for the pair ``(inputs, targets)``: what a scalar
        ``loss`` divides by (kept tokens, a sum of class weights); see
        :func:`jax_backend.hessian`.
    check_symmetric : bool
        The construction-time symmetry probe, as in :func:`jax_backend.hessian`.
    param_sharding : pytree of NamedSharding, "largest_axis" or Mesh, optional
        Shard the parameters over a mesh, as in :func:`jax_backend.hessian`; a pytree is
        shaped like ``variables["params"]``.

    Returns
    -------
    PytreeOperator
        A :class:`jax_backend.HessianOperator` or :class:`jax_backend.GGNOperator`;
        ``op.layout`` names are ``"params.<path>"``, ``op.unravel(v)`` returns a
        ``params`` pytree.

    Examples
    --------
    >>> import jax, numpy as np, optax, flax.linen as nn
    >>> from jax_backend import from_linen
    >>> model = nn.Dense(3)
    >>> x, y = np.ones((4, 2), np.float32), np.array([0, 1, 2, 0])
    >>> variables = model.init(jax.random.key(0), x)
    >>> op = from_linen(model, variables, optax.softmax_cross_entropy_with_integer_labels, (x, y))
    >>> op.n, op.layout.names
    (9, ['params.bias', 'params.kernel'])
    """
    import flax

    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError(
            "from_linen: variables must be the dict returned by module.init, with a 'params' "
            f"collection; got {type(variables).__name__}"
            + (f" with keys {list(variables)}" if isinstance(variables, Mapping) else "")
        )
    analysis_dtype = _analysis_dtype(variables["params"], dtype)
    others = {
        key: _cast_state(value, analysis_dtype)
        for key, value in variables.items()
        if key != "params"
    }
    if apply_kwargs is None:
        target = module.__call__ if method is None else method
        if isinstance(target, str):
            target = getattr(module, target)
        kwargs: dict[str, Any] = inference_kwargs(target)
    else:
        kwargs = dict(apply_kwargs)

    def apply_fn(params: Any, inputs: Any) -> Any:
        return module.apply({**others, "params": params}, inputs, method=method, **kwargs)

    try:
        return _build(
            curvature,
            apply_fn,
            loss,
            variables["params"],
            data,
            chunk_size,
            dtype,
            "params.",
            "from_linen",
            check_deterministic,
            normalizer,
            check_symmetric,
            param_sharding,
        )
    except flax.errors.ScopeCollectionNotFound as err:
        raise ValueError(
            "from_linen: the module reads a collection that variables lacks; pass the whole "
            f"dict returned by module.init (with 'batch_stats' for BatchNorm). Flax said: {err}"
        ) from err
    except (flax.errors.ModifyScopeVariableError, flax.errors.InvalidRngError) as err:
        refusal = linen_batch_statistics_error(err, "from_linen")
        if refusal is not None:
            raise refusal from err
        raise ValueError(
            "from_linen: the module did not run in inference mode (it tried to update a "
            "collection or asked for an RNG). Pass apply_kwargs, e.g. {'train': False}, so "
            f"BatchNorm uses its running statistics and Dropout is off. Flax said: {err}"
        ) from err


def from_nnx(
    model: Any,
    loss: Callable[[Any, Any], Any],
    data: Any,
    *,
    curvature: str = "hessian",
    chunk_size: int | None = None,
    dtype: Any = None,
    check_deterministic: bool = True,
    normalizer: Callable[[Any], Any] | None = None,
    check_symmetric: bool = True,
    param_sharding: Any = None,
) -> PytreeOperator:
    """Curvature of a Flax nnx model with respect to its ``nnx.Param`` state.

    The model is analysed in the mode it is in, as the torch backend does: one in train mode
    with a BatchNorm on the batch's statistics (``use_running_average=False``) or an active
    Dropout is refused, naming the modules; call ``model.eval()`` first (the Hessian is then
    that of the network used at inference). The model is cloned, and the clone is split with ``nnx.split(clone, nnx.Param, ...)``; the non-parameter state (batch
    statistics, RNG state) is held fixed, and each product runs ``nnx.merge`` of the
    parameters with it inside the compiled function; its floating leaves are cast to the
    analysis dtype (nnx ``BatchNorm`` keeps its statistics in float32).

    Parameters
    ----------
    model : flax.nnx.Module
        The model, called as ``model(inputs)``.
    loss : callable
        ``loss(outputs, targets)``: scalar batch mean (over ``normalizer(batch)`` if given),
        per-sample values (averaged), or a pair ``(loss_sum, normalizer)``.
    data : batch or iterable of batches
        Pairs ``(inputs, targets)``; see :func:`jax_backend.hessian`.
    curvature : {"hessian", "ggn"}
        The Hessian of the loss, or the generalised Gauss-Newton matrix.
    chunk_size, dtype
        As in :func:`jax_backend.hessian`.
    check_deterministic : bool
        Refuse a model whose evaluation-mode forward draws random numbers from a fixed key
        (default True): every product would repeat one draw; ``False`` analyses that fixed
        draw. A model that advances its ``nnx.Rngs`` in ``__call__`` (noise from
        ``self.rngs``, Dropout forced to ``deterministic=False``) is always refused: it is
        not a function of its parameters.
    normalizer : callable, optional
        ``normalizer(batch) -> number`` for the pair ``(inputs, targets)``: what a scalar
        ``loss`` divides by; see :func:`jax_backend.hessian`.
    check_symmetric : bool
        The construction-time symmetry probe, as in :func:`jax_backend.hessian`.
    param_sharding : pytree of NamedSharding, "largest_axis" or Mesh, optional
        Shard the parameters over a mesh, as in :func:`jax_backend.hessian`; a pytree is
        shaped like the pure dict of the ``nnx.Param`` state
        (``nnx.to_pure_dict(nnx.state(model, nnx.Param))``).

    Raises
    ------
    dualhess.OperatorError
        BatchNorm or Dropout in train mode (the message names the modules).

    Returns
    -------
    PytreeOperator
        ``op.layout`` names are the state paths (``"linear.kernel"``);
        ``op.unravel(v)`` returns a pure dict, usable with ``nnx.replace_by_pure_dict``.

    Examples
    --------
    >>> import numpy as np, optax
    >>> from flax import nnx
    >>> from jax_backend import from_nnx
    >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> x, y = np.ones((4, 2), np.float32), np.array([0, 1, 2, 0])
    >>> op = from_nnx(model, optax.softmax_cross_entropy_with_integer_labels, (x, y))
    >>> op.n, op.layout.names
    (9, ['bias', 'kernel'])
    """
    import flax
    from flax import nnx

    if not isinstance(model, nnx.Module):
        raise TypeError(f"from_nnx: model must be a flax.nnx.Module, got {type(model).__name__}")
    check_nnx_mode(model, "from_nnx")
    clone = nnx.clone(model)
    graphdef, param_state, rest = nnx.split(clone, nnx.Param, ...)
    pure = nnx.to_pure_dict(param_state)
    rest = _cast_state(rest, _analysis_dtype(pure, dtype))
    state_paths, state_def = jax.tree_util.tree_flatten_with_path(param_state)
    pure_paths = jax.tree_util.tree_flatten_with_path(pure)[0]
    state_names = [path_name(p).removesuffix(".value") for p, _ in state_paths]
    pure_names = [path_name(p) for p, _ in pure_paths]
    if state_names != pure_names:  # pragma: no cover - guards a Flax internals change
        raise RuntimeError(
            f"from_nnx: nnx.State leaf order {state_names} differs from its pure dict "
            f"{pure_names}; this Flax version is not supported"
        )

    def apply_fn(params: Any, inputs: Any) -> Any:
        state = jax.tree_util.tree_unflatten(state_def, jax.tree_util.tree_leaves(params))
        return nnx.merge(graphdef, state, rest)(inputs)

    try:
        return _build(
            curvature,
            apply_fn,
            loss,
            pure,
            data,
            chunk_size,
            dtype,
            "",
            "from_nnx",
            check_deterministic,
            normalizer,
            check_symmetric,
            param_sharding,
        )
    except flax.errors.TraceContextError as err:
        raise ValueError(
            "from_nnx: the model draws random numbers in __call__ even in evaluation mode (it "
            "advances its nnx.Rngs state: noise from self.rngs, Dropout built with "
            "deterministic=False, stochastic depth), so it is not a fixed function of its "
            "parameters. Make that randomness switchable (honour .eval() / a deterministic "
            f"flag) for the analysis. Flax said: {str(err).splitlines()[0]}"
        ) from err


from_linen.__doc__ = (from_linen.__doc__ or "").replace("%(normalizer)s", _NORMALIZER_DOC)
