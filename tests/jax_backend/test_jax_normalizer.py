"""The loss's normaliser (issue 23): masked-token and class-weighted means over several batches.

The whole-data-set loss is ``sum_b sum_i l_bi / sum_b m_b``; the multi-batch operators must
equal ``jax.hessian`` of that loss evaluated on all the data at once, to 1e-12 in float64, and
the old weighting (``n_b / N``, a mean of batch means) must be measurably wrong on the same
data, so no test below can pass vacuously.
"""

from __future__ import annotations

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _jax_helpers import relative_error, run_on_four_devices
from jax.flatten_util import ravel_pytree

import dualhess
from jax_backend import dense_hessian, from_linen, from_nnx, ggn, hessian
from jax_backend.monitor import HessianMonitor

errors_table = pytest.mark.errors_table
IGNORE = -100
CLASS_WEIGHTS = np.array([0.2, 1.0, 3.0])


def make_data(seed: int = 0):
    """Four batches (5, 5, 5 and 3 tokens: two groups) with 4, 1, 5 and 2 kept labels."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((18, 3))
    y = rng.integers(0, 3, 18)
    masked = np.zeros(18, dtype=bool)
    masked[[0, 5, 6, 7, 8, 15]] = True  # batch 0 keeps 4, batch 1 keeps 1, batch 3 keeps 2
    y = np.where(masked, IGNORE, y)
    bounds = [(0, 5), (5, 10), (10, 15), (15, 18)]
    return x, y, [(x[a:b], y[a:b]) for a, b in bounds]


def make_params(seed: int = 1):
    rng = np.random.default_rng(seed)
    return {
        "w1": jnp.asarray(rng.standard_normal((3, 4))),
        "b1": jnp.asarray(0.1 * rng.standard_normal(4)),
        "w2": jnp.asarray(rng.standard_normal((4, 3))),
    }


def forward(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def token_ce(logits, y):
    """Per-token cross-entropy, 0 where the label is ignored, and the kept mask."""
    keep = y != IGNORE
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(keep, y, 0))
    return jnp.where(keep, ce, 0.0), keep


# the losses, each as a mean (with normalizer=) and as (sum, normalizer)
def masked_mean(p, batch):
    ce, keep = token_ce(forward(p, batch[0]), batch[1])
    return jnp.sum(ce) / jnp.sum(keep)


def masked_pair(p, batch):
    ce, keep = token_ce(forward(p, batch[0]), batch[1])
    return jnp.sum(ce), jnp.sum(keep)


def kept(batch):
    return int(np.sum(np.asarray(batch[1]) != IGNORE))


def class_weight_terms(logits, y):
    c = jnp.asarray(CLASS_WEIGHTS)[y]
    return c * optax.softmax_cross_entropy_with_integer_labels(logits, y), c


def weighted_mean(p, batch):
    terms, c = class_weight_terms(forward(p, batch[0]), batch[1])
    return jnp.sum(terms) / jnp.sum(c)


def weighted_pair(p, batch):
    terms, c = class_weight_terms(forward(p, batch[0]), batch[1])
    return jnp.sum(terms), jnp.sum(c)


def weight_sum(batch):
    return float(np.sum(CLASS_WEIGHTS[np.asarray(batch[1])]))


def class_weighted_data(seed: int = 2):
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((18, 3)), rng.integers(0, 3, 18)
    return x, y, [(x[a:b], y[a:b]) for a, b in [(0, 5), (5, 10), (10, 15), (15, 18)]]


def reference(whole_loss, params, x, y):
    """``jax.hessian`` of the whole-data-set loss, all data in one batch."""
    flat, unravel = ravel_pytree(params)
    return np.asarray(jax.hessian(lambda f: whole_loss(unravel(f), (x, y)))(flat))


CASES = {
    "masked_pair": (make_data, masked_pair, None, masked_mean),
    "masked_normalizer": (make_data, masked_mean, kept, masked_mean),
    "class_weighted_pair": (class_weighted_data, weighted_pair, None, weighted_mean),
    "class_weighted_normalizer": (class_weighted_data, weighted_mean, weight_sum, weighted_mean),
}


@pytest.mark.parametrize("case", list(CASES))
def test_multi_batch_hessian_equals_the_whole_data_set_hessian(case):
    data, loss_fn, normalizer, whole = CASES[case]
    x, y, batches = data()
    params = make_params()
    expected = reference(whole, params, x, y)
    op = hessian(loss_fn, params, batches, normalizer=normalizer)
    assert len(op.dataset.groups) == 2 and op.dataset.num_batches == 4  # scans with weights
    got = np.asarray(op.to_dense())
    error = relative_error(got, expected)
    print(f"{case}: relative error of the 4-batch operator vs jax.hessian: {error:.2e}")
    assert error <= 1e-12
    # the old weighting n_b / N of the batch means is measurably wrong on these data
    mean_loss = masked_mean if whole is masked_mean else weighted_mean
    naive = np.asarray(hessian(mean_loss, params, batches).to_dense())
    naive_error = relative_error(naive, expected)
    print(f"{case}: relative error of the old n_b/N weighting: {naive_error:.2e}")
    assert naive_error > 1e-2
    # the loss and its gradient follow the same normaliser
    flat, unravel = ravel_pytree(params)
    assert op.loss_at(jnp.zeros(op.n)) == pytest.approx(float(whole(params, (x, y))), rel=1e-13)
    grad = jax.grad(lambda f: whole(unravel(f), (x, y)))(flat)
    assert relative_error(op.gradient(), grad) <= 1e-12
    np.testing.assert_allclose(
        np.asarray(dense_hessian(loss_fn, params, batches, normalizer=normalizer)),
        expected, rtol=0, atol=1e-12 * np.abs(expected).max(),
    )


def test_dataset_exposes_the_normalizers():
    _, _, batches = make_data()
    op = hessian(masked_pair, make_params(), batches)
    assert op.dataset.normalizers == (4.0, 1.0, 5.0, 2.0)
    assert op.dataset.total_normalizer == 12.0
    assert op.dataset.summed is True
    np.testing.assert_allclose(op.dataset.weights, [1 / 12] * 4, rtol=1e-15)
    mean_op = hessian(masked_mean, make_params(), batches, normalizer=kept)
    np.testing.assert_allclose(mean_op.dataset.weights, np.array([4, 1, 5, 2]) / 12, rtol=1e-15)
    default = hessian(masked_mean, make_params(), batches)
    assert default.dataset.normalizers == (5.0, 5.0, 5.0, 3.0)  # batch sizes, as before


@errors_table
def test_masked_token_mean_over_batches_is_the_whole_data_set_loss():
    """Labels masked with -100 (the Hugging Face convention), as (sum, normalizer)."""
    x, y, batches = make_data()
    params = make_params()
    expected = reference(masked_mean, params, x, y)
    op = hessian(masked_pair, params, batches)
    assert relative_error(op.to_dense(), expected) <= 1e-12
    old = hessian(masked_mean, params, batches)  # the weighting n_b / N of before
    assert relative_error(old.to_dense(), expected) > 1e-2


@errors_table
def test_class_weighted_mean_over_batches_with_normalizer():
    x, y, batches = class_weighted_data()
    params = make_params()
    expected = reference(weighted_mean, params, x, y)
    op = hessian(weighted_mean, params, batches, normalizer=weight_sum)
    assert relative_error(op.to_dense(), expected) <= 1e-12
    assert relative_error(hessian(weighted_mean, params, batches).to_dense(), expected) > 1e-2


@errors_table
def test_batch_with_every_label_masked_contributes_nothing():
    x, y, batches = make_data()
    x_all, y_all = np.concatenate([x, x[:5]]), np.concatenate([y, np.full(5, IGNORE)])
    batches = batches + [(x[:5], np.full(5, IGNORE))]  # normaliser 0: its mean is 0/0
    params = make_params()
    expected = reference(masked_mean, params, x_all, y_all)
    for op in (
        hessian(masked_mean, params, batches, normalizer=kept),
        hessian(masked_pair, params, batches),
    ):
        got = np.asarray(op.to_dense())
        assert np.all(np.isfinite(got)) and np.isfinite(op.loss_value)
        assert relative_error(got, expected) <= 1e-12
        assert op.dataset.normalizers[-1] == 0.0


def ggn_reference(params, x, y, whole_loss_of_logits):
    flat, unravel = ravel_pytree(params)
    jac = jax.jacobian(lambda f: forward(unravel(f), x))(flat).reshape(-1, flat.size)
    logits = forward(params, x)
    h = jax.hessian(lambda z: whole_loss_of_logits(z.reshape(logits.shape)))(logits.ravel())
    return np.asarray(jac.T @ h @ jac)


@pytest.mark.parametrize("form", ["pair", "normalizer"])
def test_ggn_follows_the_normalizer(form):
    x, y, batches = make_data()
    params = make_params()

    def whole(z):
        ce, keep = token_ce(z, y)
        return jnp.sum(ce) / jnp.sum(keep)

    expected = ggn_reference(params, x, y, whole)

    def pair(outputs, targets):
        ce, keep = token_ce(outputs, targets)
        return jnp.sum(ce), jnp.sum(keep)

    def mean(outputs, targets):
        ce, keep = token_ce(outputs, targets)
        return jnp.sum(ce) / jnp.sum(keep)

    if form == "pair":
        op = ggn(forward, pair, params, batches)
    else:
        op = ggn(forward, mean, params, batches, normalizer=kept)
    error = relative_error(op.to_dense(), expected)
    print(f"ggn {form}: relative error vs J^T H J of the whole data set: {error:.2e}")
    assert error <= 1e-12
    assert relative_error(ggn(forward, mean, params, batches).to_dense(), expected) > 1e-2


def test_flax_adapters_follow_the_normalizer():
    import flax.linen as nn
    from flax import nnx

    x, y, batches = make_data()

    def pair(outputs, targets):
        ce, keep = token_ce(outputs, targets)
        return jnp.sum(ce), jnp.sum(keep)

    def mean(outputs, targets):
        ce, keep = token_ce(outputs, targets)
        return jnp.sum(ce) / jnp.sum(keep)

    module = nn.Dense(3, param_dtype=jnp.float64)
    variables = module.init(jax.random.key(0), x)
    expected = reference(lambda p, b: mean(module.apply({"params": p}, b[0]), b[1]),
                         variables["params"], x, y)
    for op in (
        from_linen(module, variables, pair, batches),
        from_linen(module, variables, mean, batches, normalizer=kept),
        from_linen(module, variables, pair, batches, curvature="ggn"),
    ):
        assert relative_error(op.to_dense(), expected) <= 1e-12  # linear model: GGN = Hessian

    model = nnx.Linear(3, 3, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)

    def whole(p, b):
        st = nnx.State(state)
        nnx.replace_by_pure_dict(st, p)
        return mean(nnx.merge(graphdef, st)(b[0]), b[1])

    expected = reference(whole, params, x, y)
    for op in (from_nnx(model, pair, batches), from_nnx(model, mean, batches, normalizer=kept)):
        assert relative_error(op.to_dense(), expected) <= 1e-12
    with pytest.raises(ValueError, match="must return a scalar"):
        from_nnx(model, lambda o, t: token_ce(o, t)[0], batches, normalizer=kept)


def test_monitor_with_a_pair_loss():
    x, y, batches = make_data()
    params = make_params()
    expected = np.linalg.eigvalsh(reference(masked_mean, params, x, y))[-1]
    monitor = HessianMonitor(masked_pair, batches, every=1, metrics=("top_eigenvalue",),
                             tol=1e-10)  # tol bounds the eigenvalue's error
    record = monitor.measure(0, params)
    assert record["top_eigenvalue"] == pytest.approx(expected, rel=1e-8)


@errors_table
def test_normalizer_that_depends_on_the_parameters_is_refused():
    _, _, batches = make_data()

    def bad(p, batch):
        ce, keep = token_ce(forward(p, batch[0]), batch[1])
        return jnp.sum(ce), jnp.sum(keep) + 0.0 * jnp.sum(p["w1"])

    with pytest.raises(dualhess.OperatorError, match="normalizer returned by the loss"):
        hessian(bad, make_params(), batches)


def test_bad_normalizers_are_refused():
    _, y, batches = make_data()
    params = make_params()
    with pytest.raises(ValueError, match="sum to 0"):
        hessian(masked_pair, params, [(b[0], np.full_like(b[1], IGNORE)) for b in batches])
    with pytest.raises(ValueError, match="finite number >= 0"):
        hessian(masked_mean, params, batches, normalizer=lambda b: -1.0)
    with pytest.raises(ValueError, match="normalizer= was passed too"):
        hessian(masked_pair, params, batches, normalizer=kept)
    with pytest.raises(ValueError, match="not a scalar number"):
        hessian(lambda p, b: (masked_mean(p, b), {"aux": 1.0}), params, batches)
    with pytest.raises(TypeError, match="normalizer must be a function"):
        hessian(masked_mean, params, batches, normalizer=3)


SHARDED = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp, numpy as np
    import test_jax_normalizer as t
    from jax_backend import hessian

    assert len(jax.devices()) == 4, jax.devices()
    x, y, batches = t.make_data()
    batches = [(np.concatenate([b[0]] * 4), np.concatenate([b[1]] * 4)) for b in batches]
    params = t.make_params()
    expected = t.reference(t.masked_mean, params, np.concatenate([b[0] for b in batches]),
                           np.concatenate([b[1] for b in batches]))
    for op in (hessian(t.masked_pair, params, batches, devices=jax.devices()),
               hessian(t.masked_mean, params, batches, normalizer=t.kept).shard()):
        assert op.mesh.devices.size == 4
        got = np.asarray(op.to_dense())
        err = np.linalg.norm(got - expected) / np.linalg.norm(expected)
        print("sharded relative error", err)
        assert err <= 1e-12, err
    print("OK")
    """
)


def test_normalizers_over_a_four_device_mesh():
    result = run_on_four_devices(SHARDED)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout
