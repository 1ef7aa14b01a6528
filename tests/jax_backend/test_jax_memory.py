"""chunk_size="auto" for JAX operators: XLA's memory analysis and free memory decide."""

from __future__ import annotations

import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import jax_backend  # noqa: E402

jh = sys.modules["jax_backend._hessian"]  # the module (the package exports the function)


def test_auto_chunk_for_jax():
    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    op = jax_backend.hessian(lambda w, b: jnp.mean(jnp.tanh(b @ w) ** 2),
                             jnp.ones((8, 4), jnp.float32), x, chunk_size="auto")
    assert op.chunk_size == op.n  # a tiny problem: every column fits
    assert jax.devices()


@pytest.mark.parametrize("num_batches", [1, 4])
def test_auto_chunk_for_jax_shrinks_with_free_memory(monkeypatch, num_batches):
    """One batch (the kept linearisation, measured as its tangent pass) and several batches
    (the recomputing product): the chunk follows free memory and products stay exact."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 16)).astype(np.float32)
    batches = x if num_batches == 1 else np.split(x, num_batches)
    w = jnp.asarray(rng.standard_normal((16, 8)).astype(np.float32) * 0.3)

    def loss(p, b):
        return jnp.mean(jnp.tanh(b @ p) ** 2)

    op = jh.hessian(loss, w, batches)
    vector = op.n * 4
    monkeypatch.setattr(jh, "_free_device_memory", lambda: 400 * vector)
    small = op.auto_chunk_size()
    monkeypatch.setattr(jh, "_free_device_memory", lambda: 10**12)
    large = op.auto_chunk_size()
    assert 1 <= small < large == op.n
    assert small <= 80  # >= 4 vectors per column: 80% of 400 vectors is at most 80 columns
    assert (op._linearization() is not None) == (num_batches == 1)
    monkeypatch.setattr(jh, "_free_device_memory", lambda: 0)
    assert op.auto_chunk_size() == 1
    V = jnp.asarray(rng.standard_normal((op.n, 5)).astype(np.float32))
    op.chunk_size = small
    dense = np.asarray(jax_backend.dense_hessian(loss, w, batches))
    np.testing.assert_allclose(np.asarray(op.matmat(V)), dense @ np.asarray(V), rtol=2e-4,
                               atol=2e-5)
