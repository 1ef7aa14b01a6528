"""Per-layer spectra through parameter blocks.

The Hessian block of a group of parameters ``S`` (one layer: its weight and bias) is the
principal submatrix ``H[S, S]``. :class:`~dualhess._wrappers.BlockOperator` applies it
matrix-free to any
operator with a :class:`~dualhess.ParamLayout`: pad the block vector with zeros, multiply by
the full operator, keep the rows of ``S``. A backend may build the block directly instead
(``block_operator=``, e.g. ``torch_backend.hessian(..., params=names)``, which differentiates
only the selected parameters and is cheaper).

:func:`per_layer_spectra` reports the top eigenvalue and the trace of every block in one
table (:class:`PerLayerSpectra`, with ``.table()`` and ``.plot()``). PyHessian users asked
for this (PyHessian issue #10). With ``density=True`` it adds the eigenvalue density of every
block (stochastic Lanczos quadrature, the probes of a block side by side) and the
Jensen-Shannon distance between the blocks' densities, the measure of how heterogeneous the
block spectra are (Zhang et al. 2024); ``.plot_densities()`` stacks them in one figure.

References
----------
Z. Yao, A. Gholami, K. Keutzer, M. Mahoney, "PyHessian: Neural networks through the lens of
the Hessian", IEEE BigData (2020) (per-block Hessian spectra).
Y. Zhang, C. Chen, T. Ding, Z. Li, R. Sun, Z.-Q. Luo, "Why transformers need Adam: a Hessian
perspective", NeurIPS 2024, https://arxiv.org/abs/2402.16788 (blockwise spectra, their
Jensen-Shannon distances).

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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ._array import default_rng, to_numpy
from ._density import density as slq_density
from ._density import gaussian_broadening, trapezoid
from ._eigsh import eigsh
from ._operator import ExactUnavailableError, Operator, ParamLayout
from ._results import Result, SpectralDensity
from ._trace import trace
from ._util import check_operator, check_positive_int
from ._wrappers import BlockOperator

__all__ = [
    "LayerSpectrum",
    "PerLayerSpectra",
    "group_by_layer",
    "per_layer_spectra",
    "jensen_shannon_distance",
]

#: Points of the common grid on which block densities are compared.
COMMON_GRID_POINTS = 2000


def _host(x: Any) -> np.ndarray:
    return np.asarray(to_numpy(x), dtype=np.float64)


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
    density : SpectralDensity or None
        The block's eigenvalue density (``per_layer_spectra(density=True)``); not in
        :meth:`to_dict` (see :meth:`PerLayerSpectra.to_dict`).
    """

    _skip_in_dict = ("density",)

    name: str
    params: tuple[str, ...]
    size: int
    top_eigenvalue: float
    top_residual: float
    trace: float
    trace_stderr: float
    method: str
    num_matvecs: int
    density: SpectralDensity | None = None


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
        text = "\n".join([fmt_row(*head), fmt_row(*("-" * w for w in widths))] + [
            fmt_row(*row) for row in body
        ])
        if self.has_densities:
            text += "\n\n" + self._distance_table()
        return text

    # ------------------------------------------------------------------ densities
    @property
    def has_densities(self) -> bool:
        """Whether every block carries a density (``per_layer_spectra(density=True)``)."""
        return bool(self.layers) and all(layer.density is not None for layer in self.layers)

    def densities(self) -> dict[str, SpectralDensity]:
        """``{layer name: its SpectralDensity}``."""
        self._need_densities()
        return {layer.name: layer.density for layer in self.layers}

    def common_densities(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Every block's density on one grid, at one broadening, each integrating to 1.

        The grid spans all blocks' Ritz values (+- 3 sigma); sigma is the largest of the
        blocks' own widths (the coarsest resolution any block's quadrature supports).
        """
        self._need_densities()
        dens = [layer.density for layer in self.layers]
        sigma = max(d.sigma for d in dens)
        nodes = np.concatenate([np.asarray(d.nodes)[np.asarray(d.weights) > 0] for d in dens])
        grid = np.linspace(nodes.min() - 3 * sigma, nodes.max() + 3 * sigma, COMMON_GRID_POINTS)
        out = {}
        for layer, d in zip(self.layers, dens):
            weights = np.asarray(d.weights) / np.asarray(d.weights).shape[0]
            values = gaussian_broadening(grid, d.nodes, weights, sigma)
            out[layer.name] = values / trapezoid(values, grid)
        return grid, out

    def distances(self) -> tuple[list[str], np.ndarray]:
        """The Jensen-Shannon distance between every two blocks' densities (common grid).

        Returns ``(names, D)`` with ``D[i, j]`` in ``[0, 1]`` (base-2 logarithms), 0 on the
        diagonal; see :func:`jensen_shannon_distance`.
        """
        grid, values = self.common_densities()
        names = list(values)
        D = np.zeros((len(names), len(names)))
        for i, a in enumerate(names):
            for j in range(i + 1, len(names)):
                D[i, j] = D[j, i] = jensen_shannon_distance(values[a], values[names[j]], grid)
        return names, D

    def _distance_table(self) -> str:
        names, D = self.distances()
        width = max(len(n) for n in names)
        cols = [max(len(n), 6) for n in names]
        lines = ["Jensen-Shannon distance between the block densities (0 same, 1 disjoint):",
                 " " * width + "  " + "  ".join(n.rjust(c) for n, c in zip(names, cols))]
        for name, row in zip(names, D):
            lines.append(name.ljust(width) + "  " + "  ".join(
                f"{v:.3f}".rjust(c) for v, c in zip(row, cols)))
        return "\n".join(lines)

    def _need_densities(self) -> None:
        if not self.has_densities:
            raise ValueError("no block densities: compute them with "
                             "per_layer_spectra(op, density=True)")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.has_densities:
            out["densities"] = {layer.name: layer.density.to_dict() for layer in self.layers}
            names, D = self.distances()
            out["distances"] = {"names": names, "jensen_shannon": D.tolist()}
        return out

    def plot_densities(self, path: Any = None, *, log: bool = True) -> Any:
        """One figure of stacked densities, one row per block, on a common eigenvalue axis.

        Returns the matplotlib figure; saves it to ``path`` when given.
        """
        from ._plotting import plot_per_layer_densities

        self._need_densities()
        return plot_per_layer_densities(self, path, log=log)

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
        from ._plotting import plot_per_layer

        return plot_per_layer(self, path, axes=axes)


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
    density_probes: int | None = None,
    density_steps: int = 60,
) -> LayerSpectrum:
    before = block.num_matvecs
    dens = None
    if density_probes is not None:
        # All probes of the block side by side (one matmat per Lanczos step).
        dens = slq_density(block, num_probes=density_probes, num_steps=min(density_steps, block.n),
                       seed=seed)
    spent = block.num_matvecs - before
    before = block.num_matvecs
    if block.n <= trace_matvecs:
        # Building the block costs n <= trace_matvecs products and gives exact answers.
        dense = _host(block.to_dense())
        dense = 0.5 * (dense + dense.T)
        values = np.linalg.eigvalsh(dense)
        return LayerSpectrum(
            name, tuple(params), block.n, float(values[-1]), 0.0, float(np.trace(dense)), 0.0,
            "dense", block.num_matvecs - before + spent, dens,
        )
    eig = eigsh(block, k=1, which="LA", tol=tol, seed=seed)
    if exact_diag is not None:
        value, stderr, method = float(exact_diag.sum()), 0.0, "lanczos+exact"
    else:
        est = trace(block, method=trace_method, num_matvecs=trace_matvecs, seed=seed)
        value, stderr, method = float(est.value), float(est.stderr), f"lanczos+{trace_method}"
    return LayerSpectrum(
        name, tuple(params), block.n, float(eig.values[0]), float(eig.residuals[0]), value,
        stderr, method, block.num_matvecs - before + spent, dens,
    )


def jensen_shannon_distance(p: Any, q: Any, grid: Any) -> float:
    """``sqrt(JSD(p, q))`` of two densities on the same grid, base-2 logarithms: in [0, 1].

    ``JSD = (KL(p || m) + KL(q || m)) / 2`` with ``m = (p + q) / 2``, each density turned
    into probabilities of the grid cells (trapezoid weights). 0 for equal densities, 1 for
    densities with disjoint support. Its square root is a metric (Endres & Schindelin 2003).

    Examples
    --------
    >>> import numpy as np
    >>> x = np.linspace(-1.0, 1.0, 201)
    >>> p = np.where(x < 0, 1.0, 0.0); q = np.where(x > 0, 1.0, 0.0)
    >>> round(jensen_shannon_distance(p, p, x), 12), round(jensen_shannon_distance(p, q, x), 3)
    (0.0, 1.0)
    """
    grid = np.asarray(grid, dtype=np.float64)
    cell = np.empty_like(grid)
    gaps = np.diff(grid)
    cell[0], cell[-1] = gaps[0] / 2, gaps[-1] / 2
    cell[1:-1] = (gaps[1:] + gaps[:-1]) / 2
    a = np.maximum(np.asarray(p, dtype=np.float64), 0.0) * cell
    b = np.maximum(np.asarray(q, dtype=np.float64), 0.0) * cell
    a, b = a / a.sum(), b / b.sum()
    m = 0.5 * (a + b)

    def kl(x: np.ndarray) -> float:
        keep = x > 0
        return float(np.sum(x[keep] * np.log2(x[keep] / m[keep])))

    return float(np.sqrt(max(0.5 * kl(a) + 0.5 * kl(b), 0.0)))


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
    density: bool = False,
    density_probes: int = 10,
    density_steps: int = 60,
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
        Relative residual tolerance of the top eigenvalue (:func:`dualhess.eigsh`).
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
    density : bool
        Also the eigenvalue density of every block (stochastic Lanczos quadrature,
        :func:`dualhess.density`): ``layer.density``, ``.plot_densities()``, and the
        Jensen-Shannon distances between the blocks in ``.table()`` and ``.distances()``.
    density_probes, density_steps : int
        Probes (run side by side) and Lanczos steps per probe of each block's density
        (steps capped at the block size, where the quadrature is exact per probe).

    Returns
    -------
    PerLayerSpectra
        ``.layers`` (in layout order), ``.total``, ``.table()``, ``.rows()``, ``.plot()``,
        ``.plot_densities()``.

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
    probes = None
    if density:
        probes = check_positive_int(density_probes, "density_probes", "per_layer_spectra")
        if check_positive_int(density_steps, "density_steps", "per_layer_spectra") < 2:
            raise ValueError("per_layer_spectra: density_steps must be at least 2")
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
                density_probes=probes, density_steps=density_steps,
            )
        )
    total = None
    if include_total:
        total = _summarise(
            op, "(all)", layout.names, tol=tol, trace_method=trace_method,
            trace_matvecs=trace_matvecs, seed=rng, exact_diag=diag,
        )
    return PerLayerSpectra(tuple(layers), total)
