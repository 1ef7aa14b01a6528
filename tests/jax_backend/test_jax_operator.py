"""jax_backend.hessian / dense_hessian on plain pytrees: exactness, batching, vmap, compilation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _jax_helpers import BATCH_SIZE, batches_of, mean_cross_entropy, relative_error
from jax.flatten_util import ravel_pytree

import dualhess
from jax_backend import HessianOperator, dense_hessian, hessian
from jax_backend._data import prepare_data


def init_params(hidden=6, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.normal(scale=0.3, size=(64, hidden)),
        "b1": rng.normal(scale=0.1, size=(hidden,)),
        "w2": rng.normal(scale=0.5, size=(hidden, 10)),
        "b2": np.zeros(10),
    }


def forward(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def loss_fn(params, batch):
    x, y = batch
    return mean_cross_entropy(forward(params, x), y)


@pytest.fixture(scope="module")
def problem(digits_flat):
    x, y = digits_flat
    params = init_params()
    flat, unravel = ravel_pytree(jax.tree_util.tree_map(jnp.asarray, params))
    dense = jax.jit(jax.hessian(lambda w: loss_fn(unravel(w), (x, y))))(flat)  # one batch
    return params, x, y, np.asarray(dense)


@pytest.fixture(scope="module")
def op(problem):
    params, x, y, _ = problem
    return hessian(loss_fn, params, batches_of(x, y))


def test_layout_follows_ravel_order(op, problem):
    params = problem[0]
    assert op.layout.names == ["b1", "b2", "w1", "w2"]  # sorted dict keys, as ravel_pytree
    assert op.n == op.layout.size == sum(p.size for p in params.values())
    flat, _ = ravel_pytree(jax.tree_util.tree_map(jnp.asarray, params))
    np.testing.assert_array_equal(np.asarray(op.params_flat), np.asarray(flat))
    assert isinstance(op, HessianOperator) and isinstance(op, dualhess.Operator)
    assert op.dtype == jnp.float64 and op.framework == "jax"
    assert op.dataset.batch_sizes == (BATCH_SIZE, BATCH_SIZE, 8)


def test_matvec_matches_dense_hessian(op, problem):
    dense = problem[3]
    rng = np.random.default_rng(1)
    for _ in range(3):
        v = rng.standard_normal(op.n)
        got = op.matvec(op.asarray(v))
        assert got.dtype == jnp.float64
        assert relative_error(got, dense @ v) <= 1e-10


def test_to_dense_equals_jax_hessian_and_is_symmetric(op, problem):
    dense = problem[3]
    got = np.asarray(op.to_dense())
    assert np.max(np.abs(got - dense)) <= 1e-10 * np.max(np.abs(dense))
    assert np.max(np.abs(got - got.T)) <= 1e-12 * np.max(np.abs(dense))


def test_dense_hessian_weights_batches_exactly(problem):
    params, x, y, dense = problem
    got = np.asarray(dense_hessian(loss_fn, params, batches_of(x, y)))
    assert np.max(np.abs(got - dense)) <= 1e-12 * np.max(np.abs(dense))


def test_unequal_last_batch_is_exact_not_mean_of_batch_means(op, problem):
    params, x, y, dense = problem
    v = np.random.default_rng(2).standard_normal(op.n)
    exact = dense @ v
    assert relative_error(op.matvec(op.asarray(v)), exact) <= 1e-10
    # the naive mean of the three batch means is measurably different: the test can fail
    per_batch = [hessian(loss_fn, params, b) for b in batches_of(x, y)]
    naive = sum(np.asarray(o.matvec(o.asarray(v))) for o in per_batch) / len(per_batch)
    assert relative_error(naive, exact) > 1e-4


def test_matmat_equals_columnwise_matvec(op):
    V = op.asarray(np.random.default_rng(3).standard_normal((op.n, 5)))
    block = np.asarray(op.matmat(V))
    columns = np.stack([np.asarray(op.matvec(V[:, j])) for j in range(5)], axis=1)
    assert relative_error(block, columns) <= 1e-12


def test_chunked_matmat_pads_last_chunk_and_compiles_once(problem):
    params, x, y, dense = problem
    op = hessian(loss_fn, params, batches_of(x, y), chunk_size=3)
    V = np.random.default_rng(4).standard_normal((op.n, 7))  # chunks of 3, 3 and 1 -> padded
    before = op.num_traces
    got = op.matmat(op.asarray(V))
    assert relative_error(got, dense @ V) <= 1e-10
    assert op.num_matvecs == 7
    assert op.num_traces - before == 1  # the short last chunk reused the compiled function
    op.matmat(op.asarray(V[:, :2]))
    assert op.num_traces - before == 1


def test_one_compilation_across_50_products(problem):
    params, x, y, _ = problem
    traces = []

    def counting_loss(p, batch):
        traces.append(1)  # a Python side effect: runs only while JAX traces
        return loss_fn(p, batch)

    op = hessian(counting_loss, params, batches_of(x, y))
    rng = np.random.default_rng(5)
    op.matvec(op.asarray(rng.standard_normal(op.n)))
    op.matmat(op.asarray(rng.standard_normal((op.n, 4))))
    after_first = len(traces)
    assert after_first > 0
    for _ in range(50):
        op.matvec(op.asarray(rng.standard_normal(op.n)))
        op.matmat(op.asarray(rng.standard_normal((op.n, 4))))
    assert len(traces) == after_first
    assert op.num_traces == 2  # one for matvec, one for the 4-column matmat
    assert op.num_matvecs == 51 * 5


def test_one_batch_reuses_its_linearization(problem):
    """One batch: the primal work is linearised once; products equal the dense Hessian and
    the recomputing (scan) path, and the linearisation is computed once, not per product."""
    params, x, y, dense = problem
    traces = []

    def counting_loss(p, batch):
        traces.append(1)  # runs only while JAX traces
        return loss_fn(p, batch)

    op = hessian(counting_loss, params, (x, y), chunk_size=4)
    V = op.asarray(np.random.default_rng(11).standard_normal((op.n, 6)))
    got_vec = op.matvec(V[:, 0])
    linear = op._linearization()
    assert linear is not None and op._linearization() is linear
    # over the parameter pytree, applied between an unravel and a ravel of their own
    assert op._linear_tree
    got_mat = op.matmat(V)  # chunks of 4 and 2 (padded)
    recomputed = op._matmat_jit(op.params_flat, op.dataset.groups, V)
    assert relative_error(got_mat, dense @ np.asarray(V)) <= 1e-10
    assert relative_error(got_vec, np.asarray(got_mat)[:, 0]) <= 1e-13
    assert relative_error(got_mat, recomputed) <= 1e-13
    after = len(traces)
    for _ in range(20):
        op.matvec(V[:, 1])
        op.matmat(V[:, :3])
    assert len(traces) == after  # nothing re-traced: the primal work is not redone
    assert op.num_traces == 3  # apply (matvec), apply over 4 columns, and the scan check

    several = hessian(loss_fn, params, batches_of(x, y))
    several.matvec(V[:, 0])
    assert several._linearization() is None  # several batches: recomputed per product


def test_dict_batches_and_generators(problem):
    params, x, y, dense = problem
    v = np.random.default_rng(6).standard_normal(dense.shape[0])

    def dict_loss(p, batch):
        return mean_cross_entropy(forward(p, batch["image"]), batch["label"])

    def generator():
        for xb, yb in batches_of(x, y, 24):  # 24 and 16
            yield {"image": xb, "label": yb}

    op = hessian(dict_loss, params, generator())
    assert op.dataset.batch_sizes == (24, 16)
    assert relative_error(op.matvec(op.asarray(v)), dense @ v) <= 1e-10
    # a generator is read once; the operator keeps the batches and stays fixed
    assert relative_error(op.matvec(op.asarray(v)), dense @ v) <= 1e-10


def test_ravel_unravel_round_trip(op):
    v = np.arange(op.n, dtype=np.float64)
    tree = op.unravel(v)
    assert set(tree) == {"w1", "b1", "w2", "b2"}
    assert tree["w1"].shape == (64, 6)
    entry = op.layout["w2"]
    np.testing.assert_array_equal(np.asarray(tree["w2"]).ravel(), v[entry.slice])
    np.testing.assert_array_equal(np.asarray(op.ravel(tree)), v)
    with pytest.raises(dualhess.OperatorError, match="structure"):
        op.ravel({"w1": tree["w1"]})
    with pytest.raises(dualhess.OperatorError, match="shape"):
        op.unravel(v[:-1])


def test_prepare_data_groups_by_shape():
    x = np.arange(10.0).reshape(10, 1)
    ds = prepare_data([x[:4], x[4:8], x[8:]], jnp.float64, "test")
    assert ds.batch_sizes == (4, 4, 2) and ds.num_samples == 10
    assert [jax.tree_util.tree_leaves(g)[0].shape for g in ds.groups] == [(2, 4, 1), (1, 2, 1)]
    assert ds.weights == (0.4, 0.4, 0.2)  # per batch (was per group: weights now vary per batch)
    assert ds.normalizers == (4.0, 4.0, 2.0) and ds.total_normalizer == 10.0
    assert [b.shape[0] for _, b in ds.batches()] == [4, 4, 2]
    assert sum(w for w, _ in ds.batches()) == pytest.approx(1.0, abs=1e-15)


# ---------------------------------------------------------------- core algorithms on the operator
@pytest.fixture(scope="module")
def small_op():
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((30, 3)), rng.integers(0, 3, 30)
    params = {"w": rng.standard_normal((3, 3)), "b": rng.standard_normal(3)}  # n = 12

    def small_loss(p, batch):
        return mean_cross_entropy(batch[0] @ p["w"] + p["b"], batch[1])

    op = hessian(small_loss, params, batches_of(x, y, 12))
    return op, np.asarray(dense_hessian(small_loss, params, (x, y)))


@pytest.mark.parametrize("block_size", [1, 4])
def test_eigsh_on_jax_operator_matches_numpy(small_op, block_size):
    eigsh = pytest.importorskip("dualhess._eigsh").eigsh
    op, dense = small_op
    exact = np.linalg.eigvalsh(dense)
    result = eigsh(op, k=3, which="LA", tol=1e-10, seed=0, block_size=block_size)
    scale = np.max(np.abs(exact))
    np.testing.assert_allclose(result.values, exact[::-1][:3], rtol=0, atol=1e-9 * scale)
    assert np.all(result.converged)


def test_trace_on_jax_operator_matches_numpy(small_op):
    trace = pytest.importorskip("dualhess._trace").trace
    op, dense = small_op
    estimate = trace(op, method="xtrace", num_matvecs=4 * op.n, seed=0)  # sketch spans R^n
    assert estimate.value == pytest.approx(np.trace(dense), rel=1e-10)


def test_density_on_jax_operator_matches_numpy(small_op):
    density = pytest.importorskip("dualhess._density").density
    op, dense = small_op
    exact = np.linalg.eigvalsh(dense)
    result = density(op, num_probes=3, num_steps=op.n, seed=0)  # Lanczos exhausts R^n
    used = result.weights > 1e-12
    nodes = result.nodes[used]
    gap = np.min(np.abs(nodes[:, None] - exact[None, :]), axis=1)
    assert np.max(gap) <= 1e-8 * np.max(np.abs(exact))
    np.testing.assert_allclose(result.weights.sum(axis=1), 1.0, atol=1e-12)
