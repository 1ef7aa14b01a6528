"""Curvature matrices other than the Hessian for JAX: the generalised Gauss-Newton matrix.

``GGNOperator`` / :func:`ggn` build ``G = J^T H_L J`` from ``apply_fn(params, inputs)`` and a
loss of the outputs, on the same base class as the Hessian (:class:`PytreeOperator`: the
whole-data-set weighting, chunking, sharding, the loss at a point). The torch backend's
counterpart is ``torch_backend/_curvature.py`` (GGN and Fisher).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from ._hessian import (
    _NORMALIZER_DOC,
    PytreeOperator,
    _batch_size,
    check_one_placement,
    check_pair,
    reduce_loss,
)

__all__ = ["GGNOperator", "ggn"]


class GGNOperator(PytreeOperator):
    """The generalised Gauss-Newton matrix ``J^T H_L J`` over the data; see :func:`ggn`."""

    def __init__(
        self,
        apply_fn: Callable[[Any, Any], Any],
        loss: Callable[[Any, Any], Any],
        params: Any,
        data: Any,
        **options: Any,
    ) -> None:
        # options: chunk_size, dtype, prefix, check_deterministic, normalizer,
        # check_symmetric, param_sharding (see PytreeOperator)
        if not callable(apply_fn) or not callable(loss):
            raise TypeError("ggn: apply_fn and loss must be callable")
        self.apply_fn = apply_fn
        self.loss = loss
        super().__init__(params, data, where="ggn", **options)

    def _split(self, batch: Any) -> tuple[Any, Any]:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                "ggn: every batch must be a pair (inputs, targets); got a "
                f"{type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            )
        return batch[0], batch[1]

    def _reduce(self, value: Any, size: int) -> jax.Array:
        """The batch's loss from ``loss(outputs, targets)``: the sum of a
        ``(loss_sum, normalizer)`` pair, else the batch mean (:func:`reduce_loss`)."""
        if self._summed:
            return value[0]
        return reduce_loss(value, size, "ggn: loss(outputs, targets)")

    def _check_batch_function(self) -> None:
        inputs, targets = self._split(self.dataset.first)
        size = _batch_size(self.dataset.first)

        def raw_loss(flat_params: jax.Array) -> Any:
            outputs = self.apply_fn(self._unravel_fn(flat_params), inputs)
            return self.loss(outputs, targets)

        raw = jax.eval_shape(raw_loss, self.params_flat)
        self._summed = check_pair(raw, "ggn: loss(outputs, targets)")
        value = raw[0] if self._summed else raw
        shape = tuple(getattr(value, "shape", ()))
        if self._summed and shape != ():
            raise ValueError(
                f"ggn: loss(outputs, targets) returned (loss_sum, normalizer) with loss_sum of "
                f"shape {shape}; loss_sum must be a scalar (the sum of the batch's losses)"
            )
        if self._normalizer is not None and shape != ():
            raise ValueError(
                f"ggn: with normalizer=, loss(outputs, targets) must return a scalar (the mean "
                f"over normalizer(batch)), got shape {shape}"
            )
        if not self._summed:
            jax.eval_shape(
                lambda p: reduce_loss(raw_loss(p), size, "ggn: loss(outputs, targets)"),
                self.params_flat,
            )
        super()._check_batch_function()

    def _batch_loss(self, flat_params: jax.Array, batch: Any) -> jax.Array:
        inputs, targets = self._split(batch)
        outputs = self.apply_fn(self._unravel_fn(flat_params), inputs)
        return self._reduce(self.loss(outputs, targets), _batch_size(batch))

    def _batch_normalizer(self, flat_params: jax.Array, batch: Any) -> Any:
        inputs, targets = self._split(batch)
        return self.loss(self.apply_fn(self._unravel_fn(flat_params), inputs), targets)[1]

    def _batch_product(self, flat_params: jax.Array, batch: Any, v: jax.Array) -> jax.Array:
        inputs, targets = self._split(batch)
        size = _batch_size(batch)

        def outputs_of(p: jax.Array) -> Any:
            return self.apply_fn(self._unravel_fn(p), inputs)

        def loss_of_outputs(outputs: Any) -> jax.Array:
            return self._reduce(self.loss(outputs, targets), size)

        outputs, jvp_fn = jax.linearize(outputs_of, flat_params)
        jv = jvp_fn(v)
        hjv = jax.jvp(jax.grad(loss_of_outputs), (outputs,), (jv,))[1]
        (jt_hjv,) = jax.linear_transpose(jvp_fn, v)(hjv)
        return jt_hjv


def ggn(
    apply_fn: Callable[[Any, Any], Any],
    loss: Callable[[Any, Any], Any],
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
) -> GGNOperator:
    """The generalised Gauss-Newton matrix ``G = J^T H_L J`` over a data set.

    ``J`` is the Jacobian of the model outputs with respect to the parameters and ``H_L``
    the Hessian of the loss with respect to the outputs; ``G`` is positive semi-definite
    for convex losses (cross-entropy, squared error). Each product is one linearisation
    (forward), its transpose (reverse) and a Hessian-vector product of the loss in output
    space.
%(normalizer)s
    Parameters
    ----------
    apply_fn : callable
        ``apply_fn(params, inputs) -> outputs`` (outputs may be any pytree).
    loss : callable
        ``loss(outputs, targets)``: a scalar (the batch mean, or the mean over
        ``normalizer(batch)``), per-sample values with a leading batch dimension, which are
        averaged (so optax losses work directly), or a pair ``(loss_sum, normalizer)``.
    params : pytree
        The parameters.
    data : batch or iterable of batches
        Every batch is a pair ``(inputs, targets)``; weighting as in :func:`hessian`.
    chunk_size, dtype, devices, check_deterministic, normalizer, check_symmetric, param_sharding
        As in :func:`jax_backend.hessian`; ``normalizer(batch)`` sees the pair
        ``(inputs, targets)``.

    References
    ----------
    N. N. Schraudolph, "Fast curvature matrix-vector products for second-order gradient
    descent", Neural Computation 14 (2002).

    Examples
    --------
    >>> import jax.numpy as jnp, numpy as np, optax
    >>> from jax_backend import ggn
    >>> x = np.eye(3, dtype=np.float32)
    >>> y = np.array([0, 1, 2])
    >>> op = ggn(lambda p, inputs: inputs @ p, optax.softmax_cross_entropy_with_integer_labels,
    ...          jnp.zeros((3, 3)), (x, y))
    >>> op.n
    9
    >>> bool(jnp.linalg.eigvalsh(op.to_dense()).min() > -1e-6)  # PSD
    True
    """
    check_one_placement(devices, param_sharding, "ggn")
    op = GGNOperator(
        apply_fn,
        loss,
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


ggn.__doc__ = (ggn.__doc__ or "").replace("%(normalizer)s", _NORMALIZER_DOC)
