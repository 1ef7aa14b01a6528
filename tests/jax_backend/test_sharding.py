"""JAX parameters sharded over a device mesh (``param_sharding=``): equal to the unsharded operator.

The multi-device checks run in a subprocess with 4 forced host devices (the flag must be set
before jax starts, as in test_multidevice.py). Tests marked ``errors_table`` are rows of
``docs/errors.md`` (see tests/docs/test_errors_table.py).
"""

from __future__ import annotations

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _jax_helpers import run_on_four_devices
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import dualhess
from jax_backend import ParamShardingError, ggn, hessian, shard_largest_axis

errors_table = pytest.mark.errors_table

# Shared by the subprocess scripts: a two-layer MLP; n = 6*8 + 8 + 8*4 + 4 = 92 = 4 * 23.
MODEL = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import dualhess
    from jax_backend import ParamShardingError, from_linen, ggn, hessian, shard_largest_axis

    assert len(jax.devices()) == 4, jax.devices()
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 6))
    y = rng.integers(0, 4, 64)

    def mlp(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    def nll(logits, t):
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, t[:, None], axis=1))

    def loss_fn(p, batch):
        return nll(mlp(p, batch[0]), batch[1])

    def make_params(outputs):
        return {"w1": jnp.asarray(rng.standard_normal((6, 8)) * 0.5),
                "b1": jnp.asarray(rng.standard_normal(8) * 0.1),
                "w2": jnp.asarray(rng.standard_normal((8, outputs)) * 0.5),
                "b2": jnp.asarray(rng.standard_normal(outputs) * 0.1)}

    def rel(a, b):
        a, b = np.asarray(a), np.asarray(b)
        return float(np.abs(a - b).max() / np.abs(a).max())

    def per_device(arrays):
        # entries each device holds, summed over the arrays
        held = {}
        for arr in arrays:
            for shard in arr.addressable_shards:
                held[shard.device] = held.get(shard.device, 0) + shard.data.size
        return sorted(held.values())
    """
)

SCRIPT = MODEL + textwrap.dedent(
    """
    params = make_params(4)
    batches = [(X[:32], y[:32]), (X[32:], y[32:])]
    for data in (batches, (X, y)):  # several batches; one batch (the kept linearisation)
        single = hessian(loss_fn, params, data)
        sharded = hessian(loss_fn, params, data, param_sharding="largest_axis")
        n = single.n
        assert n == 92 and sharded.placement.vectors_split
        # every device holds a quarter of the parameters: the leaves and the flat copy
        assert per_device(jax.tree_util.tree_leaves(sharded.params)) == [n // 4] * 4
        assert per_device([sharded.params_flat]) == [n // 4] * 4
        specs = {e.name: tuple(s.spec) for e, s in
                 zip(sharded.layout, sharded.placement.leaf_shardings)}
        assert specs["w1"] == (None, "params") and specs["w2"] == ("params", None), specs

        v64 = rng.standard_normal(n)
        v = sharded.asarray(v64)  # made by the layout: already sharded
        assert v.sharding == sharded.placement.vector_sharding
        hv = sharded.matvec(v)
        assert hv.sharding == sharded.placement.vector_sharding, hv.sharding
        assert per_device([hv]) == [n // 4] * 4  # the product is not gathered
        assert rel(single.matvec(jnp.asarray(v64)), hv) <= 1e-12
        V64 = rng.standard_normal((n, 5))
        HV = sharded.matmat(sharded.asarray(V64))
        assert HV.sharding == sharded.placement.matrix_sharding
        assert per_device([HV]) == [5 * n // 4] * 4
        assert rel(single.matmat(jnp.asarray(V64)), HV) <= 1e-12
        # an unsharded input is placed by the layout
        assert rel(single.matvec(jnp.asarray(v64)), sharded.matvec(jnp.asarray(v64))) <= 1e-12

        e1 = dualhess.eigsh(single, k=2, tol=1e-10, seed=0)
        e2 = dualhess.eigsh(sharded, k=2, tol=1e-10, seed=0)
        np.testing.assert_allclose(e2.values, e1.values, rtol=1e-12)
        t1 = dualhess.trace(single, num_matvecs=20, seed=0).value
        t2 = dualhess.trace(sharded, num_matvecs=20, seed=0).value
        assert abs(t1 - t2) <= 1e-12 * abs(t1), (t1, t2)
        g = sharded.gradient()
        assert g.sharding == sharded.placement.vector_sharding
        assert rel(single.gradient(), g) <= 1e-12
        tree = sharded.unravel(hv)
        assert tree["w1"].sharding == sharded.placement.shardings["w1"]
        assert rel(sharded.ravel(tree), hv) == 0.0

    # An explicit NamedSharding pytree on a 2 x 2 mesh, and the GGN.
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    explicit = {"w1": NamedSharding(mesh, P("data", "model")), "b1": NamedSharding(mesh, P("model")),
                "w2": NamedSharding(mesh, P(("data", "model"))), "b2": NamedSharding(mesh, P())}
    g1 = ggn(mlp, nll, params, batches)
    g2 = ggn(mlp, nll, params, batches, param_sharding=explicit)
    assert g2.params["w1"].sharding == explicit["w1"]
    assert per_device([g2.params["w1"]]) == [12] * 4
    v64 = rng.standard_normal(g1.n)
    hv = g2.matvec(g2.asarray(v64))
    assert per_device([hv]) == [23] * 4
    assert rel(g1.matvec(jnp.asarray(v64)), hv) <= 1e-12
    np.testing.assert_allclose(dualhess.eigsh(g2, k=1, tol=1e-10, seed=0).values,
                               dualhess.eigsh(g1, k=1, tol=1e-10, seed=0).values, rtol=1e-12)

    # n = 83 is not a multiple of 4: flat vectors replicated, the leaves still split.
    odd, y3 = make_params(3), y % 3
    three = [(X[:32], y3[:32]), (X[32:], y3[32:])]
    single = hessian(loss_fn, odd, three)
    sharded = hessian(loss_fn, odd, three, param_sharding="largest_axis")
    assert single.n == 83 and not sharded.placement.vectors_split
    leaves = jax.tree_util.tree_leaves(sharded.params)
    assert per_device(leaves) == [(48 + 8 + 24) // 4 + 3] * 4  # b2 (3,) replicated
    v64 = rng.standard_normal(83)
    hv = sharded.matvec(sharded.asarray(v64))
    assert hv.sharding == sharded.placement.vector_sharding
    assert rel(single.matvec(jnp.asarray(v64)), hv) <= 1e-12
    np.testing.assert_allclose(dualhess.eigsh(sharded, k=1, tol=1e-10, seed=0).values,
                               dualhess.eigsh(single, k=1, tol=1e-10, seed=0).values, rtol=1e-12)

    # A Flax linen model, its kernels split.
    import flax.linen as nn

    model = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(4)])
    variables = model.init(jax.random.key(0), jnp.asarray(X[:2]))
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables)
    l1 = from_linen(model, variables, nll, batches)
    l2 = from_linen(model, variables, nll, batches, param_sharding="largest_axis")
    v64 = rng.standard_normal(l1.n)
    hv = l2.matvec(l2.asarray(v64))
    assert per_device([hv]) == [l1.n // 4] * 4
    assert rel(l1.matvec(jnp.asarray(v64)), hv) <= 1e-12
    print("OK")
    """
)


def test_sharded_parameters_on_four_devices_equal_the_unsharded_operator():
    proc = run_on_four_devices(SCRIPT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "OK" in proc.stdout


@errors_table
def test_param_sharding_that_does_not_divide_a_dimension_is_refused():
    script = MODEL + textwrap.dedent(
        """
        mesh = Mesh(np.array(jax.devices()), ("model",))
        params = make_params(3)
        bad = {k: NamedSharding(mesh, P()) for k in params}
        bad["b2"] = NamedSharding(mesh, P("model"))  # 3 entries over 4 devices
        try:
            hessian(loss_fn, params, (X, y % 3), param_sharding=bad)
        except ParamShardingError as err:
            print(err)
        """
    )
    proc = run_on_four_devices(script)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "splits axis 0 of 'b2' (shape (3,)) over 4 devices" in proc.stdout, proc.stdout
    assert "which does not divide 3" in proc.stdout
    assert "param_sharding='largest_axis'" in proc.stdout


# ---------------------------------------------------------------- one device, in process
def _setup():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((16, 3)), rng.standard_normal(16)
    params = {"w": jnp.asarray(rng.standard_normal((3, 4))), "v": jnp.asarray(rng.standard_normal(4))}

    def loss_fn(p, batch):
        inputs, targets = batch
        return jnp.mean((jnp.tanh(inputs @ p["w"]) @ p["v"] - targets) ** 2)

    return loss_fn, params, (x, y)


def _mesh(name: str = "model") -> Mesh:
    return Mesh(np.array(jax.devices()[:1]), (name,))


def test_largest_axis_on_one_device_equals_unsharded():
    loss_fn, params, data = _setup()
    single = hessian(loss_fn, params, data)
    sharded = hessian(loss_fn, params, data, param_sharding=_mesh())
    assert sharded.placement.vectors_split and sharded.placement.mesh.axis_names == ("model",)
    np.testing.assert_allclose(np.asarray(sharded.to_dense()), np.asarray(single.to_dense()),
                               rtol=1e-13, atol=1e-14)
    e1 = dualhess.eigsh(single, k=1, seed=0)
    e2 = dualhess.eigsh(sharded, k=1, seed=0)
    np.testing.assert_allclose(e2.values, e1.values, rtol=1e-12)


def test_shard_largest_axis_picks_the_largest_divisible_axis():
    mesh = _mesh()
    tree = shard_largest_axis({"a": jnp.zeros((2, 5)), "b": jnp.zeros(())}, mesh)
    assert tuple(tree["a"].spec) == (None, "model")
    assert tuple(tree["b"].spec) == ()
    with pytest.raises(ParamShardingError, match="are not axes of the mesh"):
        shard_largest_axis({"a": jnp.zeros(2)}, mesh, axis_names="data")


@errors_table
def test_param_sharding_that_does_not_match_the_params_pytree_is_refused():
    loss_fn, params, data = _setup()
    mesh = _mesh()
    wrong = {"w": NamedSharding(mesh, PartitionSpec()), "u": NamedSharding(mesh, PartitionSpec())}
    with pytest.raises(ParamShardingError) as info:
        hessian(loss_fn, params, data, param_sharding=wrong)
    message = str(info.value)
    assert "param_sharding does not match the parameters pytree" in message
    assert "no sharding for ['v']" in message and "shardings for unknown leaves ['u']" in message
    assert "param_sharding='largest_axis'" in message  # the fix


@errors_table
def test_param_sharding_leaf_that_is_not_a_named_sharding_is_refused():
    loss_fn, params, data = _setup()
    mesh = _mesh()
    wrong = {"w": NamedSharding(mesh, PartitionSpec()), "v": jax.devices()[0]}
    with pytest.raises(ParamShardingError, match="not a jax.sharding.NamedSharding"):
        ggn(lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"],
            lambda out, t: jnp.mean((out - t) ** 2), params, data, param_sharding=wrong)


@errors_table
def test_param_sharding_on_two_meshes_is_refused():
    loss_fn, params, data = _setup()
    two = {"w": NamedSharding(_mesh("a"), PartitionSpec()),
           "v": NamedSharding(_mesh("b"), PartitionSpec())}
    with pytest.raises(ParamShardingError, match="one operator's leaves share one Mesh"):
        hessian(loss_fn, params, data, param_sharding=two)


@errors_table
def test_param_sharding_with_more_entries_than_dimensions_is_refused():
    loss_fn, params, data = _setup()
    mesh = _mesh()
    wrong = {"w": NamedSharding(mesh, PartitionSpec()),
             "v": NamedSharding(mesh, PartitionSpec("model", None))}
    with pytest.raises(ParamShardingError, match=r"has 2 entries .* for a leaf of shape \(4,\)"):
        hessian(loss_fn, params, data, param_sharding=wrong)


@errors_table
def test_param_sharding_rule_with_an_unknown_name_is_refused():
    loss_fn, params, data = _setup()
    with pytest.raises(ParamShardingError, match="the one rule by name is 'largest_axis'"):
        hessian(loss_fn, params, data, param_sharding="fsdp")


@errors_table
def test_param_sharding_with_devices_is_refused():
    loss_fn, params, data = _setup()
    with pytest.raises(ParamShardingError, match="were both given"):
        hessian(loss_fn, params, data, devices=jax.devices(), param_sharding="largest_axis")
    op = hessian(loss_fn, params, data, param_sharding="largest_axis")
    with pytest.raises(ParamShardingError, match="its batches cannot also be spread"):
        op.shard()
