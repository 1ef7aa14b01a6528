"""Lanczos tridiagonalisation: orthogonality, no ghosts, batching, breakdown, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import as_numpy, dense_operator, make_symmetric

from dualhess import DenseOperator, Operator, OperatorError
from dualhess._lanczos import lanczos

# n = 500: the bulk uniformly in [0, 1], one eigenvalue at 2 well isolated from it.
ISOLATED = np.r_[np.linspace(0.0, 1.0, 499), 2.0]


@pytest.fixture(scope="module")
def isolated_matrix() -> np.ndarray:
    return make_symmetric(ISOLATED, seed=3)


def test_300_steps_no_ghosts_and_orthonormal_basis(isolated_matrix, framework):
    A = isolated_matrix
    op = dense_operator(A, framework)
    T = lanczos(op, 300, seed=0, return_basis=True)
    assert T.num_matvecs == 300
    ritz = np.linalg.eigvalsh(T.matrix())
    top = np.linalg.eigvalsh(A)[-1]
    # Exactly one Ritz value near the isolated eigenvalue, and it is converged.
    assert np.sum(np.abs(ritz - top) < 1e-3) == 1
    assert abs(ritz.max() - top) <= 1e-10 * top
    Q = as_numpy(T.basis)
    assert Q.shape == (500, 300)
    assert np.linalg.norm(Q.T @ Q - np.eye(300), 2) <= 1e-10
    # The Lanczos relation: Q^T A Q is the tridiagonal matrix.
    assert np.abs(Q.T @ A @ Q - T.matrix()).max() <= 1e-10 * np.abs(ISOLATED).max()


def test_without_reorthogonalization_ghosts_appear(isolated_matrix):
    A = isolated_matrix
    T = lanczos(DenseOperator(A), 300, seed=0, reorthogonalize=False, return_basis=True)
    ritz = np.linalg.eigvalsh(T.matrix())
    # Plain three-term Lanczos loses orthogonality once the top Ritz value has converged
    # (Paige 1971): the isolated eigenvalue comes back as several "ghost" copies.
    assert np.sum(np.abs(ritz - 2.0) < 1e-6) >= 3
    Q = T.basis
    assert np.linalg.norm(Q.T @ Q - np.eye(300), 2) > 0.1


def test_full_run_reproduces_the_spectrum(framework):
    lam = np.r_[-4.0, -1.0, np.linspace(0.0, 3.0, 22)]
    A = make_symmetric(lam, seed=1)
    T = lanczos(dense_operator(A, framework), 24, seed=5)
    assert T.alpha.shape == (24,) and T.beta.shape == (23,)
    np.testing.assert_allclose(
        np.linalg.eigvalsh(T.matrix()), np.linalg.eigvalsh(A), rtol=0, atol=1e-10
    )


def test_same_seed_same_numbers_across_frameworks(framework):
    A = make_symmetric(np.linspace(-1.0, 2.0, 40), seed=2)
    ref = lanczos(DenseOperator(A), 15, seed=11)
    T = lanczos(dense_operator(A, framework), 15, seed=11)
    np.testing.assert_allclose(T.alpha, ref.alpha, rtol=0, atol=1e-12)
    np.testing.assert_allclose(T.beta, ref.beta, rtol=0, atol=1e-12)


def test_batched_probes_equal_single_runs(framework):
    A = make_symmetric(np.r_[np.linspace(-2.0, 1.0, 58), 3.0, 5.0], seed=4)
    op = dense_operator(A, framework)
    starts = np.random.default_rng(0).standard_normal((60, 3))
    batched = lanczos(op, 25, start=op.asarray(starts))
    assert batched.alpha.shape == (3, 25) and batched.beta.shape == (3, 24)
    assert batched.num_matvecs == 75
    for i in range(3):
        single = lanczos(op, 25, start=op.asarray(starts[:, i]))
        np.testing.assert_allclose(batched.alpha[i], single.alpha, rtol=0, atol=1e-10)
        np.testing.assert_allclose(batched.beta[i], single.beta, rtol=0, atol=1e-10)
    # num_probes draws the same probes as passing them explicitly.
    drawn = lanczos(op, 25, num_probes=3, seed=7)
    explicit = lanczos(op, 25, start=np.random.default_rng(7).standard_normal((60, 3)))
    np.testing.assert_allclose(drawn.alpha, explicit.alpha, rtol=0, atol=1e-12)


def test_breakdown_on_rank_two_matrix_has_no_nan(framework):
    A = make_symmetric(np.r_[3.0, -1.0, np.zeros(48)], seed=5)
    T = lanczos(dense_operator(A, framework), 20, num_probes=2, seed=0, return_basis=True)
    # Krylov space of a generic start: span{v} + range(A), dimension 3.
    np.testing.assert_array_equal(T.num_steps, [3, 3])
    assert T.breakdown.all()
    assert np.all(np.isfinite(T.alpha)) and np.all(np.isfinite(T.beta))
    assert np.all(np.isfinite(as_numpy(T.basis)))
    for p in range(2):
        ritz = np.linalg.eigvalsh(T.matrix(probe=p))
        np.testing.assert_allclose(ritz, [-1.0, 0.0, 3.0], atol=1e-12)
        np.testing.assert_array_equal(T.alpha[p, 3:], 0.0)


def test_bad_input_messages():
    A = make_symmetric(np.arange(1.0, 6.0), seed=0)
    op = DenseOperator(A)
    with pytest.raises(ValueError, match="num_steps must be positive"):
        lanczos(op, 0)
    with pytest.raises(ValueError, match="num_steps must be positive"):
        lanczos(op, -3)
    with pytest.raises(TypeError, match="num_steps must be an int"):
        lanczos(op, 2.5)
    with pytest.raises(OperatorError, match="square"):
        lanczos(DenseOperator(np.ones((3, 4))), 2)
    with pytest.raises(ValueError, match="start must have shape"):
        lanczos(op, 2, start=np.ones(4))
    with pytest.raises(ValueError, match="start vector is zero"):
        lanczos(op, 2, start=np.zeros(5))

    class NaNOperator(Operator):
        def _matvec(self, v):
            return v * np.nan

    with pytest.raises(OperatorError, match="NaN"):
        lanczos(NaNOperator((5, 5)), 3, seed=0)


def test_jax_host_rule_and_device_fixed_shapes_give_the_same_coefficients(monkeypatch):
    """jax on a CPU reorthogonalises in numpy (a rule per device), on-device otherwise."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import dualhess._lanczos as lanczos_module

    rng = np.random.default_rng(2)
    Q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    A = (Q * np.linspace(-2.0, 3.0, 40)) @ Q.T
    A = (A + A.T) / 2
    ref = lanczos(DenseOperator(A), 12, num_probes=3, seed=1)
    host = lanczos(DenseOperator(jnp.asarray(A)), 12, num_probes=3, seed=1, return_basis=True)
    monkeypatch.setattr(lanczos_module, "on_host", lambda x: False)
    device = lanczos(DenseOperator(jnp.asarray(A)), 12, num_probes=3, seed=1, return_basis=True)
    for tri in (host, device):
        np.testing.assert_allclose(tri.alpha, ref.alpha, atol=1e-12)
        np.testing.assert_allclose(tri.beta, ref.beta, atol=1e-12)
        assert isinstance(tri.basis, jax.Array) and tri.basis.shape == (3, 40, 12)
    np.testing.assert_allclose(np.asarray(host.basis), np.asarray(device.basis), atol=1e-10)
