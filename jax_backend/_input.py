"""The Hessian of a loss with respect to the inputs of one batch, as a :class:`dualhess.Operator`.

``H = d^2 L / dx^2`` with ``x`` the flattened floating-point arrays of the batch (or those named
in ``wrt``) and the parameters fixed. It is the parameter Hessian of :mod:`jax_backend._hessian`
with the roles swapped: the "parameters" are the input arrays (a dict by name, so
``op.layout`` names them), the model's parameters and the other leaves of the batch are
constants, and the data set is a single batch of weight one, so the product is linearised once
(``jax.linearize``) and every product runs only its tangent pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._data import path_name
from ._hessian import HessianOperator

__all__ = ["input_hessian", "InputHessianOperator"]


class InputHessianOperator(HessianOperator):
    """The Hessian of one batch's loss with respect to its inputs; see :func:`input_hessian`.

    ``op.layout`` names the input arrays (``"inputs"`` for a single array, dict keys,
    ``"a/b"`` when nested, tuple indices ``"0"``); ``op.params`` is ``{name: array}`` of the
    inputs the Hessian is taken at, and ``op.unravel``/``op.ravel`` convert.
    """


def _is_floating(leaf: Any) -> bool:
    return jnp.issubdtype(np.asarray(leaf).dtype if not hasattr(leaf, "dtype") else leaf.dtype,
                          jnp.floating)


def _select(named: list[tuple[str, Any]], wrt: str | Sequence[str] | None) -> list[int]:
    names = [name for name, _ in named]
    if wrt is not None:
        wanted = [wrt] if isinstance(wrt, str) else list(wrt)
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise KeyError(f"input_hessian: wrt names {unknown} not in the batch; known: {names}")
        chosen = [i for i, name in enumerate(names) if name in wanted]
        integer = [names[i] for i in chosen if not _is_floating(named[i][1])]
        if integer:
            raise TypeError(
                f"input_hessian: inputs {integer} are integer arrays, which cannot be "
                "differentiated (token ids, indices). Differentiate the embeddings instead "
                "(embed outside the loss and pass the embedded array in the batch)"
            )
        return chosen
    chosen = [i for i, (_, leaf) in enumerate(named) if _is_floating(leaf)]
    if not chosen:
        dtypes = {name: str(np.asarray(leaf).dtype) for name, leaf in named}
        raise TypeError(
            f"input_hessian: the batch has no floating-point array to differentiate ({dtypes}). "
            "Integer inputs such as token ids cannot be differentiated: differentiate the "
            "embeddings instead (embed outside the loss and pass the embedded array)"
        )
    return chosen


def input_hessian(
    loss_fn: Callable[[Any, Any], Any],
    params: Any,
    batch: Any,
    *,
    wrt: str | Sequence[str] | None = None,
    chunk_size: int | None = None,
    dtype: Any = None,
) -> InputHessianOperator:
    """The Hessian of ``loss_fn(params, batch)`` with respect to the arrays of ONE batch.

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn(params, batch) -> scalar``, as for :func:`jax_backend.hessian`.
    params : pytree
        The parameters, held fixed (cast to ``dtype`` when it is given).
    batch : pytree
        One batch (an array, a tuple such as ``(x, y)``, a dict). Its leaves need no common
        leading dimension (collocation and boundary points of a physics-informed loss may
        differ in number).
    wrt : str or list of str, optional
        The names of the arrays to differentiate (``op.layout.names``): ``"inputs"`` for a
        single array, dict keys (``"a/b"`` when nested), tuple indices (``"0"``). Default:
        every floating-point leaf of the batch (integer labels stay constants).
    chunk_size : int or "auto", optional
        As in :func:`jax_backend.hessian`.
    dtype : dtype, optional
        Computation dtype of the inputs (and of ``params``); float64 needs
        ``jax_enable_x64``.

    Returns
    -------
    InputHessianOperator
        An operator on flat vectors of the concatenated inputs (in ``op.layout`` order).

    Raises
    ------
    TypeError
        An integer array (token ids) named in ``wrt``, or no floating array in the batch.

    Examples
    --------
    >>> import jax.numpy as jnp, numpy as np
    >>> from jax_backend import input_hessian
    >>> x, y = np.ones((4, 3), np.float32), np.zeros(4, np.float32)
    >>> op = input_hessian(lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2), jnp.ones(3), (x, y),
    ...                    wrt="0")
    >>> op.shape, op.layout.names
    ((12, 12), ['0'])
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(batch)
    if not flat:
        raise ValueError("input_hessian: the batch has no array leaves")
    named = [
        (path_name(path) if path else "inputs", leaf if hasattr(leaf, "dtype") else np.asarray(leaf))
        for path, leaf in flat
    ]
    chosen = _select(named, wrt)
    inputs = {named[i][0]: named[i][1] for i in chosen}
    for name, leaf in named:
        if name not in inputs and _is_floating(leaf) and not bool(jnp.all(jnp.isfinite(leaf))):
            raise ValueError(f"input_hessian: batch leaf {name!r} contains NaN or Inf")
    if dtype is not None:
        params = jax.tree_util.tree_map(
            lambda p: jnp.asarray(p, dtype) if _is_floating(p) else p, params
        )
    leaves = [leaf for _, leaf in named]

    def loss_of_inputs(xs: dict[str, jax.Array], _: Any) -> jax.Array:
        full = [xs.get(name, leaf) for (name, _), leaf in zip(named, leaves)]
        return loss_fn(params, jax.tree_util.tree_unflatten(treedef, full))

    one = np.zeros((1,), np.float32)  # the data set: one batch of weight 1 (closed over)
    return InputHessianOperator(loss_of_inputs, inputs, one, chunk_size=chunk_size, dtype=dtype)
