"""Flax adapters against dense Hessians of hand-written forward passes (float64, digits).

Each reference re-implements the model's forward pass with jax.numpy / lax on the
parameter dict, so a mistake in the adapters (wrong collection, wrong order, training-mode
BatchNorm) shows up as a mismatch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _jax_helpers import batches_of, cross_entropy, mean_cross_entropy, relative_error
from flax import nnx
from jax.flatten_util import ravel_pytree

import dualhess
from jax_backend import from_linen, from_nnx, ggn
from jax_backend.examples import linen_model, nnx_model

F64 = jnp.float64
BN_EPS = 1e-5  # Flax's BatchNorm default


def dense_layer(p, x):
    return x @ p["kernel"] + p["bias"]


def conv_layer(p, x):
    out = jax.lax.conv_general_dilated(
        x, p["kernel"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return out + p["bias"]


def mlp_forward(first, second, norm=None, stats=None):
    def forward(p, x):
        h = dense_layer(p[first], x)
        if norm is not None:
            h = (h - stats["mean"]) / jnp.sqrt(stats["var"] + BN_EPS)
            h = h * p[norm]["scale"] + p[norm]["bias"]
        return dense_layer(p[second], jnp.tanh(h))

    return forward


def cnn_forward(conv, dense):
    def forward(p, x):
        h = jnp.tanh(conv_layer(p[conv], x))
        return dense_layer(p[dense], h.reshape(h.shape[0], -1))

    return forward


def reference_hessian(forward, params, x, y):
    """jax.hessian of the mean loss over all samples at once (one batch)."""
    flat, unravel = ravel_pytree(params)
    return flat, np.asarray(
        jax.jit(jax.hessian(lambda w: mean_cross_entropy(forward(unravel(w), x), y)))(flat)
    )


def reference_ggn(forward, params, x, y):
    """J^T H_L J with J = d outputs / d params and H_L = d^2 loss / d outputs^2 (dense)."""
    flat, unravel = ravel_pytree(params)
    outputs = forward(params, x)
    jac = jax.jit(jax.jacobian(lambda w: forward(unravel(w), x)))(flat)
    jac = jac.reshape(outputs.size, -1)
    h_out = jax.jit(jax.hessian(lambda o: mean_cross_entropy(o.reshape(outputs.shape), y)))(
        outputs.reshape(-1)
    )
    return np.asarray(jac.T @ h_out @ jac)


def pure_params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def check_operator(op, flat, dense, names):
    assert op.layout.names == names
    np.testing.assert_array_equal(np.asarray(op.params_flat), np.asarray(flat))
    for v in np.random.default_rng(0).standard_normal((2, op.n)):
        assert relative_error(op.matvec(op.asarray(v)), dense @ v) <= 1e-10


@pytest.fixture(scope="module")
def linen_mlp():
    return linen_model("mlp", param_dtype=F64)


@pytest.fixture(scope="module")
def nnx_cnn():
    return nnx_model("cnn", param_dtype=F64)


def test_linen_mlp_matches_dense_hessian(digits_flat, linen_mlp):
    x, y = digits_flat
    module, variables = linen_mlp
    flat, dense = reference_hessian(mlp_forward("Dense_0", "Dense_1"), variables["params"], x, y)
    op = from_linen(module, variables, cross_entropy, batches_of(x, y))
    names = [f"params.Dense_{i}.{leaf}" for i in (0, 1) for leaf in ("bias", "kernel")]
    check_operator(op, flat, dense, names)


def test_linen_cnn_matches_dense_hessian(digits_image):
    x, y = digits_image
    module, variables = linen_model("cnn", param_dtype=F64)
    flat, dense = reference_hessian(cnn_forward("Conv_0", "Dense_0"), variables["params"], x, y)
    op = from_linen(module, variables, cross_entropy, batches_of(x, y))
    names = ["params.Conv_0.bias", "params.Conv_0.kernel", "params.Dense_0.bias"]
    check_operator(op, flat, dense, [*names, "params.Dense_0.kernel"])


def test_nnx_mlp_matches_dense_hessian(digits_flat):
    x, y = digits_flat
    model = nnx_model("mlp", param_dtype=F64)
    params = pure_params(model)
    flat, dense = reference_hessian(mlp_forward("linear1", "linear2"), params, x, y)
    op = from_nnx(model, cross_entropy, batches_of(x, y))
    names = [f"linear{i}.{leaf}" for i in (1, 2) for leaf in ("bias", "kernel")]
    check_operator(op, flat, dense, names)


def test_nnx_cnn_matches_dense_hessian(digits_image, nnx_cnn):
    x, y = digits_image
    model = nnx_cnn
    flat, dense = reference_hessian(cnn_forward("conv", "linear"), pure_params(model), x, y)
    op = from_nnx(model, cross_entropy, batches_of(x, y))
    check_operator(op, flat, dense, ["conv.bias", "conv.kernel", "linear.bias", "linear.kernel"])


def test_linen_batchnorm_runs_in_inference_mode(digits_flat):
    x, y = digits_flat
    module, variables = linen_model("mlp", param_dtype=F64, batch_norm=True)
    _, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
    variables = {"params": variables["params"], **updates}  # non-trivial running statistics
    stats = variables["batch_stats"]["BatchNorm_0"]
    assert float(jnp.max(jnp.abs(stats["mean"]))) > 1e-3
    forward = mlp_forward("Dense_0", "Dense_1", norm="BatchNorm_0", stats=stats)
    flat, dense = reference_hessian(forward, variables["params"], x, y)
    op = from_linen(module, variables, cross_entropy, batches_of(x, y))  # train=False detected
    names = ["params.BatchNorm_0.bias", "params.BatchNorm_0.scale"]
    names += [f"params.Dense_{i}.{leaf}" for i in (0, 1) for leaf in ("bias", "kernel")]
    check_operator(op, flat, dense, names)
    explicit = from_linen(module, variables, cross_entropy, (x, y), apply_kwargs={"train": False})
    v = op.asarray(np.random.default_rng(1).standard_normal(op.n))
    assert relative_error(explicit.matvec(v), op.matvec(v)) <= 1e-12
    with pytest.raises(ValueError, match="apply_kwargs"):
        from_linen(module, variables, cross_entropy, (x, y), apply_kwargs={"train": True})


def test_nnx_batchnorm_eval_on_a_copy_leaves_the_model_alone(digits_flat):
    x, y = digits_flat
    model = nnx_model("mlp", param_dtype=F64, batch_norm=True)
    model.train()
    model(jnp.asarray(x))  # updates the running statistics (momentum 0.99)
    # issue 23: a train-mode model is refused (it was silently switched to eval), as in torch
    with pytest.raises(dualhess.OperatorError, match=r"train mode \(norm\).*Call model.eval\(\)"):
        from_nnx(model, cross_entropy, batches_of(x, y))
    model.eval()
    stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))["norm"]
    before = jax.tree_util.tree_map(np.array, nnx.to_pure_dict(nnx.state(model)))
    params = pure_params(model)
    forward = mlp_forward("linear1", "linear2", norm="norm", stats=stats)
    flat, dense = reference_hessian(forward, params, x, y)
    op = from_nnx(model, cross_entropy, batches_of(x, y))
    names = [f"linear{i}.{leaf}" for i in (1, 2) for leaf in ("bias", "kernel")]
    check_operator(op, flat, dense, [*names, "norm.bias", "norm.scale"])
    assert model.norm.use_running_average is True  # the mode the user set, untouched
    after = jax.tree_util.tree_map(np.array, nnx.to_pure_dict(nnx.state(model)))
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, after)


def test_linen_ggn_matches_dense_jt_hl_j(digits_flat, linen_mlp):
    x, y = digits_flat
    module, variables = linen_mlp
    dense = reference_ggn(mlp_forward("Dense_0", "Dense_1"), variables["params"], x, y)
    op = from_linen(module, variables, cross_entropy, batches_of(x, y), curvature="ggn")
    V = np.random.default_rng(2).standard_normal((op.n, 4))
    assert relative_error(op.matmat(op.asarray(V)), dense @ V) <= 1e-10
    assert np.linalg.eigvalsh(dense).min() >= -1e-12 * np.abs(dense).max()  # PSD reference


def test_ggn_on_pytree_matches_dense_jt_hl_j(digits_image, nnx_cnn):
    x, y = digits_image
    model = nnx_cnn
    params = pure_params(model)
    forward = cnn_forward("conv", "linear")
    dense = reference_ggn(forward, params, x, y)
    op = ggn(forward, mean_cross_entropy, params, batches_of(x, y), chunk_size=3)
    V = np.random.default_rng(3).standard_normal((op.n, 4))
    assert relative_error(op.matmat(op.asarray(V)), dense @ V) <= 1e-10
    # the nnx adapter gives the same GGN
    op_nnx = from_nnx(model, cross_entropy, (x, y), curvature="ggn")
    assert relative_error(op_nnx.matvec(op_nnx.asarray(V[:, 0])), dense @ V[:, 0]) <= 1e-10


# ---------------------------------------------------------------------- issue 13, point 2
def _float32_stats(features, seed=0):
    """Non-trivial BatchNorm statistics as Flax stores them: float32, whatever param_dtype."""
    rng = np.random.default_rng(seed)
    mean = jnp.asarray(rng.standard_normal(features), dtype=jnp.float32)
    var = jnp.asarray(rng.uniform(0.5, 2.0, features), dtype=jnp.float32)
    return mean, var


def _tiny_batch(seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((12, 3)), rng.integers(0, 3, 12)


@pytest.mark.errors_table
def test_linen_float32_batch_stats_follow_a_float64_analysis():
    """Dense -> BatchNorm(use_running_average=True) -> tanh -> Dense against jax.hessian with
    float64 statistics: float32 stats used as stored gave 4e-8 (float32 rounding of var + eps)."""
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(4, param_dtype=F64)(x)
            h = nn.BatchNorm(use_running_average=True, param_dtype=F64)(h)
            return nn.Dense(3, param_dtype=F64)(jnp.tanh(h))

    x, y = _tiny_batch()
    module = Net()
    variables = module.init(jax.random.key(0), x)
    mean, var = _float32_stats(4)
    variables = {
        "params": variables["params"],
        "batch_stats": {"BatchNorm_0": {"mean": mean, "var": var}},
    }
    stats64 = {"mean": mean.astype(F64), "var": var.astype(F64)}
    forward = mlp_forward("Dense_0", "Dense_1", norm="BatchNorm_0", stats=stats64)
    flat, dense = reference_hessian(forward, variables["params"], x, y)
    op = from_linen(module, variables, cross_entropy, (x, y))
    assert op.dtype == F64
    assert relative_error(op.to_dense(), dense) <= 1e-12
    assert variables["batch_stats"]["BatchNorm_0"]["mean"].dtype == jnp.float32  # not changed


@pytest.mark.errors_table
def test_nnx_float32_batch_stats_follow_a_float64_analysis():
    """nnx: BatchNorm's own float32 statistics and a custom float32 nnx.BatchStat (a running
    scale used as ``1 / sqrt(s + eps)``, which without the cast rounds in float32: 1e-8)."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.linear1 = nnx.Linear(3, 4, param_dtype=F64, rngs=rngs)
            self.norm = nnx.BatchNorm(4, use_running_average=True, param_dtype=F64, rngs=rngs)
            self.linear2 = nnx.Linear(4, 3, param_dtype=F64, rngs=rngs)
            self.running = nnx.BatchStat(jnp.asarray([0.3, 1.7, 0.9, 1.1], dtype=jnp.float32))

        def __call__(self, x):
            h = self.norm(self.linear1(x)) / jnp.sqrt(self.running.value + BN_EPS)
            return self.linear2(jnp.tanh(h))

    x, y = _tiny_batch()
    model = Net(nnx.Rngs(0))
    mean, var = _float32_stats(4)
    model.norm.mean.value, model.norm.var.value = mean, var
    running = model.running.value.astype(F64)
    stats64 = {"mean": mean.astype(F64), "var": var.astype(F64)}

    def forward(p, inputs):
        h = dense_layer(p["linear1"], inputs)
        h = (h - stats64["mean"]) / jnp.sqrt(stats64["var"] + BN_EPS)
        h = (h * p["norm"]["scale"] + p["norm"]["bias"]) / jnp.sqrt(running + BN_EPS)
        return dense_layer(p["linear2"], jnp.tanh(h))

    flat, dense = reference_hessian(forward, pure_params(model), x, y)
    op = from_nnx(model, cross_entropy, (x, y))
    assert op.dtype == F64
    assert relative_error(op.to_dense(), dense) <= 1e-12
    assert model.norm.mean.value.dtype == jnp.float32  # the user's model is not changed
    assert model.running.value.dtype == jnp.float32


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_per_layer_table_has_one_row_per_flax_layer(digits_flat, kind):
    # Layout names use PyTorch's "." separator, so grouping by layer sees layers, not tensors.
    from dualhess import per_layer_spectra

    x, y = digits_flat
    if kind == "linen":
        module, variables = linen_model("mlp", param_dtype=F64)
        op = from_linen(module, variables, cross_entropy, batches_of(x, y))
        expected = ["params.Dense_0", "params.Dense_1"]
    else:
        op = from_nnx(nnx_model("mlp", param_dtype=F64), cross_entropy, batches_of(x, y))
        expected = ["linear1", "linear2"]
    spectra = per_layer_spectra(op, include_total=False, trace_matvecs=4, seed=0)
    assert [layer.name for layer in spectra.layers] == expected
    assert all(len(layer.params) == 2 for layer in spectra.layers)  # kernel and bias together


def test_linen_ggn_of_a_per_element_loss_has_the_fisher_convention():
    """Issue 13, point 1 on the JAX side: a loss returning (N, C) per-element values is averaged
    over N*C, so the GGN is r sum_n J_n^T H_n J_n with l_n summed over its C outputs and
    r = 1/(N C) -- the same convention as torch's ggn and fisher (no 1/C slip)."""
    import flax.linen as nn
    import optax

    module = nn.Dense(4, param_dtype=F64)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((10, 3))
    y = (rng.random((10, 4)) > 0.5).astype(np.float64)
    variables = module.init(jax.random.key(0), x)
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    op = from_linen(module, variables, optax.sigmoid_binary_cross_entropy, batches, curvature="ggn")
    flat, unravel = ravel_pytree(variables["params"])

    def sample_nll(out, target):  # l_n: the whole Bernoulli NLL of one sample
        return jnp.sum(jax.nn.softplus(out) - target * out)

    def outputs(w, xi):
        return module.apply({"params": unravel(w)}, xi[None])[0]

    expected = 0
    for xi, yi in zip(x, y):
        J = jax.jacobian(outputs)(flat, xi)  # (C, n)
        H = jax.hessian(sample_nll)(outputs(flat, xi), yi)  # (C, C)
        expected = expected + J.T @ H @ J
    expected = np.asarray(expected) / (x.shape[0] * y.shape[1])
    assert relative_error(op.to_dense(), expected) <= 1e-12
