"""Bad input to the JAX backend gives clear errors at construction, never NaN or float32.

Tests marked ``errors_table`` are rows of ``docs/errors.md`` (see tests/docs/test_errors_table.py).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _jax_helpers import cross_entropy

import dualhess
from jax_backend import dense_hessian, from_linen, from_nnx, ggn, hessian

errors_table = pytest.mark.errors_table


def linear_loss(params, batch):
    x, y = batch
    return jnp.mean((x @ params["w"] - y) ** 2)


@pytest.fixture()
def setup():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((12, 3)), rng.standard_normal(12)
    return {"w": rng.standard_normal(3)}, x, y


@errors_table
def test_non_scalar_loss(setup):
    params, x, y = setup
    with pytest.raises(ValueError, match=r"must return a scalar .*got shape \(12,\)"):
        hessian(lambda p, b: (b[0] @ p["w"] - b[1]) ** 2, params, (x, y))
    with pytest.raises(ValueError, match="auxiliary"):
        hessian(lambda p, b: (linear_loss(p, b), 0.0), params, (x, y))


@errors_table
def test_adapter_loss_with_wrong_leading_dimension(setup):
    params, x, y = setup
    with pytest.raises(ValueError, match="batch_size=12"):
        ggn(lambda p, inputs: inputs @ p["w"], lambda o, t: (o - t)[:3] ** 2, params, (x, y))


@errors_table
def test_nan_parameters(setup):
    params, x, y = setup
    params["w"][1] = np.nan
    with pytest.raises(ValueError, match=r"NaN or Inf: \['w'\]"):
        hessian(linear_loss, params, (x, y))


@errors_table
def test_nan_data(setup):
    params, x, y = setup
    x[3, 0] = np.inf
    with pytest.raises(ValueError, match="batch 0 contains NaN or Inf"):
        hessian(linear_loss, params, (x, y))


@errors_table
def test_batch_structure_differs_from_first(setup):
    params, x, y = setup
    batches = [(x[:6], y[:6]), {"x": x[6:], "y": y[6:]}]
    with pytest.raises(ValueError, match="batch 1 has pytree structure"):
        hessian(linear_loss, params, batches)
    with pytest.raises(ValueError, match="per-sample shape"):
        hessian(linear_loss, params, [(x[:6], y[:6]), (x[6:, :2], y[6:])])


@errors_table
def test_inconsistent_batch_dimension_hints_at_lists(setup):
    params, x, y = setup
    with pytest.raises(ValueError, match="pass a list for several batches"):
        hessian(linear_loss, params, (x, y[:5]))


@errors_table
def test_empty_data(setup):
    params, x, y = setup
    with pytest.raises(ValueError, match="data holds no batches"):
        hessian(linear_loss, params, [])
    with pytest.raises(ValueError, match="batch 0 is empty"):
        hessian(linear_loss, params, (x[:0], y[:0]))


@errors_table
def test_non_floating_parameters(setup):
    params, x, y = setup
    with pytest.raises(TypeError, match="curvature needs floating-point parameters"):
        hessian(linear_loss, {"w": np.arange(3)}, (x, y))
    with pytest.raises(TypeError, match="floating"):
        hessian(linear_loss, params, (x, y), dtype=jnp.int32)


@errors_table
def test_class_labels_out_of_range(setup):
    """optax's gather fills out-of-range labels with NaN: now the NaN loss is refused."""
    _, x, _ = setup
    labels = np.full(12, 7)
    with pytest.raises(ValueError, match="integer class labels for values outside"):
        ggn(lambda p, inputs: inputs @ p, cross_entropy, np.zeros((3, 5)), (x, labels))


@errors_table
def test_linen_batchnorm_in_train_mode(setup):
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            return nn.Dense(2)(nn.BatchNorm(use_running_average=not train)(x))

    _, x, _ = setup
    variables = Net().init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="did not run in inference mode"):
        from_linen(
            Net(), variables, cross_entropy, (x, np.arange(12) % 2), apply_kwargs={"train": True}
        )


@errors_table
def test_dense_hessian_refuses_large_models(setup):
    _, x, y = setup
    with pytest.raises(dualhess.OperatorError, match="refuses n=3000"):
        dense_hessian(linear_loss, {"w": np.zeros(3000)}, (np.zeros((2, 3000)), np.zeros(2)))


def test_adapters_reject_bad_models(setup):
    params, x, y = setup
    with pytest.raises(ValueError, match="'params' collection"):
        from_linen(object(), {"batch_stats": {}}, cross_entropy, (x, y))
    with pytest.raises(TypeError, match="nnx.Module"):
        from_nnx(object(), cross_entropy, (x, y))
    with pytest.raises(ValueError, match="curvature"):
        from_nnx(_tiny_nnx(), cross_entropy, (x, y), curvature="fisher")


def _tiny_nnx():
    from flax import nnx

    return nnx.Linear(3, 2, rngs=nnx.Rngs(0))


@errors_table
def test_float64_without_x64_is_an_error_never_silent_float32():
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from jax_backend import hessian
        assert not jax.config.read("jax_enable_x64")
        loss = lambda p, x: jnp.mean((x @ p) ** 2)
        x32 = np.ones((4, 3), np.float32)
        for params, kwargs in [(np.ones(3, np.float32), {"dtype": jnp.float64}),
                               (np.ones(3, np.float64), {})]:
            try:
                hessian(loss, params, x32, **kwargs)
            except TypeError as err:
                assert "jax_enable_x64" in str(err), err
                print("refused")
            else:
                print("accepted")
        op = hessian(loss, np.ones(3, np.float64), x32, dtype=jnp.float32)  # explicit: fine
        print(op.dtype)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "JAX_ENABLE_X64": "0", "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["refused", "refused", "float32"]


@errors_table
def test_nan_loss_is_refused_at_construction(setup):
    """Issue 13, point 3: log(loss - 1e9) is NaN on the data; eigsh returned -3.5e-10."""
    params, x, y = setup

    def bad_loss(p, batch):
        return jnp.log(linear_loss(p, batch) - 1e9)

    with pytest.raises(ValueError, match="hessian: the loss is nan on the data"):
        hessian(bad_loss, params, (x, y))
    with pytest.raises(ValueError, match="ggn: the loss is nan on the data"):
        ggn(
            lambda p, inputs: inputs @ p["w"], lambda o, t: jnp.log(-jnp.mean(o**2)), params, (x, y)
        )


@errors_table
def test_inf_loss_is_refused_at_construction(setup):
    params, x, y = setup
    with pytest.raises(ValueError, match="the loss is inf on the data"):
        hessian(lambda p, b: -jnp.log(0.0 * linear_loss(p, b)), params, (x, y))


def _noisy_loss(params, batch):
    x, y = batch
    noise = jax.random.normal(jax.random.key(0), y.shape)  # a fixed key: one fixed draw
    return jnp.mean((x @ params["w"] + 0.1 * noise - y) ** 2)


@errors_table
def test_loss_with_a_prng_key_is_refused_unless_asked(setup):
    """Issue 13, point 5 (JAX): a loss that draws random numbers is one random draw."""
    params, x, y = setup
    with pytest.raises(ValueError, match="draws random numbers.*check_deterministic=False"):
        hessian(_noisy_loss, params, (x, y))
    op = hessian(_noisy_loss, params, (x, y), check_deterministic=False)
    assert op.n == 3


@errors_table
def test_linen_dropout_with_rngs_is_refused(setup):
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            return nn.Dense(2)(nn.Dropout(0.5, deterministic=not train)(x))

    _, x, _ = setup
    y = np.arange(12) % 2
    variables = Net().init(jax.random.key(0), x)
    kwargs = {"train": True, "rngs": {"dropout": jax.random.key(1)}}
    with pytest.raises(ValueError, match="draws random numbers"):
        from_linen(Net(), variables, cross_entropy, (x, y), apply_kwargs=kwargs)


@errors_table
def test_nnx_model_drawing_noise_in_call_is_refused(setup):
    from flax import nnx

    class Noisy(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(3, 2, rngs=rngs)
            self.rngs = rngs

        def __call__(self, x):
            return self.linear(x + 0.1 * jax.random.normal(self.rngs.noise(), x.shape))

    _, x, _ = setup
    y = np.arange(12) % 2
    with pytest.raises(ValueError, match="from_nnx: the model draws random numbers in __call__"):
        from_nnx(Noisy(nnx.Rngs(0, noise=1)), cross_entropy, (x, y))
