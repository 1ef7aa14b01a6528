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


def plot_history(tracker: Any, path: Any = None, *, axes: Any = None) -> Any:
    """Plot a monitor's history (a :class:`~dualhess._tracking.SpectrumTracker`): one panel
    per metric, the trace with a +-2 stderr band; saves to ``path`` when given."""
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
        ax.plot(steps, vals, marker="o", ms=3)
        if metric == "trace":
            err = 2 * np.array([r["trace_stderr"] for r in tracker.history if metric in r])
            ax.fill_between(steps, vals - err, vals + err, alpha=0.25)
        ax.set_xlabel("step")
        ax.set_title("top eigenvalue" if metric == "top_eigenvalue" else "trace")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig
