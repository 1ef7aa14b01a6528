"""Small helpers for the estimator tests: matrices with a known spectrum, native operators."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import pytest

from dualhess import DenseOperator

FRAMEWORKS = ("numpy", "torch", "jax")


@lru_cache(maxsize=8)
def random_orthogonal(n: int, seed: int) -> np.ndarray:
    """A Haar-random orthogonal ``n x n`` matrix (QR of a Gaussian matrix, signs fixed)."""
    rng = np.random.default_rng(seed)
    Q, R = np.linalg.qr(rng.standard_normal((n, n)))
    Q = Q * np.sign(np.diag(R))
    Q.setflags(write=False)
    return Q


def symmetric_with_spectrum(eigenvalues: Any, seed: int = 0) -> np.ndarray:
    """``U diag(eigenvalues) U^T`` with a random orthogonal eigenbasis ``U`` (float64)."""
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
    U = random_orthogonal(eigenvalues.size, seed)
    A = (U * eigenvalues) @ U.T
    return (A + A.T) / 2


def native_operator(matrix: np.ndarray, framework: str, **kwargs: Any) -> DenseOperator:
    """A float64 :class:`DenseOperator` on numpy, torch or jax (skips when not installed)."""
    if framework == "numpy":
        return DenseOperator(np.asarray(matrix, dtype=np.float64), **kwargs)
    if framework == "torch":
        torch = pytest.importorskip("torch")
        return DenseOperator(torch.tensor(matrix, dtype=torch.float64), **kwargs)
    if framework == "jax":
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        return DenseOperator(jnp.asarray(matrix, dtype=jnp.float64), **kwargs)
    raise ValueError(f"unknown framework {framework!r}")


class CountingOperator(DenseOperator):
    """A numpy :class:`DenseOperator` that records every ``_matmat`` / ``_matvec`` call."""

    def __init__(self, matrix: np.ndarray, **kwargs: Any) -> None:
        super().__init__(matrix, **kwargs)
        self.matmat_calls: list[np.ndarray] = []
        self.matvec_calls = 0

    def _matmat(self, V: Any) -> Any:
        self.matmat_calls.append(np.array(V, copy=True))
        return super()._matmat(V)

    def _matvec(self, v: Any) -> Any:
        self.matvec_calls += 1
        return super()._matvec(v)
