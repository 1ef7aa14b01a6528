"""Interop: ``op.to_scipy()`` with scipy's eigsh and cg; matfree on a JAX operator."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as spla


@pytest.mark.torch
def test_to_scipy_eigsh_and_cg_on_a_torch_hessian():
    torch = pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    import torch_backend as tb
    from torch_backend.examples import load_digits, make_mlp

    X, y = load_digits(torch.float64, n=48, flat=True)
    op = tb.hessian(make_mlp(hidden=2, seed=1), torch.nn.CrossEntropyLoss(), (X, y),
                    method="func")
    H = op.to_dense().numpy()
    H = 0.5 * (H + H.T)
    exact = np.linalg.eigvalsh(H)
    A = op.to_scipy()
    values = spla.eigsh(A, k=3, which="LA", tol=1e-12, return_eigenvectors=False)
    norm = np.abs(exact).max()
    np.testing.assert_allclose(np.sort(values), exact[-3:], rtol=0, atol=1e-9 * norm)
    # cg on the damped (positive definite) Hessian H + damping I.
    damping = abs(exact[0]) + 1e-2 * norm
    damped = A + damping * spla.aslinearoperator(np.eye(op.n))
    b = np.random.default_rng(0).standard_normal(op.n)
    x, info = spla.cg(damped, b, rtol=1e-12, maxiter=2000)
    assert info == 0
    expected = np.linalg.solve(H + damping * np.eye(op.n), b)
    cond = (exact[-1] + damping) / (exact[0] + damping)
    # ||x - x*|| / ||x*|| <= cond * relative residual
    assert np.linalg.norm(x - expected) <= 10 * cond * 1e-12 * np.linalg.norm(expected)


@pytest.mark.jax
def test_matfree_trace_of_a_jax_hessian():
    jax = pytest.importorskip("jax")
    pytest.importorskip("matfree")
    import jax.numpy as jnp
    from matfree import stochtrace

    from jax_backend import hessian

    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((32, 4)), rng.standard_normal(32)

    def loss_fn(p, batch):
        inputs, targets = batch
        return jnp.mean((jnp.tanh(inputs @ p["w"]) @ p["v"] - targets) ** 2)

    params = {"w": jnp.asarray(rng.standard_normal((4, 3))), "v": jnp.asarray(rng.standard_normal(3))}
    op = hessian(loss_fn, params, (x, t))
    exact = float(np.trace(np.asarray(op.to_dense())))
    sampler = stochtrace.sampler_signs(jnp.zeros(op.n), num=2000)
    estimate = stochtrace.estimator_monte_carlo(stochtrace.monte_carlo_trace(), sampler)
    value = float(estimate(op._matvec, jax.random.PRNGKey(0)))  # the traceable product
    H = np.asarray(op.to_dense())
    sigma = np.sqrt(2 * (np.sum(H**2) - np.sum(np.diag(H) ** 2)))
    assert abs(value - exact) <= 5 * sigma / np.sqrt(2000)
