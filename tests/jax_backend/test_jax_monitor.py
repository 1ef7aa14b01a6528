"""The JAX monitor on a short optax digits run: logged values equal from-scratch ones."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
pytest.importorskip("sklearn")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

from dualhess._trace import trace  # noqa: E402
from jax_backend import hessian  # noqa: E402
from jax_backend.monitor import HessianMonitor  # noqa: E402

pytestmark = pytest.mark.jax


def test_jax_monitor_matches_from_scratch():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x, t = bunch.data[:48] / 16.0, bunch.target[:48]

    def loss_fn(p, batch):
        inputs, targets = batch
        logits = jnp.tanh(inputs @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))

    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.uniform(-0.125, 0.125, (64, 3))), "b1": jnp.zeros(3),
              "w2": jnp.asarray(rng.uniform(-0.5, 0.5, (3, 10))), "b2": jnp.zeros(10)}
    tol = 1e-6
    monitor = HessianMonitor(loss_fn, (x, t), every=3, tol=tol, trace_matvecs=6, seed=2)
    opt = optax.sgd(0.5)
    state = opt.init(params)
    snapshots = {}
    for step in range(4):
        if monitor.step(step, params) is not None:
            snapshots[step] = params
        grads = jax.grad(loss_fn)(params, (x, t))
        updates, state = opt.update(grads, state)
        params = optax.apply_updates(params, updates)
    assert monitor.steps == [0, 3] == sorted(snapshots)
    assert [r["warm_started"] for r in monitor.history] == [False, True]
    for record in monitor.history:
        op = hessian(loss_fn, snapshots[record["step"]], (x, t))
        exact = np.linalg.eigvalsh(np.asarray(op.to_dense()))[-1]
        assert record["top_converged"]
        assert abs(record["top_eigenvalue"] - exact) <= tol * abs(record["top_eigenvalue"])
        again = trace(op, method="hutchinson", num_matvecs=6,
                      seed=monitor.tracker.trace_rng(record["step"]))
        assert record["trace"] == again.value
