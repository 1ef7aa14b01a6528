"""Following the spectrum of a changing operator during training (what every monitor shares).

:class:`SpectrumTracker` follows ``lambda_max`` and the trace while a model trains,
warm-starting each top-eigenvalue measurement from the previous top eigenvector
(:func:`dualhess.eigsh` with ``v0=``): while the Hessian changes slowly, a measurement costs a
few products. It is the framework-neutral core of ``torch_backend.HessianMonitor``, its
Lightning callback and ``jax_backend.monitor.HessianMonitor``; :class:`TrackerViews` are the
history views they share; their shared settings are documented once (``%(monitor_measurement)s``
in :mod:`dualhess._docs`).

References
----------
Y. Saad, *Numerical Methods for Large Eigenvalue Problems*, 2nd ed., SIAM (2011), Sec. 3.2
(the residual bound ``|theta - lambda| <= ||r||``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np

from ._array import to_numpy
from ._docs import fill_doc
from ._eigsh import eigsh
from ._operator import Operator
from ._trace import trace
from ._util import check_operator, check_positive_int
from ._wrappers import HostOperator

__all__ = ["MONITOR_METRICS", "DEFAULT_MONITOR_METRICS", "SpectrumTracker", "TrackerViews"]

#: Metrics the monitors can log.
MONITOR_METRICS = ("top_eigenvalue", "trace", "gradient_overlap")
#: What they log by default.
DEFAULT_MONITOR_METRICS = ("top_eigenvalue", "trace")


def _host(x: Any) -> np.ndarray:
    return np.asarray(to_numpy(x), dtype=np.float64)


class TrackerViews:
    """The history views every training-time monitor shares (torch, JAX, Lightning).

    A monitor holds a :class:`SpectrumTracker` as ``self.tracker``; these read through it.
    """

    tracker: SpectrumTracker

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.tracker.history

    @property
    def steps(self) -> list[int]:
        return self.tracker.steps

    def values(self, metric: str) -> list[float]:
        """The logged values of ``"top_eigenvalue"`` or ``"trace"``."""
        return self.tracker.values(metric)

    def to_dict(self) -> dict[str, Any]:
        return self.tracker.to_dict()

    def save(self, path: Any) -> None:
        """Write the settings and the history as JSON."""
        self.tracker.save(path)

    def plot(self, path: Any = None, **kwargs: Any) -> Any:
        """Plot the history (one panel per metric); saves to ``path`` when given.

        ``reference=2 / lr`` draws the edge-of-stability line on the top-eigenvalue panel
        (see :meth:`SpectrumTracker.plot`).
        """
        return self.tracker.plot(path, **kwargs)


@fill_doc
class SpectrumTracker:
    """Follow ``lambda_max`` and the trace of a changing operator (the monitors' core).

    Call :meth:`measure` with the operator at the current parameters. The top eigenvalue is
    computed by :func:`dualhess.eigsh` (``k=1``), warm-started (``v0=``) from the previous top
    eigenvector, so a slowly changing Hessian costs a few products per measurement. The trace uses
    :func:`dualhess.trace` with the generator :meth:`trace_rng` derived from ``(seed, step)``
    (``numpy.random.default_rng([seed, step, 1])``), so a from-scratch computation at the
    same step with that generator reproduces it exactly.

    Parameters
    ----------
    every : int
        :meth:`due` is true every ``every`` steps (step 0 included).
    %(monitor_measurement)s
    host_lanczos : bool, optional
        Run the Lanczos bookkeeping in numpy on the host (:class:`HostOperator`), products
        on the device. Default: ``op.fixed_shapes`` (True for JAX operators: eager JAX
        recompiles small operations for every new basis size).

    Examples
    --------
    >>> import numpy as np, dualhess
    >>> tracker = SpectrumTracker(every=1, metrics=("top_eigenvalue",), tol=1e-8)
    >>> for step in range(3):
    ...     _ = tracker.measure(dualhess.DenseOperator(np.diag([1.0, 2.0, 3.0 + step])), step)
    >>> [round(v, 6) for v in tracker.values("top_eigenvalue")]
    [3.0, 4.0, 5.0]
    """

    def __init__(
        self,
        *,
        every: int = 100,
        metrics: Iterable[str] = DEFAULT_MONITOR_METRICS,
        tol: float = 1e-4,
        num_steps: int = 20,
        max_matvecs: int | None = None,
        trace_method: str = "hutchinson",
        trace_matvecs: int = 50,
        seed: int = 0,
        warm_start: bool = True,
        host_lanczos: bool | None = None,
        overlap_k: int = 10,
    ) -> None:
        self.every = check_positive_int(every, "every", "SpectrumTracker")
        self.overlap_k = check_positive_int(overlap_k, "overlap_k", "SpectrumTracker")
        self.host_lanczos = host_lanczos
        metrics = tuple(metrics)
        unknown = [m for m in metrics if m not in MONITOR_METRICS]
        if unknown or not metrics:
            raise ValueError(f"metrics must be a non-empty subset of {MONITOR_METRICS}, got {metrics}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.metrics = metrics
        self.tol = float(tol)
        self.num_steps = check_positive_int(num_steps, "num_steps", "SpectrumTracker")
        self.max_matvecs = max_matvecs
        self.trace_method = trace_method
        self.trace_matvecs = check_positive_int(trace_matvecs, "trace_matvecs", "SpectrumTracker")
        self.seed = int(seed)
        self.warm_start = warm_start
        self.history: list[dict[str, Any]] = []
        self._vector: np.ndarray | None = None

    @classmethod
    def with_options(cls, owner: str, **options: Any) -> SpectrumTracker:
        """A tracker from a monitor's keyword arguments; an unknown one names the monitor and
        every setting it takes (the monitors forward their measurement settings here, so
        each setting is declared once, in :meth:`__init__`)."""
        import inspect

        accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise TypeError(
                f"{owner}: unknown setting(s) {', '.join(map(repr, unknown))}; the "
                f"measurement settings are {', '.join(accepted)}"
            )
        return cls(**options)

    def due(self, step: int) -> bool:
        """Whether ``step`` is a measurement step (``step % every == 0``)."""
        return int(step) % self.every == 0

    def start_rng(self, step: int) -> np.random.Generator:
        """Generator of the cold start vector at ``step``: ``default_rng([seed, step, 0])``."""
        return np.random.default_rng([self.seed, int(step), 0])

    def trace_rng(self, step: int) -> np.random.Generator:
        """Generator of the trace probes at ``step``: ``default_rng([seed, step, 1])``."""
        return np.random.default_rng([self.seed, int(step), 1])

    def measure(self, op: Operator, step: int) -> dict[str, Any]:
        """Measure the metrics of ``op`` at ``step``, append the record and return it."""
        op = check_operator(op, "SpectrumTracker.measure")
        record: dict[str, Any] = {"step": int(step)}
        before = op.num_matvecs
        if "top_eigenvalue" in self.metrics:
            start = None
            warm = self.warm_start and self._vector is not None and self._vector.shape == (op.n,)
            host = self.host_lanczos
            if host is None:
                host = op.fixed_shapes
            eigen_op = HostOperator(op) if host else op
            if warm:
                start = eigen_op.asarray(self._vector)
            eig = eigsh(
                eigen_op, k=1, which="LA", tol=self.tol, max_basis=max(self.num_steps, 2),
                max_matvecs=self.max_matvecs, seed=self.start_rng(step), v0=start,
            )
            self._vector = _host(eig.vectors[:, 0])
            record.update(
                top_eigenvalue=float(eig.values[0]),
                top_residual=float(eig.residuals[0]),
                top_converged=bool(eig.converged[0]),
                top_matvecs=int(eig.num_matvecs),
                warm_started=bool(warm),
            )
        if "trace" in self.metrics:
            est = trace(op, method=self.trace_method, num_matvecs=self.trace_matvecs,
                         seed=self.trace_rng(step))
            record.update(trace=float(est.value), trace_stderr=float(est.stderr))
        if "gradient_overlap" in self.metrics:
            record.update(self._overlap(op, step))
        record["num_matvecs"] = op.num_matvecs - before
        self.history.append(record)
        return record

    def _overlap(self, op: Operator, step: int) -> dict[str, Any]:
        """``||P_k g||^2 / ||g||^2`` with the top ``overlap_k`` eigenvectors (Gur-Ari et al.)."""
        from ._overlap import overlap_of

        k = min(self.overlap_k, op.n - 1)
        host = op.fixed_shapes if self.host_lanczos is None else self.host_lanczos
        eigen_op = HostOperator(op) if host else op
        # the overlap needs the eigenvectors, not only the values: tol bounds the residuals
        eig = eigsh(eigen_op, k=k, which="LA", tol=self.tol, max_matvecs=self.max_matvecs,
                    seed=self.start_rng(step), criterion="residual")
        g = op.gradient()
        value, _ = overlap_of(g, eig.vectors)
        return {"gradient_overlap": value, "overlap_k": int(k),
                "gradient_norm": float(np.linalg.norm(_host(g)))}

    def values(self, metric: str) -> list[float]:
        """The logged values of one metric, in step order."""
        return [r[metric] for r in self.history if metric in r]

    @property
    def steps(self) -> list[int]:
        return [r["step"] for r in self.history]

    def to_dict(self) -> dict[str, Any]:
        return {
            "every": self.every,
            "metrics": list(self.metrics),
            "tol": self.tol,
            "trace_method": self.trace_method,
            "trace_matvecs": self.trace_matvecs,
            "seed": self.seed,
            "history": list(self.history),
        }

    def save(self, path: Any) -> None:
        """Write :meth:`to_dict` as JSON."""
        with open(path, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2)

    def plot(self, path: Any = None, *, axes: Any = None, reference: float | None = None,
             reference_label: str | None = None) -> Any:
        """Plot the history: one panel per metric (trace with +-2 stderr band), axes labelled.

        Parameters
        ----------
        path : path, optional
            Save the figure there.
        axes : matplotlib axes, optional
            One per metric.
        reference : float, optional
            A horizontal line on the top-eigenvalue panel, e.g. ``2 / lr``: gradient descent
            with step ``lr`` is unstable along directions sharper than ``2 / lr``, and
            full-batch training hovers there (the edge of stability, Cohen et al. 2021,
            https://arxiv.org/abs/2103.00065).
        reference_label : str, optional
            Its legend entry (default ``2/eta = <value>``).

        Returns
        -------
        matplotlib.figure.Figure
        """
        from ._plotting import plot_history

        return plot_history(self, path, axes=axes, reference=reference,
                            reference_label=reference_label)
