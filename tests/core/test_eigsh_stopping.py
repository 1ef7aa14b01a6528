"""eigsh's stopping rule in the user's terms: criterion="eigenvalue" bounds |lambda - theta|."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_symmetric

from dualhess import DenseOperator
from dualhess._eigsh import eigsh, error_bounds


@pytest.fixture(scope="module")
def hessian_like():
    rng = np.random.default_rng(0)
    lam = np.r_[10.0, 7.0, 5.5, 4.5, 4.0, 3.0 * rng.random(5) + 0.5, 0.3 * rng.standard_normal(990)]
    return make_symmetric(lam, seed=1), np.sort(lam)[::-1][:5]


@pytest.mark.parametrize("tol", [1e-3, 1e-6, 1e-9])
def test_eigenvalue_errors_within_tol_when_converged(hessian_like, tol):
    A, exact = hessian_like
    res = eigsh(DenseOperator(A), 5, tol=tol, seed=0, criterion="eigenvalue")
    assert res.converged.all()
    scale = np.abs(exact).max()
    assert np.max(np.abs(res.values - exact)) <= tol * scale


def test_fewer_products_than_the_residual_rule(hessian_like):
    # measured: 20 products against 23 at tol 1e-6 (errors 4.7e-9 and 3.5e-14 relative);
    # plain Lanczos with the step count chosen by an oracle needs 16
    A, exact = hessian_like
    new = eigsh(DenseOperator(A), 5, tol=1e-6, seed=0)  # the default: criterion="eigenvalue"
    old = eigsh(DenseOperator(A), 5, tol=1e-6, seed=0, criterion="residual")
    print(f"eigenvalue rule {new.num_matvecs}, residual rule {old.num_matvecs} products")
    assert new.num_matvecs <= 20 < old.num_matvecs
    assert np.max(np.abs(new.values - exact)) <= 1e-6 * 10.0


def test_error_bounds_kato_temple():
    theta = np.array([1.0, 0.5, 0.0])
    res = np.array([1e-3, 1e-2, 0.6])
    bounds = error_bounds(theta, res, np.array([0, 1]))
    # gap of 1.0: min(|1 - 0.5| - 1e-2, |1 - 0| - 0.6) = 0.4
    np.testing.assert_allclose(bounds[0], 1e-6 / 0.4)
    # gap of 0.5: |0.5 - 0| - 0.6 < 0 -> no gap known, the bound is r
    assert bounds[1] == 1e-2
