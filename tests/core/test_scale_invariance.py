"""Every algorithm gives the same answer (relatively) whatever the scale of the operator.

A plain 2-norm squares the entries, so operators with entries near 1e-160 or 1e160 (float64;
1e-20 / 1e20 in float32) under- or overflow in the squares: Lanczos saw a breakdown at the
first step and density returned nonsense, eigsh reported wrong pairs as converged, trace
stderr overflowed, and power iteration's PyHessian-style test (``+ 1e-6``) stopped at once
on small operators. Here each result at scale ``s`` divided by ``s`` equals the result at 1.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import dense_operator, make_symmetric

import dualhess
from dualhess import DenseOperator

LAMBDA = np.r_[3.0, 2.0, -1.5, np.linspace(-1.0, 1.0, 117)]


def _results(op, scale):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow / underflow / divide warnings either
        top = dualhess.eigsh(op, 3, tol=1e-10, seed=0)
        power = dualhess.power_iteration(op, 1, tol=1e-8, max_iter=400, seed=0)
        out = {
            "eigsh": np.asarray(top.values) / scale,
            "eigsh residuals": np.asarray(top.residuals) / scale,
            "power": np.asarray(power.values) / scale,
            "lanczos beta": np.asarray(dualhess.lanczos(op, 20, seed=0).beta).ravel() / scale,
            "density nodes": dualhess.density(op, num_probes=2, num_steps=20, seed=0).nodes / scale,
        }
        for method in ("hutchinson", "hutch++", "xtrace"):
            t = dualhess.trace(op, method=method, num_matvecs=60, seed=0)
            out[f"{method} value"] = t.value / scale
            out[f"{method} stderr"] = t.stderr / scale
        for method in ("hutchinson", "xdiag"):
            d = dualhess.diagonal(op, method=method, num_matvecs=60, seed=0)
            out[f"{method} diagonal"] = d.numpy() / scale
    return out


def _compare(scaled, reference, rtol, atol):
    """Values to ``rtol``; quantities at rounding level (residuals) to ``atol`` of ||A||."""
    for key, value in reference.items():
        np.testing.assert_allclose(scaled[key], value, rtol=rtol, atol=atol * np.abs(LAMBDA).max(),
                                   err_msg=key)


@pytest.mark.parametrize("scale", [1e-200, 1e-7, 1e200])
def test_float64_results_do_not_depend_on_scale(scale):
    A = make_symmetric(LAMBDA, seed=5)
    reference = _results(dense_operator(A), 1.0)
    np.testing.assert_allclose(reference["eigsh"], [3.0, 2.0, 1.0], rtol=0, atol=1e-9)
    _compare(_results(dense_operator(A * scale), scale), reference, rtol=1e-9, atol=1e-12)


def _float32(matrix, framework):
    if framework == "torch":
        torch = pytest.importorskip("torch")
        return DenseOperator(torch.tensor(matrix, dtype=torch.float32))
    jnp = pytest.importorskip("jax.numpy")
    return DenseOperator(jnp.asarray(matrix, dtype=jnp.float32))


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("scale", [1e-25, 1e25])
def test_float32_results_do_not_depend_on_scale(scale, framework):
    A = make_symmetric(LAMBDA, seed=5)
    reference = _results(_float32(A, framework), 1.0)
    # float32 products differ by rounding (~1e-7 relative per entry); Krylov amplifies a little
    _compare(_results(_float32(A * scale, framework), scale), reference, rtol=2e-3, atol=2e-4)
