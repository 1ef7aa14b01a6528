"""Deflated power iteration (PyHessian's algorithm) against numpy.linalg.eigh."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import as_numpy, dense_operator, make_symmetric

from dualhess import DenseOperator, Operator, OperatorError
from dualhess._eigsh import NotConvergedWarning
from dualhess._power import power_iteration

# Indefinite, the dominant eigenvalue negative; successive magnitude ratios 1/2, so the
# power iteration's error after stopping is below the last relative change (< tol).
SPECTRUM = np.r_[-8.0, 4.0, -2.0, np.linspace(-0.5, 0.5, 97)]


def largest_magnitude(A: np.ndarray, k: int) -> np.ndarray:
    w = np.linalg.eigh(A)[0]
    return w[np.argsort(-np.abs(w), kind="stable")][:k]


def test_agrees_with_eigh_with_sign(framework):
    A = make_symmetric(SPECTRUM, seed=0)
    tol = 1e-8
    res = power_iteration(dense_operator(A, framework), k=3, tol=tol, max_iter=500, seed=0)
    exact = largest_magnitude(A, 3)
    np.testing.assert_allclose(exact, [-8.0, 4.0, -2.0], atol=1e-12)
    assert res.converged.all()
    np.testing.assert_allclose(res.values, exact, rtol=tol)
    V = as_numpy(res.vectors)
    recomputed = np.linalg.norm(A @ V - V * res.values, axis=0)
    np.testing.assert_allclose(res.residuals, recomputed, rtol=1e-8, atol=1e-14)
    # Rayleigh quotients: the error is at most residual^2 / gap (Kato-Temple).
    gaps = np.array([4.0, 2.0, 1.5])
    assert np.all(np.abs(res.values - exact) <= res.residuals**2 / gaps * (1 + 1e-6) + 1e-13)
    np.testing.assert_allclose(V.T @ V, np.eye(3), atol=1e-10)
    assert res.which == "LM"


def test_matches_pyhessian_stopping_rule():
    # With tol=1e-3 the relative change stops the iteration early; the value is still the
    # Rayleigh quotient of the returned vector and within a few tol of the truth.
    A = make_symmetric(SPECTRUM, seed=1)
    op = DenseOperator(A)
    res = power_iteration(op, k=2, seed=3)
    assert res.num_matvecs == op.num_matvecs < 2 * 100
    np.testing.assert_allclose(res.values, [-8.0, 4.0], rtol=1e-3)
    v = res.vectors[:, 0]
    np.testing.assert_allclose(res.values[0], v @ A @ v, rtol=1e-14)


def test_not_converged_warns():
    A = make_symmetric(np.r_[1.0, 0.99, np.linspace(0.0, 0.5, 38)], seed=2)
    with pytest.warns(NotConvergedWarning, match="did not reach"):
        res = power_iteration(DenseOperator(A), k=1, max_iter=3, tol=1e-12, seed=0)
    assert not res.converged[0] and res.num_matvecs == 3


def test_bad_input_messages():
    op = DenseOperator(make_symmetric(np.arange(1.0, 5.0), seed=0))
    with pytest.raises(ValueError, match="k must be positive"):
        power_iteration(op, k=0)
    with pytest.raises(ValueError, match="k must be <= n"):
        power_iteration(op, k=5)
    with pytest.raises(ValueError, match="tol must be a positive"):
        power_iteration(op, tol=0.0)
    with pytest.raises(ValueError, match="max_iter must be positive"):
        power_iteration(op, max_iter=0)

    class NaNOperator(Operator):
        def _matvec(self, v):
            return v * np.nan

    with pytest.raises(OperatorError, match="NaN"):
        power_iteration(NaNOperator((4, 4)), seed=0)
    with pytest.raises(OperatorError, match="NaN"):
        power_iteration(NaNOperator((4, 4), check_finite=False), seed=0)
