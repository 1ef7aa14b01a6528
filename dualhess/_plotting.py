"""Every figure dualhess draws, in one place (matplotlib, imported on first use).

The result classes' ``.plot()`` methods and the report writer call these functions. The
report's figures are drawn on the non-interactive ``Agg`` backend, so they work without a
display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "pyplot",
    "plot_density",
    "plot_per_layer",
    "plot_history",
    "plot_report_density",
    "plot_report_eigenvalues",
    "plot_report_landscape",
    "plot_landscape",
    "plot_per_layer_densities",
]


def pyplot(headless: bool = False) -> Any:
    """matplotlib's pyplot, imported on first use.

    ``headless=True`` (the report writer, the CLI) selects the non-interactive ``Agg``
    backend first; the result classes' ``.plot()`` methods keep the user's backend (a
    notebook's inline display, say).
    """
    import matplotlib

    if headless:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_report_density(series: Sequence[tuple[str, dict[str, Any]]], path: Path, title: str) -> None:
    """The report's ``density.png``: each framework's density (log scale), one line style each."""
    plt = pyplot(headless=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = ["-", "--", ":", "-."]
    floor = np.inf
    top = 0.0
    for i, (label, dens) in enumerate(series):
        grid = np.asarray(dens["grid"], dtype=np.float64)
        values = np.asarray(dens["values"], dtype=np.float64)
        positive = values[values > 0]
        if positive.size:
            top = max(top, float(positive.max()))
        ax.plot(grid, np.maximum(values, 1e-300), styles[i % len(styles)], lw=1.6, label=label)
    if top > 0:
        floor = top * 1e-8
        ax.set_ylim(floor, top * 2)
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_report_eigenvalues(series: Sequence[tuple[str, dict[str, Any]]], path: Path, title: str) -> None:
    """The report's ``eigenvalues.png``: the top eigenvalues with their residuals as error bars."""
    plt = pyplot(headless=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    markers = ["o", "x", "s", "+"]
    count = len(series)
    for i, (label, eig) in enumerate(series):
        values = np.asarray(eig["values"], dtype=np.float64)
        offset = (i - (count - 1) / 2) * 0.12
        ax.errorbar(np.arange(1, len(values) + 1) + offset, values,
                    yerr=np.asarray(eig["residuals"], dtype=np.float64), fmt=markers[i % 4],
                    ms=7, capsize=3, label=label, mfc="none" if i % 2 == 0 else None)
    ax.set_xlabel("index (largest first)")
    ax.set_ylabel("eigenvalue")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_density(
    density: Any, ax: Any = None, *, log: bool = True, label: str | None = None, **kwargs: Any
) -> Any:
    """Draw a :class:`~dualhess.SpectralDensity` (log scale by default); returns the axes."""
    plt = pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    values = np.maximum(density.values, 1e-300) if log else density.values
    ax.plot(density.grid, values, label=label, **kwargs)
    if log:
        ax.set_yscale("log")
        top = float(np.max(density.values)) if len(density.values) else 1.0
        ax.set_ylim(max(top * 1e-8, 1e-300), top * 2)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    if label is not None:
        ax.legend()
    return ax


def plot_per_layer(spectra: Any, path: Any = None, *, axes: Any = None) -> Any:
    """Bar charts of the top eigenvalue and the trace per layer of a
    :class:`~dualhess.PerLayerSpectra` (symlog scale); saves to ``path`` when given."""
    plt = pyplot()

    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.2 * len(spectra.layers) + 3), 3.5))
    else:
        fig = axes[0].figure
    names = [layer.name for layer in spectra.layers]
    x = np.arange(len(names))
    top = [layer.top_eigenvalue for layer in spectra.layers]
    tr = [layer.trace for layer in spectra.layers]
    err = [layer.trace_stderr for layer in spectra.layers]
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


_METRIC_LABELS = {
    "top_eigenvalue": ("top eigenvalue (sharpness)", r"$\lambda_{\max}$"),
    "trace": ("trace", "trace"),
    "gradient_overlap": ("gradient overlap with the top eigenspace",
                         r"$\|P_k g\|^2 / \|g\|^2$"),
}


def plot_history(tracker: Any, path: Any = None, *, axes: Any = None,
                 reference: float | None = None, reference_label: str | None = None) -> Any:
    """Plot a monitor's history (a :class:`~dualhess._tracking.SpectrumTracker`): one panel
    per metric, the trace with a +-2 stderr band; saves to ``path`` when given.

    ``reference`` draws a horizontal line on the top-eigenvalue panel, e.g. ``2 / lr``: the
    sharpness above which gradient descent with step ``lr`` is unstable on a quadratic, the
    edge of stability (Cohen et al. 2021, https://arxiv.org/abs/2103.00065). Its legend
    label is ``reference_label`` (default ``2/eta = <value>``).
    """
    plt = pyplot()

    if not tracker.history:
        raise ValueError("nothing to plot: the history is empty (no measurement yet)")
    if axes is None:
        fig, axes = plt.subplots(1, len(tracker.metrics), figsize=(4.5 * len(tracker.metrics), 3.2))
    else:
        fig = np.atleast_1d(axes)[0].figure
    axes = np.atleast_1d(axes)
    for ax, metric in zip(axes, tracker.metrics):
        steps = [r["step"] for r in tracker.history if metric in r]
        vals = np.array(tracker.values(metric))
        title, ylabel = _METRIC_LABELS.get(metric, (metric, metric))
        ax.plot(steps, vals, marker="o", ms=3, label="measured")
        if metric == "trace":
            err = 2 * np.array([r["trace_stderr"] for r in tracker.history if metric in r])
            ax.fill_between(steps, vals - err, vals + err, alpha=0.25, label="+-2 stderr")
        if metric == "top_eigenvalue" and reference is not None:
            text = reference_label or rf"$2/\eta$ = {float(reference):.4g}"
            ax.axhline(float(reference), color="C3", ls="--", lw=1.4, label=text)
        if metric == "gradient_overlap":
            ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig


def plot_landscape(landscape: Any, path: Any = None, *, ax: Any = None,
                   label: str | None = None, levels: int = 20) -> Any:
    """Draw a :class:`~dualhess.LossLandscape`: a line (1-D) or filled contours (2-D)."""
    plt = pyplot()
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.0, 3.6 if landscape.ndim == 1 else 4.2))
    else:
        fig = ax.figure
    names = []
    for i in range(landscape.ndim):
        if landscape.kind == "eigen" and landscape.eigenvalues is not None:
            names.append(rf"offset along $v_{i + 1}$ ($\lambda_{i + 1}$ = "
                         f"{landscape.eigenvalues[i]:.4g})")
        else:
            names.append(f"offset along direction {i + 1}")
    if landscape.ndim == 1:
        ax.plot(landscape.offsets[0], landscape.values, marker="o", ms=2.5, label=label)
        ax.set_xlabel(names[0])
        ax.set_ylabel("loss")
        if label is not None:
            ax.legend()
    else:
        A, B = np.meshgrid(landscape.offsets[0], landscape.offsets[1], indexing="ij")
        filled = ax.contourf(A, B, landscape.values, levels=levels, cmap="viridis")
        ax.contour(A, B, landscape.values, levels=levels, colors="k", linewidths=0.3)
        fig.colorbar(filled, ax=ax, label="loss")
        ax.plot([0.0], [0.0], marker="x", color="w", ms=8, ls="none", label=r"$\theta$")
        ax.legend(loc="upper right", fontsize="small")
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
    kinds = {"eigen": "the top Hessian eigenvectors", "random": "filter-normalised random "
             "directions", "given": "the given directions"}
    ax.set_title(f"loss along {kinds.get(landscape.kind, landscape.kind)}")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_report_landscape(series: Sequence[tuple[str, dict[str, Any]]], path: Path,
                          title: str) -> None:
    """The report's ``landscape.png``: each framework's 1-D slice along its top eigenvector."""
    plt = pyplot(headless=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = [("-", "o"), ("--", "x"), (":", "s"), ("-.", "+")]
    eigenvalue = None
    for i, (label, land) in enumerate(series):
        line, marker = styles[i % len(styles)]
        ax.plot(np.asarray(land["offsets"][0]), np.asarray(land["values"]), line,
                marker=marker, ms=4, mfc="none", lw=1.5, label=label)
        if land.get("eigenvalues"):
            eigenvalue = land["eigenvalues"][0]
    ax.set_xlabel(r"offset $t$ along the top eigenvector $v_1$"
                  + (rf" ($\lambda_1$ = {eigenvalue:.4g})" if eigenvalue is not None else ""))
    ax.set_ylabel(r"loss $L(\theta + t v_1)$")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_per_layer_densities(spectra: Any, path: Any = None, *, log: bool = True) -> Any:
    """One figure of stacked SLQ densities, one row per block of a
    :class:`~dualhess.PerLayerSpectra` computed with ``density=True``: every block on the
    common grid and at the common broadening its Jensen-Shannon distances use
    (:meth:`~dualhess.PerLayerSpectra.common_densities`), so the rows compare directly."""
    plt = pyplot()
    grid, values = spectra.common_densities()
    layers = list(spectra.layers)
    fig, axes = plt.subplots(len(layers), 1, sharex=True, squeeze=False,
                             figsize=(6.4, 1.1 + 1.25 * len(layers)))
    top = max(float(np.max(v)) for v in values.values())
    for i, (ax, layer) in enumerate(zip(axes[:, 0], layers)):
        dens = values[layer.name]
        shown = np.maximum(dens, 1e-300) if log else dens
        ax.plot(grid, shown, color=f"C{i % 10}", lw=1.3)
        ax.fill_between(grid, shown, 1e-300 if log else 0.0, color=f"C{i % 10}", alpha=0.2)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(top * 1e-6, top * 3)
        ax.set_ylabel("density", fontsize="small")
        ax.text(0.99, 0.85, f"{layer.name} ({layer.size} parameters)", transform=ax.transAxes,
                ha="right", va="top", fontsize="small")
    axes[-1, 0].set_xlabel("eigenvalue")
    axes[0, 0].set_title("Hessian eigenvalue density of each layer's block (SLQ)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
