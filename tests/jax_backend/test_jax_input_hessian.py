"""jax_backend.input_hessian: the Hessian in the inputs of one batch, against jax.hessian."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dualhess
from jax_backend import input_hessian


def rel(A, B):
    return float(jnp.linalg.norm(A - B) / jnp.linalg.norm(B))


def _cnn():
    rng = np.random.default_rng(0)
    params = {
        "conv": 0.5 * rng.standard_normal((2, 1, 3, 3)),
        "w": rng.standard_normal((2 * 4 * 4, 3)),
        "b": rng.standard_normal(3),
    }

    def apply(p, x):
        h = jax.lax.conv_general_dilated(
            x, p["conv"], (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")
        )
        h = jax.lax.reduce_window(jnp.tanh(h), 0.0, jax.lax.add, (1, 1, 2, 2), (1, 1, 2, 2),
                                  "VALID") / 4
        return h.reshape(h.shape[0], -1) @ p["w"] + p["b"]

    def loss_fn(p, batch):
        x, y = batch
        logits = apply(p, x)
        picked = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
        return jnp.mean(jax.nn.logsumexp(logits, axis=1) - picked)

    x = rng.standard_normal((3, 1, 8, 8))
    y = np.array([0, 2, 1], dtype=np.int32)
    return params, loss_fn, x, y


def test_cnn_batch_matches_jax_hessian():
    params, loss_fn, x, y = _cnn()
    op = input_hessian(loss_fn, params, (x, y), dtype=jnp.float64)
    assert op.layout.names == ["0"] and op.n == x.size  # the integer labels stay constants
    H = jax.hessian(lambda v: loss_fn(params, (v.reshape(x.shape), y)))(jnp.asarray(x).ravel())
    err = rel(op.to_dense(), H)
    print(f"JAX input Hessian of a CNN batch (3 x 1 x 8 x 8): rel err {err:.2e}")
    assert err <= 1e-10
    top = dualhess.eigsh(op, k=1, seed=0)
    exact = float(jnp.linalg.eigvalsh(H)[-1])
    assert abs(top.values[0] - exact) <= 1e-8 * abs(exact)
    with pytest.raises(TypeError, match="integer arrays"):
        input_hessian(loss_fn, params, (x, y), wrt="1")


def test_dict_batch_with_leaves_of_different_lengths():
    """A physics-style batch: collocation and boundary points differ in number."""
    w = jnp.array([0.7, -1.3, 0.4])

    def loss_fn(p, batch):
        u = jnp.tanh(batch["interior"] * p[0] + p[1]) * p[2]
        ub = jnp.tanh(batch["boundary"] * p[0] + p[1]) * p[2]
        return jnp.mean(u**2 * batch["interior"]) + jnp.mean(ub**4)

    batch = {"interior": np.linspace(0.1, 0.9, 5), "boundary": np.array([0.0, 1.0])}
    op = input_hessian(loss_fn, w, batch)
    assert op.layout.names == ["boundary", "interior"]  # ravel order of a dict: sorted keys

    def flat_loss(v):
        return loss_fn(w, {"boundary": v[:2], "interior": v[2:]})

    v0 = jnp.concatenate([jnp.asarray(batch["boundary"]), jnp.asarray(batch["interior"])])
    assert rel(op.to_dense(), jax.hessian(flat_loss)(v0)) <= 1e-10
    only = input_hessian(loss_fn, w, batch, wrt=["interior"])
    assert only.layout.names == ["interior"] and only.n == 5


def test_token_ids_cannot_be_differentiated():
    table = jnp.ones((5, 2))
    with pytest.raises(TypeError, match="no floating-point array"):
        input_hessian(lambda t, b: jnp.sum(t[b["ids"]] ** 2), table,
                      {"ids": np.array([1, 3], np.int32)})
