"""Shared fixtures for the core tests: symmetric matrices with known spectra, frameworks.

``make_symmetric(eigenvalues, seed)`` returns a dense numpy float64 matrix ``Q diag(lam) Q^T``
with the given eigenvalues; ``to_native(matrix, framework)`` converts it to a numpy, torch
or jax (float64) array; the ``framework`` fixture runs a test on each installed framework.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from dualhess import DenseOperator

FRAMEWORKS = ("numpy", "torch", "jax")

#: Above this size ``make_symmetric`` rotates with Householder reflections (O(n^2)) instead
#: of a dense random orthogonal matrix (O(n^3)); a Gaussian start vector sees the same
#: spectral measure either way.
_DENSE_Q_LIMIT = 400


def random_orthogonal(n: int, seed: int = 0) -> np.ndarray:
    """A Haar-distributed random orthogonal ``n x n`` matrix (QR of a Gaussian matrix)."""
    rng = np.random.default_rng(seed)
    Q, R = np.linalg.qr(rng.standard_normal((n, n)))
    return Q * np.sign(np.diag(R))


def make_symmetric(
    eigenvalues, seed: int = 0, *, return_vectors: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """A symmetric float64 matrix with exactly these eigenvalues (up to rounding).

    For ``n <= 400`` the eigenvectors are a Haar-random orthogonal matrix; above that the
    matrix is ``Q diag(lam) Q^T`` with ``Q`` a product of six random Householder
    reflections, which costs ``O(n^2)``. With ``return_vectors=True`` also returns the eigenvectors
    ``Q`` (columns, in the order of ``eigenvalues``).
    """
    lam = np.asarray(eigenvalues, dtype=np.float64)
    n = lam.shape[0]
    if n <= _DENSE_Q_LIMIT:
        Q = random_orthogonal(n, seed)
        A = (Q * lam) @ Q.T
    else:
        # Q = H_1 ... H_r = I - W Y^T (compact WY form), A = Q diag(lam) Q^T in O(n^2 r).
        rng = np.random.default_rng(seed)
        r = 6
        Y = rng.standard_normal((n, r))
        Y /= np.linalg.norm(Y, axis=0)
        W = np.zeros((n, 0))
        for j in range(r):
            Qu = Y[:, j] - W @ (Y[:, :j].T @ Y[:, j])
            W = np.concatenate([W, 2 * Qu[:, None]], axis=1)
        DY = lam[:, None] * Y
        left = np.concatenate([W, DY], axis=1)
        M = np.block([[Y.T @ DY, -np.eye(r)], [-np.eye(r), np.zeros((r, r))]])
        A = left @ M @ left.T
        A[np.diag_indices(n)] += lam
        Q = np.eye(n) - W @ Y.T if return_vectors else None
    A = (A + A.T) / 2
    return (A, Q) if return_vectors else A


@functools.lru_cache(maxsize=8)
def _cached_symmetric(key: tuple, seed: int) -> np.ndarray:
    A = make_symmetric(np.asarray(key), seed)
    A.setflags(write=False)
    return A


def cached_symmetric(eigenvalues, seed: int = 0) -> np.ndarray:
    """Like :func:`make_symmetric`, cached for the session (the result is read-only)."""
    return _cached_symmetric(tuple(np.asarray(eigenvalues, dtype=np.float64).tolist()), seed)


def to_native(matrix: np.ndarray, framework: str):
    """Convert a numpy matrix to a float64 array of ``framework``; skip when not installed."""
    if framework == "numpy":
        return np.asarray(matrix, dtype=np.float64)
    if framework == "torch":
        torch = pytest.importorskip("torch")
        return torch.tensor(np.asarray(matrix), dtype=torch.float64)
    if framework == "jax":
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        return jnp.asarray(np.asarray(matrix), dtype=jnp.float64)
    raise ValueError(f"unknown framework {framework!r}")


def dense_operator(matrix: np.ndarray, framework: str = "numpy", **kwargs) -> DenseOperator:
    """A float64 :class:`~dualhess.DenseOperator` of ``matrix`` in ``framework``."""
    return DenseOperator(to_native(matrix, framework), **kwargs)


def as_numpy(x) -> np.ndarray:
    """A native array (numpy, torch, jax) as a float64 numpy array."""
    detach = getattr(x, "detach", None)
    if detach is not None:
        x = detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


@pytest.fixture(params=FRAMEWORKS)
def framework(request) -> str:
    """Each installed framework's name ('numpy', 'torch', 'jax'); skips missing ones.

    Use with :func:`dense_operator` / :func:`to_native` to build a float64 operator.
    """
    name = request.param
    if name == "torch":
        pytest.importorskip("torch")
    elif name == "jax":
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
    return name


@pytest.fixture
def make_operator(framework):
    """A factory ``make_operator(matrix, **kwargs)`` giving a float64 DenseOperator in
    the parametrised framework."""

    def factory(matrix: np.ndarray, **kwargs) -> DenseOperator:
        return dense_operator(matrix, framework, **kwargs)

    factory.framework = framework
    return factory
