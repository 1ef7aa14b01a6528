"""Spectral density by stochastic Lanczos quadrature (SLQ) with Gaussian broadening.

For a probe ``v`` with ``E[v v^T] = I`` and the Lanczos tridiagonal ``T_m`` started from
``v / ||v||``, ``v^T f(A) v / ||v||^2 ~ sum_j tau_j f(theta_j)`` where ``theta_j`` are the
Ritz values (eigenvalues of ``T_m``) and ``tau_j`` the squared first components of its
eigenvectors: Gauss quadrature, exact for polynomials of degree ``< 2m``. Averaging over
probes gives a discrete measure approximating the spectral measure
``(1/n) sum_i delta(lambda_i)``; convolving it with a Gaussian of width ``sigma`` gives a
smooth density.

References
----------
S. Ubaru, J. Chen, Y. Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos
quadrature", SIAM J. Matrix Anal. Appl. 38(4) (2017).
B. Ghorbani, S. Krishnan, Y. Xiao, "An investigation into neural net optimization via
Hessian eigenvalue density", ICML (2019).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._array import default_rng
from ._basis import check_basis
from ._docs import fill_doc
from ._lanczos import lanczos
from ._results import SpectralDensity
from ._trace import _draw_probes
from ._util import check_operator, check_positive_int

__all__ = ["density", "gaussian_broadening", "trapezoid"]

#: Default broadening width as a fraction of the spread of the quadrature nodes.
DEFAULT_SIGMA_FRACTION = 0.01

_MAX_BLOCK = 4_000_000  # grid points x nodes evaluated at once when broadening


def gaussian_broadening(
    grid: np.ndarray, nodes: np.ndarray, weights: np.ndarray, sigma: float
) -> np.ndarray:
    """``sum_j weights_j N(grid; nodes_j, sigma^2)`` (not normalised), in float64."""
    grid = np.asarray(grid, dtype=np.float64)
    nodes = np.asarray(nodes, dtype=np.float64).reshape(-1)
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    keep = weights > 0
    nodes, weights = nodes[keep], weights[keep]
    out = np.zeros_like(grid)
    step = max(1, _MAX_BLOCK // max(nodes.size, 1))
    norm = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
    for start in range(0, grid.size, step):
        x = grid[start : start + step, None]
        out[start : start + step] = norm * np.exp(-0.5 * ((x - nodes) / sigma) ** 2) @ weights
    return out


def trapezoid(values: np.ndarray, grid: np.ndarray) -> float:
    """The trapezoid rule ``sum (x_{i+1} - x_i) (y_i + y_{i+1}) / 2`` (numpy-version proof)."""
    values, grid = np.asarray(values, dtype=np.float64), np.asarray(grid, dtype=np.float64)
    return float(np.sum(np.diff(grid) * (values[1:] + values[:-1])) / 2.0)


def _check_grid(grid: Any) -> np.ndarray:
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim != 1 or grid.size < 2:
        raise ValueError(
            f"density: grid must be a 1-D array of >= 2 points, got shape {grid.shape}"
        )
    if not np.all(np.isfinite(grid)):
        raise ValueError("density: grid contains NaN or Inf")
    if not np.all(np.diff(grid) > 0):
        raise ValueError("density: grid must be strictly increasing")
    return grid


@fill_doc
def density(
    op: Any,
    *,
    num_probes: int = 10,
    num_steps: int = 100,
    sigma: float | None = None,
    grid: Any = None,
    num_grid: int = 1000,
    seed: Any = None,
    reorthogonalize: bool = True,
    progress: bool = False,
    checkpoint: Any = None,
    checkpoint_every: int | None = None,
    basis: str = "device",
    basis_dir: Any = None,
) -> SpectralDensity:
    """Estimate the eigenvalue density of a symmetric operator (stochastic Lanczos quadrature).

    All probes advance together: each Lanczos step is one ``op.matmat`` on an
    ``(n, num_probes)`` block (:func:`dualhess.lanczos.lanczos`, with full
    reorthogonalisation).

    Parameters
    ----------
    op : Operator or square 2-D array
        The symmetric operator.
    num_probes : int
        Number of Rademacher probe vectors (drawn in numpy float64 from ``seed``).
    num_steps : int
        Lanczos steps per probe; the quadrature is exact for polynomials of degree
        ``< 2 num_steps``. A probe that finds an invariant subspace earlier (always when
        ``num_steps >= n``) stops there; its quadrature is then exact.
    sigma : float, optional
        Width of the Gaussian broadening. Default: ``DEFAULT_SIGMA_FRACTION`` (1%) of the
        spread ``max(nodes) - min(nodes)`` of the quadrature nodes (of ``max|node|``, or
        1, when all nodes coincide).
    grid : array, optional
        Strictly increasing points where the density is evaluated. Default:
        ``num_grid`` points spanning ``[min(nodes) - 3 sigma, max(nodes) + 3 sigma]``.
    num_grid : int
        Number of default grid points.
    seed : int, numpy.random.Generator or None
        Randomness for the probes; None is truly random.
    reorthogonalize : bool
        Full reorthogonalisation in the Lanczos runs (default). For very large ``n`` with
        many probes its memory traffic (``num_probes x n x num_steps`` numbers per step) can
        cost more than the products; the quadrature stays usable without it (ghost Ritz
        values split their weight), at some loss of accuracy.
    progress : bool
        Show a progress bar over the Lanczos steps.
    %(checkpoint)s
    %(basis)s

    Returns
    -------
    SpectralDensity
        ``grid`` and ``values`` (the broadened density, normalised so that its trapezoid
        integral over ``grid`` is 1), ``nodes`` and ``weights`` of shape
        ``(num_probes, num_steps)``: the Ritz values of each probe in increasing order
        and their squared first components, which sum to 1 per probe. After a breakdown
        the unused entries have weight 0 (their node repeats the probe's largest Ritz
        value). ``num_matvecs`` and ``sigma``.

    Examples
    --------
    >>> import numpy as np, dualhess
    >>> from dualhess._density import density, trapezoid
    >>> op = dualhess.DenseOperator(np.diag(np.linspace(-1.0, 1.0, 200)))
    >>> d = density(op, num_probes=4, num_steps=30, seed=0)
    >>> d.nodes.shape, round(trapezoid(d.values, d.grid), 12)
    ((4, 30), 1.0)
    """
    if checkpoint is not None:
        from ._checkpoint import checkpointed

        op = check_operator(op, "density")
        settings = {"num_probes": num_probes, "num_steps": num_steps, "sigma": sigma, "num_grid": num_grid, "seed": seed, "reorthogonalize": reorthogonalize, "grid": None if grid is None else "given"}
        with checkpointed(op, checkpoint, checkpoint_every, "density", settings) as work:
            return density(work, num_probes=num_probes, num_steps=num_steps, sigma=sigma, grid=grid, num_grid=num_grid, seed=seed, reorthogonalize=reorthogonalize, progress=progress, basis=basis, basis_dir=basis_dir)
    where = "density"
    op = check_operator(op, where)
    p = check_positive_int(num_probes, "num_probes", where)
    m = check_positive_int(num_steps, "num_steps", where)
    num_grid = check_positive_int(num_grid, "num_grid", where)
    if grid is None and num_grid < 2:
        raise ValueError(f"{where}: num_grid must be >= 2, got {num_grid}")
    if sigma is not None:
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.floating)):
            raise TypeError(f"{where}: sigma must be a positive number, got {type(sigma).__name__}")
        if not (math.isfinite(float(sigma)) and sigma > 0):
            raise ValueError(f"{where}: sigma must be a positive finite number, got {sigma}")
    if grid is not None:
        grid = _check_grid(grid)

    check_basis(basis, basis_dir, where)
    rng = default_rng(seed)
    start = op.asarray(_draw_probes(rng, op.n, p, "rademacher"))
    # lanczos draws the progress bar
    label = f"density ({p} probes x Lanczos)" if progress is True else progress
    tri = lanczos(op, m, start=start, reorthogonalize=reorthogonalize, progress=label,
                  basis=basis, basis_dir=basis_dir)

    nodes = np.zeros((p, m))
    weights = np.zeros((p, m))
    steps = np.asarray(tri.num_steps).reshape(-1)
    for probe in range(p):
        theta, vectors = np.linalg.eigh(tri.matrix(probe))
        used = int(steps[probe])
        nodes[probe, :used] = theta
        nodes[probe, used:] = theta[-1]
        tau = vectors[0, :] ** 2
        weights[probe, :used] = tau / tau.sum()  # sum 1 up to rounding; make it exact
    if not (np.all(np.isfinite(nodes)) and np.all(np.isfinite(weights))):
        raise FloatingPointError(f"{where}: the Lanczos quadrature is not finite")

    used_nodes = nodes[weights > 0]
    low, high = float(used_nodes.min()), float(used_nodes.max())
    if sigma is None:
        spread = high - low
        if spread <= 0:
            spread = max(abs(low), abs(high)) or 1.0
        sigma = DEFAULT_SIGMA_FRACTION * spread
    sigma = float(sigma)
    if grid is None:
        grid = np.linspace(low - 3 * sigma, high + 3 * sigma, num_grid)
    values = gaussian_broadening(grid, nodes, weights / p, sigma)
    mass = trapezoid(values, grid)
    if not mass > 0:
        raise ValueError(
            f"{where}: the density has no mass on the grid [{grid[0]:.6g}, {grid[-1]:.6g}] "
            f"(nodes lie in [{low:.6g}, {high:.6g}], sigma={sigma:.3g}); widen the grid"
        )
    return SpectralDensity(
        grid=grid,
        values=values / mass,
        nodes=nodes,
        weights=weights,
        num_matvecs=int(tri.num_matvecs),
        sigma=sigma,
        precision=tri.precision,
    )
