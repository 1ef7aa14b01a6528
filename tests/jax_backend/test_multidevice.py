"""JAX multi-device: batches sharded over 4 forced host devices equal the single-device run."""

from __future__ import annotations

import textwrap

import pytest

pytest.importorskip("jax")

SCRIPT = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp, numpy as np
    import dualhess
    from jax_backend import hessian

    assert len(jax.devices()) == 4, jax.devices()
    rng = np.random.default_rng(0)
    X = rng.standard_normal((70, 5))
    y = rng.integers(0, 3, 70)
    params = {"w1": jnp.asarray(rng.standard_normal((5, 6)) * 0.5), "b1": jnp.zeros(6),
              "w2": jnp.asarray(rng.standard_normal((6, 3)) * 0.5)}

    def loss_fn(p, batch):
        x, t = batch
        logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, t[:, None], axis=1))

    batches = [(X[:32], y[:32]), (X[32:64], y[32:64]), (X[64:], y[64:])]  # 32, 32, 6
    single = hessian(loss_fn, params, batches)
    multi = hessian(loss_fn, params, batches, devices=jax.devices())
    sharded = [len(leaf.sharding.device_set) for g in multi.dataset.groups
               for leaf in jax.tree_util.tree_leaves(g)]
    assert max(sharded) == 4, sharded
    v = jnp.asarray(rng.standard_normal(single.n))
    a, b = np.asarray(single.matvec(v)), np.asarray(multi.matvec(v))
    assert np.linalg.norm(a - b) <= 1e-12 * np.linalg.norm(a), np.linalg.norm(a - b)
    V = jnp.asarray(rng.standard_normal((single.n, 5)))
    A, B = np.asarray(single.matmat(V)), np.asarray(multi.matmat(V))
    assert np.abs(A - B).max() <= 1e-12 * np.abs(A).max()
    e1, e2 = dualhess.eigsh(single, k=2, tol=1e-10, seed=0), dualhess.eigsh(multi, k=2, tol=1e-10, seed=0)
    np.testing.assert_allclose(e1.values, e2.values, rtol=1e-12)
    t1 = dualhess.trace(single, num_matvecs=30, seed=0).value
    t2 = dualhess.trace(multi, num_matvecs=30, seed=0).value
    assert abs(t1 - t2) <= 1e-12 * abs(t1), (t1, t2)
    d1 = dualhess.density(single, num_probes=2, num_steps=8, seed=0)
    d2 = dualhess.density(multi, num_probes=2, num_steps=8, seed=0)
    np.testing.assert_allclose(d1.nodes, d2.nodes, rtol=1e-10, atol=1e-12)

    # One batch: the kept linearisation, built on the mesh (sharded intermediates).
    one_single = hessian(loss_fn, params, (X[:64], y[:64]))
    one_multi = hessian(loss_fn, params, (X[:64], y[:64]), devices=jax.devices())
    A1, B1 = np.asarray(one_single.matmat(V)), np.asarray(one_multi.matmat(V))
    assert one_multi._linearization() is not None
    assert np.abs(A1 - B1).max() <= 1e-12 * np.abs(A1).max()
    full = np.asarray(hessian(loss_fn, params, [(X[:32], y[:32]), (X[32:64], y[32:64])]).matmat(V))
    assert np.abs(A1 - full).max() <= 1e-12 * np.abs(A1).max()  # = the recomputing product
    print("OK", sharded)
    """
)


def test_four_host_devices_equal_one():
    from _jax_helpers import run_on_four_devices

    proc = run_on_four_devices(SCRIPT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "OK" in proc.stdout
