"""dualhess.diagonal: Hutchinson (Bekas et al.), XDiag and exact, against exact diagonals."""

from __future__ import annotations

import numpy as np
import pytest
from _matrices import (
    FRAMEWORKS,
    CountingOperator,
    native_operator,
    symmetric_with_spectrum,
)

from dualhess import DenseOperator, ExactUnavailableError, Operator
from dualhess._array import to_numpy
from dualhess._diagonal import diagonal

N = 300


@pytest.fixture(scope="module")
def decaying() -> np.ndarray:
    return symmetric_with_spectrum(1.0 / np.arange(1.0, N + 1.0) ** 2, seed=1)


def _relative_error(estimate, A: np.ndarray) -> float:
    d = np.diag(A)
    return float(np.linalg.norm(to_numpy(estimate.values) - d) / np.linalg.norm(d))


def test_xdiag_beats_hutchinson_on_decaying_spectrum(decaying):
    errors = {
        method: np.median(
            [
                _relative_error(diagonal(decaying, method=method, num_matvecs=60, seed=s), decaying)
                for s in range(10)
            ]
        )
        for method in ("hutchinson", "xdiag")
    }
    assert errors["xdiag"] <= 0.05
    assert errors["xdiag"] <= 0.1 * errors["hutchinson"]


def test_hutchinson_error_matches_its_variance(decaying):
    # Rademacher probes: Var(d_i) = sum_{j != i} A_ij^2 / m exactly (Bekas et al. 2007).
    A, m = decaying, 50
    d = np.diag(A)
    variance = (np.sum(A**2, axis=1) - d**2) / m
    ratios = [
        np.mean(
            (diagonal(A, method="hutchinson", num_matvecs=m, seed=s).values - d) ** 2 / variance
        )
        for s in range(10)
    ]
    assert 0.7 <= np.mean(ratios) <= 1.3


def test_hutchinson_is_the_bekas_formula():
    A = symmetric_with_spectrum(np.linspace(-1.0, 2.0, 30), seed=2)
    op = CountingOperator(A)
    est = diagonal(op, method="hutchinson", num_matvecs=7, seed=0)
    assert len(op.matmat_calls) == 1 and est.num_matvecs == 7 == op.num_matvecs
    V = op.matmat_calls[0]
    assert set(np.unique(V)) == {-1.0, 1.0}
    expected = np.sum(V * (A @ V), axis=1) / np.sum(V * V, axis=1)
    np.testing.assert_allclose(est.values, expected, atol=1e-12)


def test_xdiag_equals_its_leave_one_out_definition():
    rng = np.random.default_rng(3)
    eigenvalues = np.arange(1.0, 41.0) ** -1.5 * np.where(rng.random(40) < 0.3, -1.0, 1.0)
    A = symmetric_with_spectrum(eigenvalues, seed=3)
    op = CountingOperator(A)
    est = diagonal(op, method="xdiag", num_matvecs=17, seed=5)
    assert est.num_matvecs == 16 == op.num_matvecs  # odd budget: one product unused
    assert [c.shape[1] for c in op.matmat_calls] == [8, 8]
    Omega = op.matmat_calls[0]
    Y = A @ Omega
    expected = np.zeros(40)
    for i in range(Omega.shape[1]):
        Q, _ = np.linalg.qr(np.delete(Y, i, axis=1))
        w = Omega[:, i]
        P = np.eye(40) - Q @ Q.T
        expected += np.diag(Q @ Q.T @ A) + w * (P @ A @ w) / w**2
    expected /= Omega.shape[1]
    np.testing.assert_allclose(est.values, expected, atol=1e-12)


def test_exact_diagonal():
    A = symmetric_with_spectrum(np.linspace(-2.0, 3.0, 40), seed=4)
    est = diagonal(DenseOperator(A), method="exact")
    np.testing.assert_allclose(est.values, np.diag(A), atol=1e-15)
    assert est.num_matvecs == 0 and est.method == "exact"
    assert est.to_dict()["values"] == pytest.approx(list(np.diag(A)))


def test_exact_diagonal_unavailable_propagates():
    class MatvecOnly(Operator):
        def __init__(self, A):
            super().__init__(A.shape)
            self.A = A

        def _matvec(self, v):
            return self.A @ v

    with pytest.raises(ExactUnavailableError, match="no exact diagonal"):
        diagonal(MatvecOnly(np.eye(3)), method="exact")


def test_xdiag_is_exact_when_the_basis_captures_the_range():
    eigenvalues = np.zeros(60)
    eigenvalues[:3] = [2.0, -1.0, 0.5]
    A = symmetric_with_spectrum(eigenvalues, seed=5)  # rank 3
    est = diagonal(A, method="xdiag", num_matvecs=20, seed=0)
    np.testing.assert_allclose(est.values, np.diag(A), atol=1e-12)
    small = symmetric_with_spectrum([3.0, -1.0, 2.0, 0.1], seed=6)
    est = diagonal(small, method="xdiag", num_matvecs=50, seed=0)  # basis capped at n = 4
    np.testing.assert_allclose(est.values, np.diag(small), atol=1e-12)
    assert est.num_matvecs == 8


@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_same_seed_same_estimate_across_frameworks(method):
    A = symmetric_with_spectrum(np.arange(1.0, 51.0) ** -1.0, seed=7)
    reference = to_numpy(diagonal(A, method=method, num_matvecs=20, seed=9).values)
    for framework in FRAMEWORKS[1:]:
        try:
            op = native_operator(A, framework)
        except pytest.skip.Exception:
            continue
        est = diagonal(op, method=method, num_matvecs=20, seed=9)
        assert type(est.values).__module__.split(".")[0] in (framework, "jaxlib", "jax")
        np.testing.assert_allclose(to_numpy(est.values), reference, atol=1e-12)
    other = diagonal(A, method=method, num_matvecs=20, seed=10).numpy()
    assert not np.allclose(other, reference)


def test_float32_operator_agrees_with_float64_to_single_precision():
    A = symmetric_with_spectrum(np.arange(1.0, 81.0) ** -1.0, seed=8)
    for method in ("hutchinson", "xdiag"):
        e64 = diagonal(A, method=method, num_matvecs=30, seed=3).values
        e32 = diagonal(DenseOperator(A.astype(np.float32)), method=method, num_matvecs=30, seed=3)
        assert e32.values.dtype == np.float32
        np.testing.assert_allclose(e32.values, e64, atol=1e-4 * np.abs(A).max() * 10)


def test_progress_bar_runs():
    est = diagonal(np.diag([1.0, 2.0, 3.0]), method="xdiag", num_matvecs=6, progress=True)
    np.testing.assert_allclose(est.values, [1.0, 2.0, 3.0], atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_matvecs": 0}, ValueError, "num_matvecs must be positive"),
        ({"num_matvecs": -1, "method": "hutchinson"}, ValueError, "num_matvecs must be positive"),
        ({"method": "diag++"}, ValueError, "unknown method 'diag\\+\\+'"),
        ({"method": "xdiag", "num_matvecs": 1}, ValueError, "xdiag.*num_matvecs >= 2"),
        ({"seed": 1.5}, TypeError, "seed must be"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        diagonal(np.eye(4), **kwargs)
