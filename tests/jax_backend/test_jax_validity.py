"""Construction-time validity checks of the JAX operators (issue 23, jax_backend/_validity.py):
a loss constant in the parameters, the symmetry probe, batch statistics in Flax models.

Tests marked ``errors_table`` are rows of ``docs/errors.md`` (see tests/docs/test_errors_table.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dualhess
from jax_backend import from_linen, from_nnx, ggn, hessian
from jax_backend._validity import outputs_depending_on, symmetry_tolerance

errors_table = pytest.mark.errors_table


@pytest.fixture()
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((12, 3)), rng.standard_normal(12)


def ce(outputs, targets):
    return optax.softmax_cross_entropy_with_integer_labels(outputs, targets)


# ---------------------------------------------------------------- a loss constant in the params
@errors_table
def test_loss_with_stop_gradient_on_the_parameters_is_refused(data):
    def loss(p, batch):
        x, y = batch
        return jnp.mean((x @ jax.lax.stop_gradient(p["w"]) - y) ** 2)

    with pytest.raises(dualhess.OperatorError, match="no gradient in the selected parameters"):
        hessian(loss, {"w": jnp.ones(3)}, [data, data])


def test_constant_losses_are_refused_everywhere(data):
    x, y = data
    with pytest.raises(dualhess.OperatorError, match="no gradient"):
        hessian(lambda p, b: jnp.mean(b[1] ** 2), {"w": jnp.ones(3)}, data)  # params unused
    with pytest.raises(dualhess.OperatorError, match="no gradient"):  # inside a jitted loss
        hessian(jax.jit(lambda p, b: jnp.mean(b[0] @ jax.lax.stop_gradient(p))), jnp.ones(3), data)
    labels = (np.arange(12) % 2)
    with pytest.raises(dualhess.OperatorError, match="no gradient"):
        ggn(lambda p, xs: xs @ jax.lax.stop_gradient(p), ce, jnp.ones((3, 2)), (x, labels))


def test_stationary_point_and_linear_loss_are_accepted(data):
    """Zero gradient in value is not a constant loss: the minimum of a quadratic passes."""
    x, y = data
    w_star = np.linalg.lstsq(x, y, rcond=None)[0]

    def loss(w, batch):
        return jnp.mean((batch[0] @ w - batch[1]) ** 2)

    op = hessian(loss, jnp.asarray(w_star), data)
    assert float(jnp.linalg.norm(op.gradient())) < 1e-12
    np.testing.assert_allclose(np.asarray(op.to_dense()), 2 * x.T @ x / 12, rtol=1e-12)
    linear = hessian(lambda w, b: jnp.sum(w) * 2.0 + jnp.mean(b[1]), jnp.ones(3), data)
    np.testing.assert_array_equal(np.asarray(linear.to_dense()), np.zeros((3, 3)))


def test_dependence_analysis_follows_calls():
    inner = jax.jit(lambda a, b: (a + 1.0, b * 2.0))
    closed = jax.make_jaxpr(lambda a, b: inner(a, b))(1.0, 2.0)
    assert outputs_depending_on(closed, [True, False]) == [True, False]
    assert outputs_depending_on(closed, [False, True]) == [False, True]


# ---------------------------------------------------------------- the symmetry probe
@jax.custom_jvp
def bad_product(a, b):
    return a * b


@bad_product.defjvp
def _bad_product_jvp(primals, tangents):
    a, b = primals
    da, db = tangents
    # the true rule is b da + a db; 2 a db makes d/db of the gradient wrt a differ from
    # d/da of the gradient wrt b: the "Hessian" is [[0, 1], [2, 0]]
    return a * b, b * da + 2.0 * a * db


def asymmetric_loss(p, batch):
    return jnp.mean(bad_product(p[0], p[1]) * batch[:, 0]) + jnp.mean(p[2] ** 2 * batch[:, 1])


@errors_table
def test_custom_jvp_with_an_inconsistent_rule_is_refused_as_asymmetric():
    x = np.abs(np.random.default_rng(1).standard_normal((8, 2))) + 0.5
    params = jnp.asarray([0.3, -0.7, 1.1])
    with pytest.raises(dualhess.AsymmetricOperatorError, match="operator is not symmetric") as info:
        hessian(asymmetric_loss, params, x)
    assert isinstance(info.value, ValueError) and "custom_jvp" in str(info.value)
    op = hessian(asymmetric_loss, params, x, check_symmetric=False)  # skippable
    dense = np.asarray(op.to_dense())
    assert abs(dense[0, 1] - dense[1, 0]) > 0.1  # really asymmetric
    assert op.asymmetry is None


def test_symmetric_models_pass_the_probe_in_float64_and_float32(data):
    x, _ = data
    labels = np.arange(12) % 3
    rng = np.random.default_rng(3)
    params = {"w1": jnp.asarray(rng.standard_normal((3, 5))), "w2": jnp.asarray(rng.standard_normal((5, 3)))}

    def loss(p, batch):
        return jnp.mean(ce(jnp.tanh(batch[0] @ p["w1"]) @ p["w2"], batch[1]))

    for dtype in (jnp.float64, jnp.float32):
        op = hessian(loss, params, [(x[:5], labels[:5]), (x[5:], labels[5:])], dtype=dtype)
        assert op.asymmetry is not None
        assert op.asymmetry <= symmetry_tolerance(op.n, dtype)
        print(dtype.__name__ if hasattr(dtype, "__name__") else dtype, "asymmetry", op.asymmetry)
    assert op.num_matvecs == 0  # the probe's products are not counted as the user's
    assert symmetry_tolerance(10**4, np.float64) == pytest.approx(100 * 2.220446e-16 * 100)
    assert symmetry_tolerance(10**12, jnp.bfloat16) == 0.5


# ---------------------------------------------------------------- batch statistics (Flax)
def _nnx_net(dropout: bool = False):
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(3, 4, param_dtype=jnp.float64, rngs=rngs)
            self.bn = nnx.BatchNorm(4, param_dtype=jnp.float64, rngs=rngs)
            self.drop = nnx.Dropout(0.5 if dropout else 0.0, rngs=rngs)
            self.head = nnx.Linear(4, 2, param_dtype=jnp.float64, rngs=rngs)

        def __call__(self, x):
            return self.head(self.drop(jnp.tanh(self.bn(self.dense(x)))))

    return Net(nnx.Rngs(0))


@errors_table
def test_nnx_batchnorm_in_train_mode_is_refused(data):
    x, _ = data
    labels = np.arange(12) % 2
    model = _nnx_net()  # nnx modules start in train mode
    with pytest.raises(dualhess.OperatorError, match=r"BatchNorm layers in train mode \(bn\)"):
        from_nnx(model, ce, (x, labels))
    assert model.bn.use_running_average is False  # the user's model is left as it was
    model.eval()
    op = from_nnx(model, ce, (x, labels))
    assert op.n == 3 * 4 + 4 + 4 + 4 + 4 * 2 + 2


@errors_table
def test_nnx_dropout_in_train_mode_is_refused(data):
    x, _ = data
    model = _nnx_net(dropout=True)
    model.bn.use_running_average = True  # only the dropout is in train mode
    with pytest.raises(dualhess.OperatorError, match=r"Dropout layers in train mode \(drop\)"):
        from_nnx(model, ce, (x, np.arange(12) % 2))
    model.eval()
    from_nnx(model, ce, (x, np.arange(12) % 2))


@errors_table
def test_linen_batchnorm_on_batch_statistics_is_refused_naming_it(data):
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(nn.BatchNorm(use_running_average=False, name="norm")(x))

    x, _ = data
    variables = Net().init(jax.random.key(0), x)
    with pytest.raises(dualhess.OperatorError, match="'norm' normalises with the batch's statistics"):
        from_linen(Net(), variables, ce, (x, np.arange(12) % 2))
    with pytest.raises(ValueError, match="reads a collection that variables lacks"):
        from_linen(Net(), {"params": variables["params"]}, ce, (x, np.arange(12) % 2))


def test_mixed_precision_loss_passes_the_probe(data):
    """A float64 operator whose loss rounds in float32 (a float32 softmax) is held to float32's
    rounding, not float64's (it was refused at 1.3e-9 before the probe read the trace)."""
    x, _ = data
    labels = np.arange(12) % 3
    w = jnp.asarray(np.random.default_rng(4).standard_normal((3, 3)))

    def loss(p, batch):
        z = (batch[0] @ p).astype(jnp.float32)
        return jnp.mean(ce(z, batch[1])).astype(jnp.float64)

    op = hessian(loss, w, (x, labels))
    assert op.dtype == jnp.float64 and op.asymmetry <= symmetry_tolerance(op.n, jnp.float32)
