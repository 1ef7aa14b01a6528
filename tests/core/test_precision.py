"""bfloat16 / float16 operators: products in 16 bits, Krylov arithmetic in float32, honest claims.

Tolerances. The unit roundoff of bfloat16 is u = 2^-8 = 3.9e-3 (float16: 2^-11 = 4.9e-4).
The 16-bit model is the float64 model with every weight, input and intermediate rounded
to relative u; for this two-layer MLP a product goes through a handful of roundings per
layer (forward, backward, second backward), so ``||H_16 - H|| <= c u ||H||`` with a modest
c, and by Weyl's inequality every eigenvalue moves by at most that. We take c = 4:
``|lambda_16 - lambda| <= 4 u lambda_max`` (1.6e-2 lambda_max in bfloat16). The same
bound holds for a trace estimate with the same probes, relative to the sum of the
absolute per-probe samples. Eigenvalues measured: within 1e-3 lambda_max.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import dualhess
from dualhess import NotConvergedWarning
from dualhess._array import to_numpy
from dualhess._precision import in_work_precision

UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11}
C = 4.0


def _torch_problem():
    torch = pytest.importorskip("torch")
    tb = pytest.importorskip("torch_backend")
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    X = torch.randn(64, 6, generator=gen)
    y = torch.randint(0, 4, (64,), generator=gen)
    loss = torch.nn.CrossEntropyLoss()

    def build(dtype):
        return tb.hessian(model, loss, (X, y), dtype=dtype)

    H = build(torch.float64).to_dense().numpy()
    return build, H


@pytest.fixture(scope="module")
def torch_problem():
    return _torch_problem()


def _torch_dtype(name):
    import torch

    return getattr(torch, name)


def _check_eigsh(op, H, name):
    u = UNIT_ROUNDOFF[name]
    exact = np.linalg.eigvalsh(H)[::-1]
    lam_max = exact[0]
    with pytest.warns(NotConvergedWarning, match=f"rounding of {name} products"):
        res = dualhess.eigsh(op, k=3, tol=1e-6, seed=0)
    assert res.precision == f"{name} products, float32 arithmetic"
    # the precision cannot reach 1e-6: never claimed, and the budget is not burnt on it
    assert not np.any(res.converged)
    assert res.num_matvecs < 60
    assert np.max(np.abs(res.values - exact[:3])) <= C * u * lam_max
    # Krylov coefficients are float32 or better: orthonormal vectors to float32 rounding
    Y = to_numpy(res.vectors).astype(np.float64)
    assert str(res.vectors.dtype).endswith("float32")
    assert np.linalg.norm(Y.T @ Y - np.eye(3)) <= 1e-5
    # residuals are honest: at least those of fresh 16-bit products of the returned vectors
    work = in_work_precision(op)
    fresh = to_numpy(work.matmat(work.asarray(Y))).astype(np.float64)
    fresh_res = np.linalg.norm(fresh - Y * res.values, axis=0)
    assert np.all(res.residuals >= fresh_res * (1 - 1e-12))
    # and they bound the distance to the exact operator's action up to the 16-bit error
    exact_res = np.linalg.norm(H @ Y - Y * res.values, axis=0)
    assert np.all(exact_res <= res.residuals + C * u * lam_max)
    # a tol the precision supports converges, with the same honesty
    loose = dualhess.eigsh(op, k=3, tol=C * u * 4, seed=0)
    assert np.all(loose.converged)
    assert np.max(np.abs(loose.values - exact[:3])) <= C * u * 4 * loose.values[0]
    loose = dualhess.eigsh(op, k=3, tol=C * u * 4, seed=0, criterion="residual")
    assert np.all(loose.converged) and np.all(loose.residuals <= C * u * 4 * loose.values[0])


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_torch_16bit_eigsh(torch_problem, name):
    build, H = torch_problem
    op = build(_torch_dtype(name))
    assert str(op.dtype).endswith(name)
    _check_eigsh(op, H, name)


def test_torch_bfloat16_trace_density_power(torch_problem):
    import torch

    build, H = torch_problem
    u = UNIT_ROUNDOFF["bfloat16"]
    op = build(torch.bfloat16)
    exact = np.linalg.eigvalsh(H)
    lam_max = exact[-1]
    est = dualhess.trace(op, num_matvecs=60, method="hutchinson", seed=1)
    ref = dualhess.trace(build(torch.float64), num_matvecs=60, method="hutchinson", seed=1)
    assert est.precision == "bfloat16 products, float32 arithmetic"
    assert ref.precision == "float64"
    scale = np.mean(np.abs(np.asarray(ref.samples)))
    assert abs(est.value - ref.value) <= C * u * scale
    den = dualhess.density(op, num_probes=2, num_steps=20, seed=0)
    assert den.precision == "bfloat16 products, float32 arithmetic"
    np.testing.assert_allclose(den.weights.sum(axis=1), 1.0, atol=1e-6)
    assert abs(den.nodes.max() - lam_max) <= C * u * lam_max
    tri = dualhess.lanczos(op, 10, seed=0)
    assert tri.precision == den.precision
    # power iteration: a relative change below u/2 is rounding, so tol=1e-3 is not claimed
    with pytest.warns(NotConvergedWarning, match="bfloat16"):
        weak = dualhess.power_iteration(op, k=1, tol=1e-3, max_iter=200, seed=0)
    assert not weak.converged[0] and weak.num_matvecs < 200
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotConvergedWarning)
        top = dualhess.power_iteration(op, k=1, tol=1e-2, max_iter=200, seed=0)
    assert top.converged[0] and top.precision == den.precision
    assert abs(top.values[0] - lam_max) <= C * u * lam_max + float(top.residuals[0])


def test_jax_bfloat16_params_eigsh():
    jax = pytest.importorskip("jax")
    jb = pytest.importorskip("jax_backend")
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 6))
    y = rng.integers(0, 4, 64)
    params = {
        "W1": rng.standard_normal((6, 16)) * 0.5,
        "b1": rng.standard_normal(16) * 0.1,
        "W2": rng.standard_normal((16, 4)) * 0.5,
    }

    def loss(p, batch):
        x, t = batch
        z = jnp.tanh(x @ p["W1"] + p["b1"]) @ p["W2"]
        logp = jax.nn.log_softmax(z.astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, t[:, None], axis=1))

    jax.config.update("jax_enable_x64", True)  # the float64 reference (as the suite does)
    ref = jb.hessian(loss, jax.tree.map(jnp.asarray, params), (jnp.asarray(X), jnp.asarray(y)))
    assert "float64" in str(ref.dtype)
    H = np.asarray(ref.to_dense(), dtype=np.float64)
    pb = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    op = jb.hessian(loss, pb, (jnp.asarray(X, jnp.bfloat16), jnp.asarray(y)))
    assert "bfloat16" in str(op.dtype)
    _check_eigsh(op, H, "bfloat16")


@pytest.mark.errors_table
def test_bfloat16_model_is_analysed_not_refused(torch_problem):
    """Was ``TypeError: Got unsupported ScalarType BFloat16``; now a warned, honest result."""
    import torch

    build, _ = torch_problem
    with pytest.warns(NotConvergedWarning, match="rounding of bfloat16 products"):
        res = dualhess.eigsh(build(torch.bfloat16), k=2, tol=1e-6, seed=0)
    assert not np.any(res.converged) and res.precision.startswith("bfloat16")
