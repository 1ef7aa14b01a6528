"""Per-layer spectra through parameter blocks, and warm-started spectrum tracking.

The Hessian block of a group of parameters ``S`` (one layer: its weight and bias) is the
principal submatrix ``H[S, S]``. :class:`BlockOperator` applies it matrix-free to any
operator with a :class:`~dualhess.ParamLayout`: pad the block vector with zeros, multiply by
the full operator, keep the rows of ``S``. A backend may build the block directly instead
(``block_operator=``, e.g. ``torch_backend.hessian(..., params=names)``, which differentiates
only the selected parameters and is cheaper).

:func:`per_layer_spectra` reports the top eigenvalue and the trace of every block in one
table (:class:`PerLayerSpectra`, with ``.table()`` and ``.plot()``). PyHessian users asked
for this (PyHessian issue #10).

:func:`top_eigenpair` is an explicitly restarted Lanczos iteration for the largest
eigenvalue that accepts a *start vector*, and :class:`SpectrumTracker` uses it to follow
``lambda_max`` and the trace during training, warm-starting each measurement from the
previous top eigenvector (the framework-neutral core of ``torch_backend.HessianMonitor`` and
``jax_backend.monitor.HessianMonitor``).

References
----------
Y. Saad, *Numerical Methods for Large Eigenvalue Problems*, 2nd ed., SIAM (2011), Sec. 6.3
(explicitly restarted Lanczos) and Sec. 3.2 (the residual bound ``|theta - lambda| <= ||r||``).
Z. Yao, A. Gholami, K. Keutzer, M. Mahoney, "PyHessian: Neural networks through the lens of
the Hessian", IEEE BigData (2020) (per-block Hessian spectra).

Examples
--------
>>> import numpy as np
>>> from dualhess import DenseOperator, ParamLayout
>>> from dualhess import per_layer_spectra
>>> op = DenseOperator(np.diag([4.0, 1.0, 3.0, 2.0, -1.0]))
>>> op.layout = ParamLayout.from_shapes([("a.weight", (2,)), ("a.bias", (1,)), ("b.weight", (2,))])
>>> result = per_layer_spectra(op, seed=0)
>>> [(row["name"], round(row["top_eigenvalue"], 10), round(row["trace"], 10))
...  for row in result.rows()]
[('a', 4.0, 8.0), ('b', 2.0, 1.0), ('(all)', 4.0, 9.0)]
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ._array import array_namespace, default_rng, device, to_numpy
from ._lanczos import lanczos
from ._operator import ExactUnavailableError, Operator, ParamEntry, ParamLayout
from ._results import Eigen, Result
from ._trace import trace
from ._util import check_operator, check_positive_int

__all__ = [
    "BlockOperator",
    "LayerSpectrum",
    "PerLayerSpectra",
    "group_by_layer",
    "per_layer_spectra",
    "top_eigenpair",
    "HostOperator",
    "SpectrumTracker",
    "MONITOR_METRICS",
]

#: Metrics the monitors can log.
MONITOR_METRICS = ("top_eigenvalue", "trace")


# ---------------------------------------------------------------------- top eigenpair
def _host(x: Any) -> np.ndarray:
    return np.asarray(to_numpy(x), dtype=np.float64)


def _norm(x: Any) -> float:
    xp = array_namespace(x)
    return float(xp.linalg.vector_norm(x))


def top_eigenpair(
    op: Any,
    *,
    start: Any = None,
    tol: float = 1e-6,
    num_steps: int = 20,
    max_matvecs: int | None = None,
    seed: Any = None,
) -> Eigen:
    """The largest (algebraic) eigenpair by explicitly restarted Lanczos, from a start vector.

    Each cycle runs ``num_steps`` Lanczos steps (full reorthogonalisation) from the current
    vector, takes the top Ritz pair ``(theta, y)``, and stops when the residual
    ``||H y - theta y|| <= tol * |theta|``; otherwise it restarts from ``y``. A good start
    vector (the previous top eigenvector during training) converges in one cycle.

    Parameters
    ----------
    op : Operator or square 2-D array
        A symmetric operator.
    start : array, shape (n,), optional
        Start vector (a native array or numpy). Default: Gaussian from ``seed``.
    tol : float
        Relative residual tolerance. Since ``|theta - lambda| <= ||H y - theta y||`` for a
        symmetric operator, ``theta`` is within ``tol * |theta|`` of an eigenvalue.
    num_steps : int
        Lanczos steps per cycle (capped at ``n``).
    max_matvecs : int, optional
        Budget of products (default ``50 * num_steps``); ``converged`` is False when it runs out.
    seed : int, numpy.random.Generator or None
        Randomness for the default start vector.

    Returns
    -------
    Eigen
        ``values`` (1,), ``vectors`` native (n, 1), ``residuals``, ``converged``,
        ``num_matvecs`` (including one product per cycle for the residual).

    Examples
    --------
    >>> import numpy as np, dualhess
    >>> from dualhess._per_layer import top_eigenpair
    >>> op = dualhess.DenseOperator(np.diag(np.arange(1.0, 101.0)))
    >>> eig = top_eigenpair(op, tol=1e-10, seed=0)
    >>> round(float(eig.values[0]), 8), bool(eig.converged[0])
    (100.0, True)
    """
    op = check_operator(op, "top_eigenpair")
    steps = check_positive_int(num_steps, "num_steps", "top_eigenpair")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"top_eigenpair: tol must be a positive number, got {tol!r}")
    budget = 50 * steps if max_matvecs is None else check_positive_int(
        max_matvecs, "max_matvecs", "top_eigenpair"
    )
    rng = default_rng(seed)
    if start is None:
        x = op.asarray(rng.standard_normal(op.n))
    else:
        x = start if not isinstance(start, np.ndarray) else op.asarray(start)
        if tuple(x.shape) != (op.n,):
            raise ValueError(
                f"top_eigenpair: start must have shape ({op.n},), got {tuple(x.shape)}"
            )
        if x.dtype != op.dtype:
            x = op.asarray(to_numpy(x))
        if not (_norm(x) > 0 and math.isfinite(_norm(x))):
            raise ValueError("top_eigenpair: the start vector is zero or not finite")
    xp = array_namespace(x)
    before = op.num_matvecs
    theta, y, residual, converged = math.nan, x, math.inf, False
    while True:
        spent = op.num_matvecs - before
        m = min(steps, op.n, budget - spent - 1)
        if m < 1:
            break
        tri = lanczos(op, m, start=x, return_basis=True)
        used = int(np.asarray(tri.num_steps).reshape(-1)[0])
        ritz, vectors = np.linalg.eigh(tri.matrix())
        theta = float(ritz[-1])
        basis = tri.basis[:, :used]
        y = basis @ op.asarray(vectors[:, -1])
        y = y / _norm(y)
        residual = _norm(op.matvec(y) - theta * y)
        converged = residual <= tol * max(abs(theta), np.finfo(np.float64).tiny)
        if converged or bool(np.asarray(tri.breakdown).reshape(-1)[0]):
            break  # after a breakdown the Ritz pair is exact: a restart cannot improve it
        x = y
    if math.isnan(theta):
        raise ValueError(f"top_eigenpair: max_matvecs={budget} leaves no room for a Lanczos step")
    return Eigen(
        values=np.array([theta]),
        vectors=xp.reshape(y, (-1, 1)),
        residuals=np.array([residual]),
        converged=np.array([bool(converged)]),
        num_matvecs=op.num_matvecs - before,
        which="LA",
        tol=float(tol),
    )


class HostOperator(Operator):
    """View of an operator on numpy float64 vectors (each product crosses to the device).

    Small eager array operations on JAX arrays compile once per new shape; Lanczos'
    growing basis then compiles at every step. Running the Lanczos bookkeeping on the host
    in numpy, with only the products on the device, avoids that (n floats cross per product).
    """

    def __init__(self, op: Operator) -> None:
        self.parent = op
        self.layout = getattr(op, "layout", None)
        super().__init__(op.shape, np.float64, chunk_size=op.chunk_size,
                         check_finite=op.check_finite)

    def _matmat(self, V: np.ndarray) -> np.ndarray:
        return _host(self.parent.matmat(self.parent.asarray(V)))

    def _matvec(self, v: np.ndarray) -> np.ndarray:
        return _host(self.parent.matvec(self.parent.asarray(v)))


# ---------------------------------------------------------------------- blocks
class BlockOperator(Operator):
    """The principal submatrix ``H[S, S]`` of an operator for a group of parameters ``S``.

    A block vector is padded with zeros to the full length, multiplied by the full operator,
    and restricted back to ``S``: one full product per block product, exact, and for any
    framework.

    Parameters
    ----------
    op : Operator
        The full operator; must have a ``layout``.
    names : sequence of str or callable
        The parameters of the block (names or a predicate on names).

    Examples
    --------
    >>> import numpy as np
    >>> from dualhess import DenseOperator, ParamLayout
    >>> op = DenseOperator(np.arange(9.0).reshape(3, 3))
    >>> op.layout = ParamLayout.from_shapes([("w", (2,)), ("b", (1,))])
    >>> BlockOperator(op, ["b"]).to_dense()
    array([[8.]])
    """

    def __init__(self, op: Operator, names: Sequence[str] | Callable[[str], bool]) -> None:
        layout = getattr(op, "layout", None)
        if layout is None:
            raise ValueError(
                "BlockOperator needs an operator with a parameter layout (op.layout); "
                "backend operators have one, for a DenseOperator set op.layout = ParamLayout..."
            )
        if layout.size != op.n:
            raise ValueError(f"op.layout has size {layout.size} but the operator has n={op.n}")
        self.parent = op
        self.entries: list[ParamEntry] = layout.select(names)
        self.layout = ParamLayout.from_shapes((e.name, e.shape) for e in self.entries)
        self._chosen = {e.name for e in self.entries}
        like = op.asarray(np.zeros(0))
        super().__init__(
            (self.layout.size, self.layout.size),
            op.dtype,
            like=like,
            chunk_size=op.chunk_size,
            check_finite=op.check_finite,
        )

    def _matmat(self, V: Any) -> Any:
        xp = array_namespace(V)
        k = V.shape[1]
        pieces = []
        for entry in self.parent.layout:
            if entry.name in self._chosen:
                own = self.layout[entry.name]
                pieces.append(V[own.start : own.stop, :])
            else:
                pieces.append(xp.zeros((entry.size, k), dtype=V.dtype, device=device(V)))
        full = self.parent.matmat(xp.concat(pieces, axis=0))
        return xp.concat([full[e.start : e.stop, :] for e in self.entries], axis=0)

    def exact_diagonal(self) -> Any:
        diag = self.parent.exact_diagonal()
        xp = array_namespace(diag)
        return xp.concat([diag[e.start : e.stop] for e in self.entries])


def group_by_layer(layout: ParamLayout) -> dict[str, list[str]]:
    """Group parameter names by their module: ``"fc1.weight", "fc1.bias" -> "fc1"``.

    The group is the name without its last dotted component (a top-level parameter is its
    own group); groups keep the layout order.

    Examples
    --------
    >>> layout = ParamLayout.from_shapes([("0.weight", (2, 2)), ("0.bias", (2,)), ("scale", ())])
    >>> group_by_layer(layout)
    {'0': ['0.weight', '0.bias'], 'scale': ['scale']}
    """
    groups: dict[str, list[str]] = {}
    for name in layout.names:
        key = name.rsplit(".", 1)[0] if "." in name else name
        groups.setdefault(key, []).append(name)
    return groups


# ---------------------------------------------------------------------- results
@dataclasses.dataclass(frozen=True)
class LayerSpectrum(Result):
    """Top eigenvalue and trace of one parameter block.

    Attributes
    ----------
    name : str
        The group label (the layer).
    params : tuple of str
        The parameters of the block.
    size : int
        The block dimension.
    top_eigenvalue, top_residual : float
        The largest eigenvalue of the block and its residual norm (0 when computed densely).
    trace, trace_stderr : float
        The trace of the block and its standard error (0 when exact).
    method : str
        ``"dense"`` (block built column by column, exact eigenvalues and trace),
        ``"lanczos+exact"`` (exact diagonal from the backend) or ``"lanczos+<trace method>"``.
    num_matvecs : int
        Block products spent.
    """

    name: str
    params: tuple[str, ...]
    size: int
    top_eigenvalue: float
    top_residual: float
    trace: float
    trace_stderr: float
    method: str
    num_matvecs: int


@dataclasses.dataclass(frozen=True)
class PerLayerSpectra(Result):
    """Per-layer spectra: one :class:`LayerSpectrum` per block, plus the whole operator.

    ``rows()`` gives plain dicts, ``table()`` a text/markdown table, ``plot()`` a bar chart;
    ``result["fc1"]`` looks a layer up by name.
    """

    layers: tuple[LayerSpectrum, ...]
    total: LayerSpectrum | None = None

    def __getitem__(self, name: str) -> LayerSpectrum:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r}; known: {[layer.name for layer in self.layers]}")

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def num_matvecs(self) -> int:
        total = self.total.num_matvecs if self.total is not None else 0
        return total + sum(layer.num_matvecs for layer in self.layers)

    def rows(self, include_total: bool = True) -> list[dict[str, Any]]:
        """One dict per layer (and the whole operator last, labelled ``"(all)"``)."""
        layers = list(self.layers)
        if include_total and self.total is not None:
            layers.append(self.total)
        return [layer.to_dict() for layer in layers]

    def table(self, fmt: str = "text") -> str:
        """The table as text (``fmt="text"``) or GitHub markdown (``fmt="markdown"``)."""
        if fmt not in ("text", "markdown"):
            raise ValueError(f"fmt must be 'text' or 'markdown', got {fmt!r}")
        head = ["layer", "size", "top eigenvalue", "trace", "trace stderr", "method"]
        body = [
            [
                r["name"],
                str(r["size"]),
                f"{r['top_eigenvalue']:.6g}",
                f"{r['trace']:.6g}",
                f"{r['trace_stderr']:.2g}",
                r["method"],
            ]
            for r in self.rows()
        ]
        if fmt == "markdown":
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(row) + " |" for row in body]
            return "\n".join(lines)
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        fmt_row = "  ".join(f"{{:<{w}}}" for w in widths).format
        return "\n".join([fmt_row(*head), fmt_row(*("-" * w for w in widths))] + [
            fmt_row(*row) for row in body
        ])

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: Any = None, *, axes: Any = None) -> Any:
        """Bar charts of the top eigenvalue and the trace per layer (symlog scale).

        Parameters
        ----------
        path : str or path, optional
            Save the figure there.
        axes : pair of matplotlib axes, optional
            Draw into these; default: a new figure with two panels.

        Returns
        -------
        matplotlib.figure.Figure
        """
        import matplotlib.pyplot as plt

        if axes is None:
            fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.2 * len(self.layers) + 3), 3.5))
        else:
            fig = axes[0].figure
        names = [layer.name for layer in self.layers]
        x = np.arange(len(names))
        top = [layer.top_eigenvalue for layer in self.layers]
        tr = [layer.trace for layer in self.layers]
        err = [layer.trace_stderr for layer in self.layers]
        axes[0].bar(x, top, color="C0")
        axes[0].set_title("top eigenvalue per layer")
        axes[1].bar(x, tr, yerr=err, color="C1", capsize=3)
        axes[1].set_title("trace per layer")
        for ax in axes:
            ax.set_xticks(x, names, rotation=45, ha="right")
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.axhline(0.0, color="0.5", lw=0.5)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
        return fig


# ---------------------------------------------------------------------- the computation
def _resolve_groups(
    layout: ParamLayout, groups: Any
) -> dict[str, list[str]]:
    if groups is None or groups == "layer":
        return group_by_layer(layout)
    if groups == "parameter":
        return {name: [name] for name in layout.names}
    if isinstance(groups, Mapping):
        out = {}
        for label, names in groups.items():
            out[str(label)] = [e.name for e in layout.select(names)]
        if not out:
            raise ValueError("per_layer_spectra: groups is empty")
        return out
    raise ValueError(
        "per_layer_spectra: groups must be 'layer', 'parameter' or a mapping "
        f"{{label: names or predicate}}, got {groups!r}"
    )


def _summarise(
    block: Operator,
    name: str,
    params: Sequence[str],
    *,
    tol: float,
    trace_method: str,
    trace_matvecs: int,
    seed: np.random.Generator,
    exact_diag: np.ndarray | None,
) -> LayerSpectrum:
    before = block.num_matvecs
    if block.n <= trace_matvecs:
        # Building the block costs n <= trace_matvecs products and gives exact answers.
        dense = _host(block.to_dense())
        dense = 0.5 * (dense + dense.T)
        values = np.linalg.eigvalsh(dense)
        return LayerSpectrum(
            name, tuple(params), block.n, float(values[-1]), 0.0, float(np.trace(dense)), 0.0,
            "dense", block.num_matvecs - before,
        )
    eig = top_eigenpair(block, tol=tol, seed=seed)
    if exact_diag is not None:
        value, stderr, method = float(exact_diag.sum()), 0.0, "lanczos+exact"
    else:
        est = trace(block, method=trace_method, num_matvecs=trace_matvecs, seed=seed)
        value, stderr, method = float(est.value), float(est.stderr), f"lanczos+{trace_method}"
    return LayerSpectrum(
        name, tuple(params), block.n, float(eig.values[0]), float(eig.residuals[0]), value,
        stderr, method, block.num_matvecs - before,
    )


def per_layer_spectra(
    op: Operator,
    *,
    groups: Any = "layer",
    block_operator: Callable[[list[str]], Operator] | None = None,
    tol: float = 1e-6,
    trace_method: str = "xtrace",
    trace_matvecs: int = 100,
    exact_trace: bool = True,
    include_total: bool = True,
    seed: Any = 0,
) -> PerLayerSpectra:
    """The top eigenvalue and trace of the Hessian block of every layer, in one table.

    Parameters
    ----------
    op : Operator
        The full operator, with a ``layout`` (every backend operator has one).
    groups : {"layer", "parameter"} or mapping
        ``"layer"`` (default): parameters grouped by module (:func:`group_by_layer`);
        ``"parameter"``: one block per parameter tensor; or ``{label: names or predicate}``.
    block_operator : callable, optional
        ``names -> Operator`` building the block directly (e.g.
        ``lambda names: torch_backend.hessian(model, loss, data, params=names)``). Default:
        :class:`BlockOperator` (zero-padding, one full product per block product).
    tol : float
        Relative residual tolerance of the top eigenvalue (:func:`top_eigenpair`).
    trace_method : str
        Stochastic trace method for large blocks (see :func:`dualhess.trace`).
    trace_matvecs : int
        Products for a stochastic trace. A block of size ``<= trace_matvecs`` is built
        densely instead (as many products), giving exact eigenvalues and trace.
    exact_trace : bool
        Use the operator's exact diagonal (e.g. BackPACK) for the traces when it has one.
    include_total : bool
        Also summarise the whole operator (row ``"(all)"``).
    seed : int, numpy.random.Generator or None
        Randomness for start vectors and trace probes (one generator threads all blocks).

    Returns
    -------
    PerLayerSpectra
        ``.layers`` (in layout order), ``.total``, ``.table()``, ``.rows()``, ``.plot()``.

    Examples
    --------
    >>> import numpy as np
    >>> from dualhess import DenseOperator, ParamLayout
    >>> op = DenseOperator(np.diag([2.0, 5.0, -1.0]))
    >>> op.layout = ParamLayout.from_shapes([("l1.weight", (2,)), ("l2.weight", (1,))])
    >>> print(per_layer_spectra(op, include_total=False).table())  # doctest: +NORMALIZE_WHITESPACE
    layer  size  top eigenvalue  trace  trace stderr  method
    -----  ----  --------------  -----  ------------  ------
    l1     2     5               7      0             dense
    l2     1     -1              -1     0             dense
    """
    op = check_operator(op, "per_layer_spectra")
    layout = getattr(op, "layout", None)
    if layout is None:
        raise ValueError(
            "per_layer_spectra: the operator has no parameter layout (op.layout); build it "
            "with a backend (torch_backend.hessian, jax_backend.hessian) or set op.layout"
        )
    trace_matvecs = check_positive_int(trace_matvecs, "trace_matvecs", "per_layer_spectra")
    rng = default_rng(seed)
    resolved = _resolve_groups(layout, groups)
    diag = None
    if exact_trace:
        try:
            diag = _host(op.exact_diagonal())
        except ExactUnavailableError:
            diag = None
    layers = []
    for label, names in resolved.items():
        block = block_operator(list(names)) if block_operator is not None else BlockOperator(op, names)
        if block.layout is not None and sorted(block.layout.names) != sorted(names):
            raise ValueError(
                f"per_layer_spectra: block_operator({names}) returned an operator over "
                f"{block.layout.names}"
            )
        block_diag = None
        if diag is not None:
            block_diag = np.concatenate([diag[layout[n].slice] for n in names])
        layers.append(
            _summarise(
                block, label, names, tol=tol, trace_method=trace_method,
                trace_matvecs=trace_matvecs, seed=rng, exact_diag=block_diag,
            )
        )
    total = None
    if include_total:
        total = _summarise(
            op, "(all)", layout.names, tol=tol, trace_method=trace_method,
            trace_matvecs=trace_matvecs, seed=rng, exact_diag=diag,
        )
    return PerLayerSpectra(tuple(layers), total)


# ---------------------------------------------------------------------- tracking

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
        """Plot the history (one panel per metric); saves to ``path`` when given."""
        return self.tracker.plot(path, **kwargs)


class SpectrumTracker:
    """Follow ``lambda_max`` and the trace of a changing operator (the monitors' core).

    Call :meth:`measure` with the operator at the current parameters. The top eigenvalue is
    computed by :func:`top_eigenpair`, warm-started from the previous top eigenvector, so a
    slowly changing Hessian costs one short Lanczos cycle per measurement. The trace uses
    :func:`dualhess.trace` with the generator :meth:`trace_rng` derived from ``(seed, step)``
    (``numpy.random.default_rng([seed, step, 1])``), so a from-scratch computation at the
    same step with that generator reproduces it exactly.

    Parameters
    ----------
    every : int
        :meth:`due` is true every ``every`` steps (step 0 included).
    metrics : sequence of {"top_eigenvalue", "trace"}
    tol : float
        Relative residual tolerance of the top eigenvalue.
    num_steps : int
        Lanczos steps per restart cycle.
    trace_method : str
        See :func:`dualhess.trace`.
    trace_matvecs : int
        Products per trace estimate.
    seed : int
        Base seed.
    warm_start : bool
        Start Lanczos from the previous top eigenvector (default True).
    host_lanczos : bool, optional
        Run the Lanczos bookkeeping in numpy on the host (:class:`HostOperator`), products
        on the device. Default: True for JAX operators (eager JAX recompiles small
        operations for every new basis size), False otherwise.

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
        metrics: Iterable[str] = MONITOR_METRICS,
        tol: float = 1e-4,
        num_steps: int = 20,
        max_matvecs: int | None = None,
        trace_method: str = "hutchinson",
        trace_matvecs: int = 50,
        seed: int = 0,
        warm_start: bool = True,
        host_lanczos: bool | None = None,
    ) -> None:
        self.every = check_positive_int(every, "every", "SpectrumTracker")
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
                host = op.framework == "jax"
            eigen_op = HostOperator(op) if host else op
            if warm:
                start = eigen_op.asarray(self._vector)
            eig = top_eigenpair(
                eigen_op, start=start, tol=self.tol, num_steps=self.num_steps,
                max_matvecs=self.max_matvecs, seed=self.start_rng(step),
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
        record["num_matvecs"] = op.num_matvecs - before
        self.history.append(record)
        return record

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

    def plot(self, path: Any = None, *, axes: Any = None) -> Any:
        """Plot the history: one panel per metric (trace with +-2 stderr band).

        Returns the matplotlib figure; saves it to ``path`` when given.
        """
        import matplotlib.pyplot as plt

        if not self.history:
            raise ValueError("nothing to plot: the history is empty (no measurement yet)")
        if axes is None:
            fig, axes = plt.subplots(1, len(self.metrics), figsize=(4.5 * len(self.metrics), 3.2))
        else:
            fig = np.atleast_1d(axes)[0].figure
        axes = np.atleast_1d(axes)
        for ax, metric in zip(axes, self.metrics):
            steps = [r["step"] for r in self.history if metric in r]
            vals = np.array(self.values(metric))
            ax.plot(steps, vals, marker="o", ms=3)
            if metric == "trace":
                err = 2 * np.array([r["trace_stderr"] for r in self.history if metric in r])
                ax.fill_between(steps, vals - err, vals + err, alpha=0.25)
            ax.set_xlabel("step")
            ax.set_title("top eigenvalue" if metric == "top_eigenvalue" else "trace")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
        return fig
