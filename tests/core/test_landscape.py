"""Loss landscapes against exact answers: a quadratic loss (numpy) and small float64 models.

On ``L(x) = 1/2 x^T A x - b^T x`` every slice is known in closed form. On the models, every
grid value is compared with a direct evaluation of the loss at the shifted parameters (a
fresh copy of the model, or the loss function called on the shifted pytree), the centre with
``op.loss``, and the curvature of the slice along each unit eigenvector at 0 (second
differences) with the eigenvalue of the dense Hessian.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_symmetric

import dualhess
from dualhess import LossUnavailableError, ParamLayout, QuadraticLoss, loss_landscape


def quadratic(seed: int = 0) -> tuple[QuadraticLoss, np.ndarray, np.ndarray]:
    lam = np.array([5.0, 3.0, 1.0, 0.5, -0.25, -2.0])
    A, Q = make_symmetric(lam, seed, return_vectors=True)
    rng = np.random.default_rng(seed)
    theta, b = rng.standard_normal(6), rng.standard_normal(6)
    layout = ParamLayout.from_shapes([("w", (2, 2)), ("b", (2,))])
    return QuadraticLoss(A, params=theta, linear=b, layout=layout), lam, Q


def exact_loss(op: QuadraticLoss, x: np.ndarray) -> float:
    return float(0.5 * x @ op.matrix @ x - op.linear @ x)


def test_one_dimensional_slice_along_top_eigenvector_is_the_parabola():
    op, lam, Q = quadratic()
    land = loss_landscape(op, radius=2.0, num_points=9, seed=0)
    assert land.kind == "eigen" and land.ndim == 1
    assert land.eigenvalues[0] == pytest.approx(5.0, rel=1e-10)
    v = Q[:, 0]
    theta = np.asarray(op.params_flat)
    g = op.matrix @ theta - op.linear
    # f(a) = L(theta) + a g.v + a^2 lambda / 2 for either sign of v; the sign is the solver's
    expected = [exact_loss(op, theta + a * v) for a in land.offsets[0]]
    flipped = [exact_loss(op, theta - a * v) for a in land.offsets[0]]
    assert np.allclose(land.values, expected, rtol=1e-12, atol=1e-12) or np.allclose(
        land.values, flipped, rtol=1e-12, atol=1e-12)
    assert land.center_loss == pytest.approx(op.loss, abs=1e-15)
    assert land.values[4] == land.center_loss
    assert land.curvature()[0] == pytest.approx(5.0, rel=1e-10)
    assert abs(g @ v) > 0  # a non-trivial linear term: the slice is not symmetric


def test_two_dimensional_slice_matches_direct_evaluations():
    op, lam, _ = quadratic(1)
    eig = dualhess.eigsh(op, k=2, tol=1e-12, seed=3)
    land = loss_landscape(op, eig, dims=2, radius=0.5, num_points=5)
    assert land.kind == "eigen" and land.values.shape == (5, 5)
    assert land.eigenvalues == pytest.approx(tuple(eig.values), rel=1e-15)
    theta = np.asarray(op.params_flat)
    d1, d2 = np.asarray(eig.vectors[:, 0]), np.asarray(eig.vectors[:, 1])
    for i, a in enumerate(land.offsets[0]):
        for j, b in enumerate(land.offsets[1]):
            assert land.values[i, j] == pytest.approx(exact_loss(op, theta + a * d1 + b * d2),
                                                      rel=1e-12, abs=1e-12)
    assert np.allclose(land.curvature(), eig.values, rtol=1e-9)
    default = loss_landscape(op, dims=2, radius=0.5, num_points=5, seed=0)
    assert np.allclose(default.curvature(), [5.0, 3.0], rtol=1e-9)
    assert default.eigenvalues == pytest.approx((5.0, 3.0), rel=1e-10)


def test_filter_normalised_random_directions():
    op, _, _ = quadratic(2)
    land = loss_landscape(op, "random", dims=2, radius=1.0, num_points=3, seed=7)
    theta = np.asarray(op.params_flat)
    again = dualhess._landscape.filter_normalized_direction
    rng = np.random.default_rng(7)
    d1, d2 = again(op.layout, theta, rng), again(op.layout, theta, rng)
    for d in (d1, d2):  # each row (filter) of w scaled to theta's row norm; b untouched
        assert np.allclose(np.linalg.norm(d[:4].reshape(2, 2), axis=1),
                           np.linalg.norm(theta[:4].reshape(2, 2), axis=1), rtol=1e-12)
        assert np.all(d[4:] == 0)
    assert land.direction_norms == pytest.approx(
        (np.linalg.norm(d1), np.linalg.norm(d2)), rel=1e-12)
    assert land.values[0, 2] == pytest.approx(exact_loss(op, theta - d1 + d2), rel=1e-12)


def test_errors_say_what_to_do():
    with pytest.raises(LossUnavailableError, match="no loss"):
        loss_landscape(dualhess.DenseOperator(np.eye(3)))
    op, _, _ = quadratic()
    with pytest.raises(ValueError, match="one or two directions"):
        loss_landscape(op, [np.ones(6)] * 3)
    with pytest.raises(ValueError, match="shape"):
        loss_landscape(op, np.ones(5))
    with pytest.raises(ValueError, match="dims"):
        loss_landscape(op, dims=3)
    with pytest.raises(ValueError, match="radius"):
        loss_landscape(op, radius=0.0)
    bare = QuadraticLoss(np.eye(3))
    with pytest.raises(ValueError, match="layout"):
        loss_landscape(bare, "random")


def test_plots_and_dict():
    import matplotlib

    matplotlib.use("Agg")
    op, _, _ = quadratic()
    one = loss_landscape(op, radius=1.0, num_points=5, seed=0)
    fig = one.plot(label="numpy")
    ax = fig.axes[0]
    assert ax.get_ylabel() == "loss" and "lambda" in ax.get_xlabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["numpy"]
    two = loss_landscape(op, dims=2, radius=1.0, num_points=5, seed=0)
    fig2 = two.plot()
    assert fig2.axes[0].get_xlabel() and fig2.axes[0].get_ylabel()
    assert fig2.axes[1].get_ylabel() == "loss"  # the colour bar
    record = json.loads(json.dumps(two.to_dict()))
    assert np.array(record["values"]).shape == (5, 5) and record["kind"] == "eigen"


def test_torch_slices_against_direct_loss_evaluations():
    torch = pytest.importorskip("torch")
    from torch_backend import hessian

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(),
                                torch.nn.Linear(5, 3)).double()
    X = torch.randn(30, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))
    loss_fn = torch.nn.CrossEntropyLoss()
    data = [(X[:16], y[:16]), (X[16:], y[16:])]  # unequal batches: weighted exactly
    op = hessian(model, loss_fn, data)
    dense = torch.autograd.functional.hessian(
        lambda flat: loss_fn(torch.func.functional_call(model, op.layout.split(flat), (X,)), y),
        op.params_flat)
    lam = np.linalg.eigvalsh(dense.numpy())[::-1]

    def direct(delta: np.ndarray) -> float:
        shifted = op.layout.split(op.params_flat + torch.from_numpy(delta))
        with torch.no_grad():
            return float(loss_fn(torch.func.functional_call(model, shifted, (X,)), y))

    land = loss_landscape(op, radius=1e-3, num_points=3, seed=0, tol=1e-12)
    assert land.center_loss == op.loss
    assert land.curvature()[0] == pytest.approx(lam[0], rel=1e-6)
    eig = dualhess.eigsh(op, k=2, tol=1e-12, seed=1)
    two = loss_landscape(op, eig, dims=2, radius=0.5, num_points=3)
    V = eig.vectors.numpy()
    for (i, j) in [(0, 0), (0, 2), (2, 1)]:
        delta = two.offsets[0][i] * V[:, 0] + two.offsets[1][j] * V[:, 1]
        assert two.values[i, j] == pytest.approx(direct(delta), rel=1e-12)
    rand = loss_landscape(op, "random", radius=0.5, num_points=3, seed=2)
    d = dualhess._landscape.filter_normalized_direction(
        op.layout, op.params_flat.numpy(), np.random.default_rng(2))
    assert rand.values[2] == pytest.approx(direct(0.5 * d), rel=1e-12)


def test_jax_slices_against_direct_loss_evaluations():
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import optax

    from jax_backend import dense_hessian, hessian

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((30, 4)), rng.integers(0, 3, 30)
    params = {"w1": jnp.asarray(rng.standard_normal((4, 5)) * 0.5), "b1": jnp.zeros(5),
              "w2": jnp.asarray(rng.standard_normal((5, 3)) * 0.5)}

    def loss_fn(p, batch):
        x, t = batch
        logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, t))

    data = [(X[:16], y[:16]), (X[16:], y[16:])]
    op = hessian(loss_fn, params, data)
    lam = np.linalg.eigvalsh(np.asarray(dense_hessian(loss_fn, params, data)))[::-1]
    land = loss_landscape(op, radius=1e-3, num_points=3, seed=0, tol=1e-12)
    assert land.center_loss == pytest.approx(float(loss_fn(params, (X, y))), rel=1e-14)
    assert land.curvature()[0] == pytest.approx(lam[0], rel=1e-6)
    rand = loss_landscape(op, "random", radius=0.5, num_points=3, seed=2, filter_axis=-1)
    d = dualhess._landscape.filter_normalized_direction(
        op.layout, np.asarray(op.params_flat), np.random.default_rng(2), filter_axis=-1)
    shifted = op.unravel(op.params_flat + jnp.asarray(0.5 * d))
    assert rand.values[2] == pytest.approx(float(loss_fn(shifted, (X, y))), rel=1e-12)


def test_wrappers_forward_the_loss_in_their_order():
    from dualhess._wrappers import BlockOperator, HostOperator, PermutedOperator

    op, _, _ = quadratic(3)
    align = dualhess.Alignment([4, 2, 0, 1, 5, 3])  # v_b = v_a[perm]
    delta = np.linspace(-1.0, 1.0, 6)
    for wrapped in (HostOperator(op, align), PermutedOperator(op, align)):
        assert wrapped.loss_at(delta) == pytest.approx(op.loss_at(delta[align.perm]), rel=1e-15)
        assert np.allclose(np.asarray(wrapped.gradient())[align.perm], op.gradient(), rtol=1e-15)
    assert np.allclose(HostOperator(op, align).params_flat[align.perm], op.params_flat)
    block = BlockOperator(op, ["b"])
    assert block.loss_at(np.array([0.5, -1.0])) == pytest.approx(
        op.loss_at(np.array([0.0, 0.0, 0.0, 0.0, 0.5, -1.0])), rel=1e-15)
    assert np.allclose(block.gradient(), op.gradient()[4:], rtol=1e-15)
