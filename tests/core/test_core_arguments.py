"""Unclear answers on core inputs (issue 23): each now names the argument and the fix.

Before: ``tol=None`` gave ``TypeError: float() argument must be ... not 'NoneType'``;
``seed=-1`` numpy's bare ``expected non-negative integer``; an integer ``DenseOperator``
``dtype mismatch: the operator is int64, the vector is float64`` at the first product (a
boolean one the same); a complex one was accepted and its (non-Hermitian) spectrum returned.
"""

from __future__ import annotations

import numpy as np
import pytest

import dualhess
from dualhess import DenseOperator, OperatorError

errors_table = pytest.mark.errors_table
A = np.diag(np.arange(1.0, 21.0))


@errors_table
def test_tol_none():
    with pytest.raises(TypeError, match="eigsh: tol=None is not a tolerance; pass a number"):
        dualhess.eigsh(DenseOperator(A), k=2, seed=0, tol=None)
    with pytest.raises(TypeError, match="power_iteration: tol=None is not a tolerance"):
        dualhess.power_iteration(DenseOperator(A), k=1, seed=0, tol=None)


def test_tol_that_is_not_a_number():
    with pytest.raises(TypeError, match="eigsh: tol must be a real number >= 0, got str"):
        dualhess.eigsh(DenseOperator(A), k=2, seed=0, tol="1e-8")
    with pytest.raises(ValueError, match=r"power_iteration: tol must be a positive number"):
        dualhess.power_iteration(DenseOperator(A), k=1, seed=0, tol=float("nan"))
    with pytest.raises(ValueError, match=r"eigsh: tol must be a finite number >= 0, got -1"):
        dualhess.eigsh(DenseOperator(A), k=2, seed=0, tol=-1)
    assert dualhess.eigsh(DenseOperator(A), k=2, seed=0, tol=np.float32(1e-6)).converged.all()


def test_tol_none_is_refused_before_a_checkpoint_product(tmp_path):
    op = DenseOperator(A)
    with pytest.raises(TypeError, match="tol=None"):
        dualhess.eigsh(op, k=2, seed=0, tol=None, checkpoint=tmp_path / "c.npz")
    assert op.num_matvecs == 0 and not list(tmp_path.iterdir())


@errors_table
def test_negative_seed():
    for call in (
        lambda: dualhess.eigsh(DenseOperator(A), k=2, seed=-1),
        lambda: dualhess.lanczos(DenseOperator(A), 5, seed=-1),
        lambda: dualhess.trace(DenseOperator(A), num_matvecs=10, seed=-1),
        lambda: dualhess.density(DenseOperator(A), num_probes=2, num_steps=5, seed=-1),
    ):
        with pytest.raises(ValueError, match="seed must be a non-negative int") as info:
            call()
        assert "pass e.g. seed=1" in str(info.value)


def test_negative_seed_with_a_checkpoint(tmp_path):
    op = DenseOperator(A)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        dualhess.trace(op, num_matvecs=10, seed=-3, checkpoint=tmp_path / "c.npz")
    assert op.num_matvecs == 0


@errors_table
def test_integer_dense_operator_is_computed_in_float64():
    """An integer matrix is converted to float64 (numpy.linalg.eigh's and scipy's rule):
    exact for integers up to 2**53. Was: OperatorError ``dtype mismatch`` at the first
    product."""
    M = np.diag(np.arange(1, 21)).astype(np.int64)
    M[0, 1] = M[1, 0] = 3
    op = DenseOperator(M)
    assert op.dtype == np.float64 and op.matrix.dtype == np.float64
    r = dualhess.eigsh(op, k=3, seed=0, tol=1e-12)
    np.testing.assert_allclose(r.values, np.linalg.eigvalsh(M.astype(float))[::-1][:3], rtol=1e-12)
    assert r.converged.all()
    t = dualhess.trace(DenseOperator(np.eye(20, dtype=bool)), method="hutchinson",
                       num_matvecs=4, seed=0)
    assert t.value == pytest.approx(20.0)


@errors_table
def test_complex_dense_operator():
    with pytest.raises(OperatorError, match="the matrix is complex128; a Hessian is real symmetric"):
        DenseOperator(np.eye(5, dtype=complex))
