"""Gradient overlap against exact answers: a quadratic loss and the dense eigenvectors of
small float64 models (torch and JAX), whose gradients come from a from-scratch autograd."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_symmetric

import dualhess
from dualhess import LossUnavailableError, QuadraticLoss, gradient_overlap
from dualhess._overlap import overlap_of


def dense_overlap(H: np.ndarray, g: np.ndarray, k: int) -> float:
    _, vectors = np.linalg.eigh(H)
    top = vectors[:, ::-1][:, :k]
    return float(np.sum((top.T @ g) ** 2) / (g @ g))


def test_quadratic_overlap_is_exact():
    lam = np.array([6.0, 4.0, 2.0, 1.0, 0.0, -1.0, -3.0])
    A = make_symmetric(lam, 4)
    theta = np.random.default_rng(0).standard_normal(7)
    op = QuadraticLoss(A, params=theta)
    g = A @ theta
    for k in (1, 3, 6):
        result = gradient_overlap(op, k=k, tol=1e-12)
        assert result.value == pytest.approx(dense_overlap(A, g, k), rel=1e-10)
        assert result.per_direction.sum() == pytest.approx(result.value, rel=1e-10)
        assert result.eigenvalues == pytest.approx(lam[:k], rel=1e-10)
        assert float(result) == result.value
    assert result.gradient_norm == pytest.approx(np.linalg.norm(g), rel=1e-14)
    eig = dualhess.eigsh(op, k=3, tol=1e-12, seed=0)
    given = gradient_overlap(op, eigen=eig)
    assert given.k == 3 and given.num_matvecs == 0
    assert given.value == pytest.approx(dense_overlap(A, g, 3), rel=1e-10)
    assert gradient_overlap(op, k=2, eigen=eig).value == pytest.approx(
        dense_overlap(A, g, 2), rel=1e-10)


def test_edge_cases():
    op = QuadraticLoss(np.diag([3.0, 2.0, 1.0]))  # theta = 0: zero gradient
    assert gradient_overlap(op, k=1).value == 0.0
    with pytest.raises(ValueError, match="k must be < n"):
        gradient_overlap(op, k=3)
    with pytest.raises(LossUnavailableError, match="no loss"):
        gradient_overlap(dualhess.DenseOperator(np.eye(3)), k=1)
    eig = dualhess.eigsh(op, k=1, seed=0, return_vectors=False)
    with pytest.raises(ValueError, match="no vectors"):
        gradient_overlap(op, eigen=eig)
    # g inside the span of a non-orthonormal basis: overlap 1 (projection, not cosines)
    value, _ = overlap_of(np.array([1.0, 1.0, 0.0]), np.array([[1.0, 1.0], [0.0, 1.0],
                                                                [0.0, 0.0]]))
    assert value == pytest.approx(1.0, rel=1e-14)


def test_torch_overlap_against_dense_eigenvectors():
    torch = pytest.importorskip("torch")
    from torch_backend import hessian

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 3)).double()
    X, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    loss_fn = torch.nn.CrossEntropyLoss()
    op = hessian(model, loss_fn, [(X[:25], y[:25]), (X[25:], y[25:])])

    def loss_of(flat):
        return loss_fn(torch.func.functional_call(model, op.layout.split(flat), (X,)), y)

    flat = op.params_flat.clone().requires_grad_(True)
    g = torch.autograd.grad(loss_of(flat), flat)[0].numpy()
    H = torch.autograd.functional.hessian(loss_of, op.params_flat).numpy()
    assert np.allclose(op.gradient().numpy(), g, rtol=1e-12, atol=1e-15)
    result = gradient_overlap(op, k=3, tol=1e-11)
    assert result.value == pytest.approx(dense_overlap(H, g, 3), rel=1e-8)
    assert result.per_direction[0] == pytest.approx(dense_overlap(H, g, 1), rel=1e-8)


def test_jax_overlap_against_dense_eigenvectors():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from jax_backend import dense_hessian, hessian

    rng = np.random.default_rng(1)
    X, t = rng.standard_normal((40, 5)), rng.standard_normal((40, 2))
    params = {"w": jnp.asarray(rng.standard_normal((5, 6)) * 0.5),
              "v": jnp.asarray(rng.standard_normal((6, 2)) * 0.5)}

    def loss_fn(p, batch):
        x, target = batch
        return jnp.mean((jnp.tanh(x @ p["w"]) @ p["v"] - target) ** 2)

    data = [(X[:25], t[:25]), (X[25:], t[25:])]
    op = hessian(loss_fn, params, data)
    g = np.asarray(ravel_pytree(jax.grad(loss_fn)(params, (X, t)))[0])
    H = np.asarray(dense_hessian(loss_fn, params, data))
    assert np.allclose(np.asarray(op.gradient()), g, rtol=1e-12, atol=1e-15)
    for k in (1, 2):
        result = gradient_overlap(op, k=k, tol=1e-11)
        assert result.value == pytest.approx(dense_overlap(H, g, k), rel=1e-8)


def test_torch_closure_and_ggn_operators_have_the_loss():
    torch = pytest.importorskip("torch")
    import torch_backend as tb

    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 2)).double()
    X, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 2, (20,))
    ce = torch.nn.CrossEntropyLoss()

    def closure(net, batch):  # a regularised loss: cross-entropy + 0.1 ||W||^2
        inputs, targets = batch
        return ce(net(inputs), targets) + 0.1 * sum((p**2).sum() for p in net.parameters())

    op = tb.hessian(model, None, [(X[:12], y[:12]), (X[12:], y[12:])], closure=closure)
    delta = 0.1 * torch.randn(op.n, dtype=torch.float64)
    moved = op.layout.split(op.params_flat + delta)
    with torch.no_grad():
        out = torch.func.functional_call(model, moved, (X,))
        direct = ce(out, y) + 0.1 * sum((p**2).sum() for p in moved.values())
    # each batch carries the regulariser once, weighted by its size: the mean is exact
    assert op.loss_at(delta) == pytest.approx(float(direct), rel=1e-13)
    model.zero_grad()
    closure(model, (X, y)).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.allclose(op.gradient(), g, rtol=1e-12, atol=1e-15)
    ggn = tb.ggn(model, ce, (X, y))
    assert ggn.loss_at(torch.zeros(ggn.n, dtype=torch.float64)) == pytest.approx(
        float(ce(model(X), y)), rel=1e-14)
