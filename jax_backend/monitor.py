"""Hessian monitoring in a JAX / optax / Flax training loop.

:class:`HessianMonitor` is called with the current parameter pytree once per step; every
``every`` steps it builds :func:`jax_backend.hessian` at those parameters on a fixed
monitoring set and logs the top eigenvalue (restarted Lanczos, warm-started from the
previous top eigenvector, :func:`dualhess.eigsh` with ``v0=``) and the trace
(:func:`dualhess.trace`, probes from ``(seed, step)``). The history can be saved and plotted.
It is the JAX twin of ``torch_backend.monitor.HessianMonitor``; both share the
framework-neutral core :class:`dualhess.per_layer.SpectrumTracker`.

With Flax, pass the parameter pytree: ``state.params`` (linen ``TrainState``) and a loss
``loss_fn(params, batch)`` that calls ``module.apply({"params": params}, x)``; for nnx, pass
``nnx.state(model, nnx.Param)`` and merge it with the graph definition inside ``loss_fn``.

Examples
--------
>>> import jax, jax.numpy as jnp, numpy as np, optax
>>> from jax_backend.monitor import HessianMonitor
>>> x = np.linspace(-1.0, 1.0, 16, dtype=np.float32)[:, None]
>>> t = 2.0 * x[:, 0]
>>> def loss_fn(p, batch):
...     inputs, targets = batch
...     return jnp.mean((jnp.tanh(inputs @ p["w"]) @ p["v"] - targets) ** 2)
>>> params = {"w": jnp.ones((1, 2)), "v": jnp.ones(2)}
>>> monitor = HessianMonitor(loss_fn, (x, t), every=2, trace_matvecs=4)
>>> opt = optax.sgd(0.1)
>>> state = opt.init(params)
>>> for step in range(3):
...     _ = monitor.step(step, params)
...     grads = jax.grad(loss_fn)(params, (x, t))
...     updates, state = opt.update(grads, state)
...     params = optax.apply_updates(params, updates)
>>> monitor.steps
[0, 2]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from dualhess._docs import fill_doc
from dualhess._operator import OperatorError
from dualhess._tracking import SpectrumTracker, TrackerViews

from ._hessian import HessianOperator, hessian

__all__ = ["HessianMonitor"]


@fill_doc
class HessianMonitor(TrackerViews):
    """Log the Hessian's top eigenvalue and trace every ``every`` steps of a JAX loop.

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn(params, batch) -> scalar`` (the mean loss of a batch), as for
        :func:`jax_backend.hessian`.
    data : batch or iterable of batches
        The fixed monitoring set.
    every : int
        Measure at steps ``0, every, 2 every, ...``.
    %(monitor_measurement)s
    chunk_size, dtype :
        Passed to :func:`jax_backend.hessian`.
    log_fn : callable, optional
        Called with each record (a dict).
    """

    def __init__(
        self,
        loss_fn: Callable[[Any, Any], Any],
        data: Any,
        *,
        every: int = 100,
        chunk_size: int | None = None,
        dtype: Any = None,
        log_fn: Callable[[dict[str, Any]], Any] | None = None,
        **measurement: Any,
    ) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (params, batch) -> scalar, got {loss_fn!r}")
        self.loss_fn = loss_fn
        self.data = data
        self.chunk_size = chunk_size
        self.dtype = dtype
        self.log_fn = log_fn
        self.tracker = SpectrumTracker.with_options("jax_backend.HessianMonitor", every=every, **measurement)

    def operator(self, params: Any) -> HessianOperator:
        """The Hessian operator at ``params`` on the monitoring set.

        The first call builds it; later calls with parameters of the same structure move it
        to the new point (its compiled products take the parameters as an argument), so a
        measurement compiles nothing new.
        """
        op = getattr(self, "_op", None)
        if op is not None:
            try:
                flat = op.ravel(params)
            except OperatorError:
                op = None  # another structure: build afresh
            else:
                if not bool(jnp.all(jnp.isfinite(flat))):
                    raise ValueError("HessianMonitor: the parameters contain NaN or Inf")
                op.params_flat = flat
                op._linearized = None  # the kept linearisation belongs to the old point
                return op
        self._op = hessian(self.loss_fn, params, self.data, chunk_size=self.chunk_size,
                           dtype=self.dtype)
        return self._op

    def step(self, step: int, params: Any) -> dict[str, Any] | None:
        """Call once per training step with the current parameters; measures when due."""
        if not self.tracker.due(step):
            return None
        return self.measure(step, params)

    def measure(self, step: int, params: Any) -> dict[str, Any]:
        """Measure now at ``params`` and log the record as step ``step``."""
        record = self.tracker.measure(self.operator(params), int(step))
        if self.log_fn is not None:
            self.log_fn(dict(record))
        return record
