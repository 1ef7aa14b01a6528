"""Small frozen result types returned by the algorithms, each with ``to_dict()``."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ._array import to_numpy

__all__ = [
    "Result",
    "Tridiagonal",
    "Eigen",
    "TraceEstimate",
    "DiagonalEstimate",
    "SpectralDensity",
]


def _jsonable(x: Any) -> Any:
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return x.to_dict() if hasattr(x, "to_dict") else dataclasses.asdict(x)
    if hasattr(x, "shape"):
        return to_numpy(x).tolist()
    return str(x)


class Result:
    """Mixin: ``to_dict()`` turns every field into plain JSON-able Python values."""

    _skip_in_dict: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name in self._skip_in_dict:
                continue
            out[f.name] = _jsonable(getattr(self, f.name))
        return out


@dataclasses.dataclass(frozen=True)
class Tridiagonal(Result):
    """The Lanczos tridiagonal matrix ``T = tridiag(beta, alpha, beta)``.

    Attributes
    ----------
    alpha : ndarray, shape (m,) or (num_probes, m)
        The diagonal.
    beta : ndarray, shape (m - 1,) or (num_probes, m - 1)
        ``beta[j]`` couples steps ``j`` and ``j + 1``.
    basis : native array, shape (n, m) or (num_probes, n, m), optional
        The Lanczos vectors, only when requested.
    num_matvecs : int
        Operator products spent.
    breakdown : ndarray of bool
        Per probe, whether an invariant subspace was found (the run stopped early and
        the remaining ``alpha``/``beta`` are zero-padded).
    num_steps : ndarray of int
        Per probe, the number of valid steps (``m`` unless breakdown).
    norm : ndarray
        Per probe, the norm of the start vector.
    """

    alpha: np.ndarray
    beta: np.ndarray
    basis: Any = None
    num_matvecs: int = 0
    breakdown: Any = None
    num_steps: Any = None
    norm: Any = None
    precision: str | None = None
    _skip_in_dict = ("basis",)

    def matrix(self, probe: int | None = None) -> np.ndarray:
        """The dense tridiagonal ``T`` (of one probe when batched), truncated at breakdown."""
        alpha, beta = np.asarray(self.alpha), np.asarray(self.beta)
        if alpha.ndim == 2:
            if probe is None:
                raise ValueError("batched Tridiagonal: pass probe=")
            alpha, beta = alpha[probe], beta[probe]
            m = int(np.asarray(self.num_steps)[probe])
        else:
            m = int(np.asarray(self.num_steps).reshape(-1)[0]) if self.num_steps is not None else len(alpha)
        alpha, beta = alpha[:m], beta[: max(m - 1, 0)]
        return np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)


@dataclasses.dataclass(frozen=True)
class Eigen(Result):
    """Eigenpairs from :func:`dualhess.eigsh` or :func:`dualhess.power_iteration`.

    Attributes
    ----------
    values : ndarray, shape (k,)
        Eigenvalues (order documented by the function that made them).
    vectors : native array, shape (n, k), optional
        Unit eigenvectors in columns, on the operator's device (scipy's layout).
    residuals : ndarray, shape (k,)
        ``||H v - lambda v||`` for each pair.
    converged : ndarray of bool, shape (k,)
    num_matvecs : int
    precision : str, optional
        What the numbers carry: the operator's dtype (``"float32"``), or for a 16-bit
        operator e.g. ``"bfloat16 products, float32 arithmetic"`` (its residuals are then
        recomputed with fresh products, and ``converged`` judged on them). Every result type
        has this field.
    """

    values: np.ndarray
    vectors: Any
    residuals: np.ndarray
    converged: np.ndarray
    num_matvecs: int
    which: str = "LA"
    tol: float | None = None
    precision: str | None = None
    _skip_in_dict = ("vectors",)

    @property
    def all_converged(self) -> bool:
        return bool(np.all(self.converged))


@dataclasses.dataclass(frozen=True)
class TraceEstimate(Result):
    """A trace estimate ``value +- stderr`` (``stderr`` is 0 for an exact trace)."""

    value: float
    stderr: float
    num_matvecs: int
    method: str
    samples: Any = None
    precision: str | None = None
    _skip_in_dict = ("samples",)

    def __float__(self) -> float:
        return float(self.value)


@dataclasses.dataclass(frozen=True)
class DiagonalEstimate(Result):
    """A diagonal estimate; ``values`` is a native ``(n,)`` array on the operator's device."""

    values: Any
    num_matvecs: int
    method: str
    precision: str | None = None

    def numpy(self) -> np.ndarray:
        return to_numpy(self.values)


@dataclasses.dataclass(frozen=True)
class SpectralDensity(Result):
    """An eigenvalue density from stochastic Lanczos quadrature.

    Attributes
    ----------
    grid : ndarray
        Points where the broadened density is evaluated.
    values : ndarray
        The Gaussian-broadened density on ``grid``; integrates to 1 on the grid.
    nodes, weights : ndarray, shape (num_probes, num_steps)
        The raw quadrature (Ritz values and squared first components) of each probe;
        each probe's weights sum to 1.
    num_matvecs : int
    sigma : float
        The broadening width.
    """

    grid: np.ndarray
    values: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    num_matvecs: int
    sigma: float = 0.0
    precision: str | None = None

    def plot(self, ax: Any = None, *, log: bool = True, label: str | None = None, **kwargs: Any) -> Any:
        """Draw the density with matplotlib (log scale by default); returns the axes."""
        from ._plotting import plot_density

        return plot_density(self, ax, log=log, label=label, **kwargs)
