"""dualhess.density: stochastic Lanczos quadrature against exact spectral measures."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _matrices import (
    FRAMEWORKS,
    CountingOperator,
    native_operator,
    symmetric_with_spectrum,
)
from scipy.stats import wasserstein_distance

from dualhess import DenseOperator
from dualhess._density import DEFAULT_SIGMA_FRACTION, density, trapezoid


def _hessian_like(n: int, seed: int) -> np.ndarray:
    """A bulk near zero (both signs) plus a few large outliers, like a network's Hessian."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(0.0, 0.05, n - 10), np.linspace(2.0, 20.0, 10)])


def _broadened(grid, nodes, weights, sigma):
    x = grid[:, None]
    kernel = np.exp(-0.5 * ((x - nodes.ravel()) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return kernel @ weights.ravel()


@pytest.mark.parametrize(
    "spectrum",
    ["hessian_like", "decaying"],
)
def test_slq_measure_is_close_to_the_exact_spectral_measure(spectrum):
    n = 1000
    if spectrum == "hessian_like":
        eigenvalues = _hessian_like(n, seed=0)
    else:
        eigenvalues = 1.0 / np.arange(1.0, n + 1.0) ** 2
    op = DenseOperator(symmetric_with_spectrum(eigenvalues, seed=0))
    result = density(op, num_probes=10, num_steps=80, seed=1)
    assert result.num_matvecs == 800 == op.num_matvecs
    distance = wasserstein_distance(
        result.nodes.ravel(), eigenvalues, result.weights.ravel() / 10, None
    )
    assert distance / np.ptp(eigenvalues) <= 1e-3


def test_integrates_to_one_and_equals_the_broadened_quadrature():
    eigenvalues = np.concatenate([np.linspace(-1.0, 1.0, 150), [4.0, 6.0]])
    op = DenseOperator(symmetric_with_spectrum(eigenvalues, seed=1))
    result = density(op, num_probes=5, num_steps=40, seed=2)
    assert trapezoid(result.values, result.grid) == pytest.approx(1.0, abs=1e-12)
    # The normalisation only corrects the Gaussian tails cut off by the grid.
    raw = _broadened(result.grid, result.nodes, result.weights / 5, result.sigma)
    mass = trapezoid(raw, result.grid)
    assert 0.99 <= mass <= 1.0 + 1e-6
    np.testing.assert_allclose(result.values, raw / mass, rtol=1e-12, atol=1e-14)
    # Default sigma and grid.
    used = result.nodes[result.weights > 0]
    spread = used.max() - used.min()
    assert result.sigma == pytest.approx(DEFAULT_SIGMA_FRACTION * spread, rel=1e-12)
    assert result.grid.shape == (1000,)
    assert result.grid[0] == pytest.approx(used.min() - 3 * result.sigma, rel=1e-12)
    assert result.grid[-1] == pytest.approx(used.max() + 3 * result.sigma, rel=1e-12)
    assert np.all(result.values >= 0)


def test_quadrature_reproduces_the_probe_moments():
    """Gauss quadrature with m nodes is exact for v^T A^k v, k < 2m (Ubaru et al. 2017)."""
    eigenvalues = np.linspace(-2.0, 3.0, 200)
    A = symmetric_with_spectrum(eigenvalues, seed=2)
    op = CountingOperator(A)
    result = density(op, num_probes=4, num_steps=12, seed=3)
    V = op.matmat_calls[0]  # the normalised start block: Rademacher / sqrt(n)
    np.testing.assert_allclose(np.abs(V) * np.sqrt(200), 1.0, atol=1e-12)
    np.testing.assert_allclose(result.weights.sum(axis=1), 1.0, atol=1e-14)
    for probe in range(4):
        v = V[:, probe]
        power = v.copy()
        for k in range(10):
            moment = float(v @ power)
            quadrature = float(np.sum(result.weights[probe] * result.nodes[probe] ** k))
            assert quadrature == pytest.approx(moment, rel=1e-9, abs=1e-9 * 3.0**k)
            power = A @ power
    # Ritz values lie inside the spectrum and are sorted.
    assert result.nodes.min() >= eigenvalues.min() - 1e-10
    assert result.nodes.max() <= eigenvalues.max() + 1e-10
    assert np.all(np.diff(result.nodes, axis=1) >= 0)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_probes_are_advanced_together(chunk_size):
    A = symmetric_with_spectrum(np.linspace(0.0, 1.0, 100), seed=3)
    op = CountingOperator(A, chunk_size=chunk_size)
    num_probes, num_steps = 10, 15
    result = density(op, num_probes=num_probes, num_steps=num_steps, seed=0)
    calls_per_step = 1 if chunk_size is None else math.ceil(num_probes / chunk_size)
    assert len(op.matmat_calls) == num_steps * calls_per_step
    assert op.matvec_calls == 0
    assert result.num_matvecs == num_steps * num_probes == op.num_matvecs
    assert result.nodes.shape == result.weights.shape == (num_probes, num_steps)


def test_tiny_operator_breaks_down_cleanly_with_exact_nodes():
    eigenvalues = np.array([-2.0, -0.5, 1.0, 3.0, 7.0])
    A = symmetric_with_spectrum(eigenvalues, seed=4)
    op = CountingOperator(A)
    result = density(op, num_probes=3, num_steps=100, seed=5)
    assert np.all(np.isfinite(result.nodes)) and np.all(np.isfinite(result.weights))
    assert np.all(np.isfinite(result.values))
    assert result.nodes.shape == (3, 100)
    assert result.num_matvecs == 5 * 3  # stopped at the invariant subspace
    V = op.matmat_calls[0]
    _, U = np.linalg.eigh(A)
    for probe in range(3):
        used = result.weights[probe] > 0
        assert used.sum() == 5
        np.testing.assert_allclose(result.nodes[probe, used], eigenvalues, atol=1e-10)
        # weights = squared components of the unit probe in the eigenbasis
        np.testing.assert_allclose(
            result.weights[probe, used], (U.T @ V[:, probe]) ** 2, atol=1e-10
        )
        assert np.all(result.weights[probe, 5:] == 0)


def test_zero_operator():
    result = density(np.zeros((4, 4)), num_probes=2, num_steps=10, seed=0)
    assert np.all(result.nodes == 0) and result.sigma == pytest.approx(DEFAULT_SIGMA_FRACTION)
    assert trapezoid(result.values, result.grid) == pytest.approx(1.0, abs=1e-12)
    spacing = result.grid[1] - result.grid[0]
    assert abs(result.grid[np.argmax(result.values)]) <= spacing


def test_custom_sigma_and_grid():
    A = symmetric_with_spectrum(np.linspace(-1.0, 1.0, 60), seed=6)
    grid = np.linspace(-2.0, 2.0, 801)
    result = density(A, num_probes=3, num_steps=20, sigma=0.1, grid=grid, seed=0)
    assert result.sigma == 0.1
    np.testing.assert_array_equal(result.grid, grid)
    raw = _broadened(grid, result.nodes, result.weights / 3, 0.1)
    np.testing.assert_allclose(result.values, raw / trapezoid(raw, grid), rtol=1e-12)
    coarse = density(A, num_probes=3, num_steps=20, num_grid=50, seed=0)
    assert coarse.grid.shape == (50,)
    assert trapezoid(coarse.values, coarse.grid) == pytest.approx(1.0, abs=1e-12)


def test_same_seed_same_density_across_frameworks():
    # Few steps: eager jax compiles every new array shape once, and the Lanczos basis grows.
    A = symmetric_with_spectrum(np.concatenate([np.linspace(-1.0, 1.0, 29), [5.0]]), seed=7)
    reference = density(A, num_probes=3, num_steps=8, seed=11)
    for framework in FRAMEWORKS[1:]:
        try:
            op = native_operator(A, framework)
        except pytest.skip.Exception:
            continue
        result = density(op, num_probes=3, num_steps=8, seed=11)
        np.testing.assert_allclose(result.nodes, reference.nodes, atol=1e-12, err_msg=framework)
        np.testing.assert_allclose(result.weights, reference.weights, atol=1e-12, err_msg=framework)
        np.testing.assert_allclose(result.values, reference.values, rtol=1e-10, atol=1e-12)
    other = density(A, num_probes=3, num_steps=8, seed=12)
    assert not np.allclose(other.weights, reference.weights)


def test_result_plot_and_dict():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = density(np.diag([1.0, 2.0, 3.0]), num_probes=2, num_steps=3, seed=0, progress=True)
    ax = result.plot(log=False)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), result.values)
    plt.close(ax.figure)
    as_dict = result.to_dict()
    assert as_dict["num_matvecs"] == result.num_matvecs and len(as_dict["grid"]) == 1000


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_steps": 0}, ValueError, "num_steps must be positive"),
        ({"num_probes": 0}, ValueError, "num_probes must be positive"),
        ({"num_probes": 2.0}, TypeError, "num_probes must be an int"),
        ({"sigma": -0.1}, ValueError, "sigma must be a positive"),
        ({"sigma": float("nan")}, ValueError, "sigma must be a positive"),
        ({"grid": np.zeros((3, 3))}, ValueError, "grid must be a 1-D array"),
        ({"grid": [0.0, 2.0, 1.0]}, ValueError, "strictly increasing"),
        ({"grid": [0.0, np.nan]}, ValueError, "NaN or Inf"),
        ({"grid": np.linspace(100.0, 101.0, 10)}, ValueError, "no mass on the grid"),
        ({"num_grid": 1}, ValueError, "num_grid must be >= 2"),
        ({"seed": "x"}, TypeError, "seed must be"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        density(np.diag([1.0, 2.0, 3.0]), **kwargs)
