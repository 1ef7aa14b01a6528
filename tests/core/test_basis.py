"""Where Krylov vectors live: basis="device" | "host" | "disk" give the same numbers."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import make_symmetric

from dualhess import DenseOperator
from dualhess._basis import DiskBasis, make_basis
from dualhess._density import density
from dualhess._eigsh import eigsh
from dualhess._lanczos import lanczos

LAM = np.r_[[10.0] * 3, 7.0, 5.0, np.linspace(-2.0, 2.0, 115)]


@pytest.fixture(scope="module")
def matrix():
    return make_symmetric(LAM, seed=4)


@pytest.mark.parametrize("mode", ["host", "disk"])
@pytest.mark.parametrize("max_basis", [None, 12])  # 12: several thick restarts
def test_eigsh_basis_modes_agree(matrix, mode, max_basis, tmp_path):
    ref = eigsh(DenseOperator(matrix), 5, tol=1e-10, seed=2, max_basis=max_basis)
    kwargs = {"basis_dir": str(tmp_path)} if mode == "disk" else {}
    res = eigsh(DenseOperator(matrix), 5, tol=1e-10, seed=2, max_basis=max_basis, basis=mode,
                **kwargs)
    assert res.num_matvecs == ref.num_matvecs
    np.testing.assert_allclose(res.values, ref.values, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.values, [10.0, 10.0, 10.0, 7.0, 5.0], rtol=0, atol=1e-9)
    np.testing.assert_allclose(res.residuals, ref.residuals, rtol=0, atol=1e-12)
    # the simple eigenvalues' vectors agree up to sign
    for j in (3, 4):
        assert abs(float(res.vectors[:, j] @ ref.vectors[:, j])) == pytest.approx(1, abs=1e-12)
    assert not list(tmp_path.iterdir())  # the disk basis removed its file


@pytest.mark.parametrize("mode", ["host", "disk"])
def test_lanczos_and_density_basis_modes_agree(matrix, mode):
    # 10 steps: before the top eigenvectors converge to rounding. Past that, the Lanczos
    # coefficients amplify any rounding difference (the order of a BLAS sum) by ~100 per
    # step, in every mode alike; the quadrature (nodes, density) stays stable, below.
    ref = lanczos(DenseOperator(matrix), 10, num_probes=3, seed=1, return_basis=True)
    tri = lanczos(DenseOperator(matrix), 10, num_probes=3, seed=1, return_basis=True, basis=mode)
    np.testing.assert_allclose(tri.alpha, ref.alpha, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tri.beta, ref.beta, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tri.basis, ref.basis, rtol=0, atol=1e-12)
    d_ref = density(DenseOperator(matrix), num_probes=4, num_steps=30, seed=0)
    d = density(DenseOperator(matrix), num_probes=4, num_steps=30, seed=0, basis=mode)
    np.testing.assert_allclose(d.nodes, d_ref.nodes, rtol=0, atol=1e-12)
    np.testing.assert_allclose(d.values, d_ref.values, rtol=0, atol=1e-12)


def test_lanczos_breakdown_with_host_basis():
    op = DenseOperator(np.diag([1.0, 2.0, 3.0, 4.0, 5.0]))
    ref = lanczos(op, 8, num_probes=2, seed=0)
    tri = lanczos(op, 8, num_probes=2, seed=0, basis="host")
    np.testing.assert_array_equal(tri.num_steps, ref.num_steps)
    np.testing.assert_allclose(tri.alpha, ref.alpha, rtol=0, atol=1e-12)


@pytest.mark.torch
def test_torch_operator_basis_modes_agree(matrix):
    torch = pytest.importorskip("torch")
    op = DenseOperator(torch.asarray(matrix))
    ref = eigsh(op, 5, tol=1e-10, seed=2, max_basis=12)
    for mode in ("host", "disk"):
        res = eigsh(DenseOperator(torch.asarray(matrix)), 5, tol=1e-10, seed=2, max_basis=12,
                    basis=mode)
        assert isinstance(res.vectors, torch.Tensor) and res.vectors.dtype == torch.float64
        np.testing.assert_allclose(res.values, ref.values, rtol=0, atol=1e-12)
        # 10 steps: interior Ritz values past convergence move with any rounding (torch
        # against numpy by 2e-3 at 20 steps, before this change too)
        t_ref = lanczos(op, 10, num_probes=3, seed=0)
        t = lanczos(DenseOperator(torch.asarray(matrix)), 10, num_probes=3, seed=0, basis=mode)
        np.testing.assert_allclose(t.alpha, t_ref.alpha, rtol=0, atol=1e-12)
        np.testing.assert_allclose(t.beta, t_ref.beta, rtol=0, atol=1e-12)


def test_basis_operations_against_numpy():
    rng = np.random.default_rng(0)
    n = 50
    V0, _ = np.linalg.qr(rng.standard_normal((n, 6)))
    M = rng.standard_normal((6, 4))
    w = rng.standard_normal(n)
    for mode in ("device", "host", "disk"):
        with make_basis(mode, capacity=8, like=np.zeros(n)) as basis:
            for j in range(6):
                basis.append(V0[:, j])
            out, h = basis.orthogonalize(w)
            np.testing.assert_allclose(np.abs(V0.T @ out).max(), 0.0, atol=1e-14)
            np.testing.assert_allclose(h, V0.T @ w, rtol=0, atol=1e-12)
            np.testing.assert_allclose(basis.combination(M), V0 @ M, rtol=0, atol=1e-12)
            basis.combine_rows(np.arange(6), M, np.arange(4))  # in place, overlapping rows
            basis.truncate(4)
            np.testing.assert_allclose(basis.rows([0, 1, 2, 3]), V0 @ M, rtol=0, atol=1e-12)


def test_disk_basis_file_removed_and_bad_arguments(tmp_path):
    basis = DiskBasis(4, np.zeros(10), directory=str(tmp_path))
    assert os.path.exists(basis.path)
    basis.close()
    assert not list(tmp_path.iterdir())
    A = np.diag(np.arange(1.0, 11.0))
    with pytest.raises(ValueError, match="basis must be one of"):
        eigsh(DenseOperator(A), 2, basis="gpu")
    with pytest.raises(ValueError, match="basis_dir"):
        lanczos(DenseOperator(A), 3, basis="host", basis_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not an existing directory"):
        density(DenseOperator(A), basis="disk", basis_dir=str(tmp_path / "missing"))
