"""Blockwise spectral densities against each block's dense spectrum.

The SLQ measure of a block (Ritz values with their quadrature weights, averaged over the
probes) is compared with the uniform measure on the block's dense eigenvalues by the
Wasserstein-1 distance, relative to the block's spectral range: at most 1e-2, on a matrix
with known block spectra (numpy) and on the float64 Hessians of small models (torch, JAX).
"""

from __future__ import annotations

import numpy as np
import pytest

import dualhess
from dualhess import DenseOperator, ParamLayout, per_layer_spectra
from dualhess._per_layer import jensen_shannon_distance


def wasserstein_1(nodes: np.ndarray, weights: np.ndarray, eigenvalues: np.ndarray) -> float:
    """W1 between sum_i weights_i delta(nodes_i) and the uniform measure on eigenvalues:
    the integral of |F_a - F_b| over the union of the atoms."""
    nodes, weights = np.ravel(nodes), np.ravel(weights)
    keep = weights > 0
    nodes, weights = nodes[keep], weights[keep] / weights[keep].sum()
    atoms = np.concatenate([nodes, eigenvalues])
    mass = np.concatenate([weights, -np.full(eigenvalues.size, 1.0 / eigenvalues.size)])
    order = np.argsort(atoms)
    cdf_gap = np.cumsum(mass[order])[:-1]
    return float(np.sum(np.abs(cdf_gap) * np.diff(atoms[order])))


def check_blocks(op, H: np.ndarray, result, *, rtol: float = 1e-2) -> list[float]:
    ratios = []
    for layer in result.layers:
        index = np.concatenate([np.arange(op.layout[n].start, op.layout[n].stop)
                                for n in layer.params])
        lam = np.linalg.eigvalsh(H[np.ix_(index, index)])
        dens = layer.density
        ratio = wasserstein_1(dens.nodes, dens.weights, lam) / (lam[-1] - lam[0])
        assert ratio <= rtol, (layer.name, ratio)
        ratios.append(ratio)
    return ratios


def test_block_densities_of_a_matrix_with_known_block_spectra():
    rng = np.random.default_rng(0)
    sizes = {"a": 30, "b": 20}
    spectra = {"a": np.linspace(-1.0, 4.0, 30), "b": np.concatenate([np.zeros(15),
                                                                    np.linspace(5, 9, 5)])}
    blocks = []
    for name, lam in spectra.items():
        Q, _ = np.linalg.qr(rng.standard_normal((sizes[name],) * 2))
        blocks.append((Q * lam) @ Q.T)
    H = np.zeros((50, 50))
    H[:30, :30], H[30:, 30:] = blocks
    coupling = 0.3 * rng.standard_normal((30, 20))
    H[:30, 30:], H[30:, :30] = coupling, coupling.T  # off-block terms: not in any block
    op = DenseOperator(H)
    op.layout = ParamLayout.from_shapes([("a.weight", (5, 6)), ("b.weight", (20,))])
    result = per_layer_spectra(op, density=True, density_probes=256, density_steps=40, seed=0)
    check_blocks(op, H, result)
    for layer in result.layers:
        assert dualhess._density.trapezoid(layer.density.values, layer.density.grid) == (
            pytest.approx(1.0, rel=1e-9))
    names, D = result.distances()
    assert names == ["a", "b"] and D[0, 0] == 0 and D[0, 1] == D[1, 0] and 0.3 < D[0, 1] <= 1
    text = result.table()
    assert "Jensen-Shannon" in text and f"{D[0, 1]:.3f}" in text
    record = result.to_dict()
    assert set(record["densities"]) == {"a", "b"}
    assert record["distances"]["jensen_shannon"][0][1] == pytest.approx(D[0, 1])
    assert "density" not in record["layers"][0]


def test_jensen_shannon_distance_exact_cases():
    x = np.linspace(-3.0, 3.0, 601)
    p = np.exp(-0.5 * x**2)
    assert jensen_shannon_distance(p, 2 * p, x) == pytest.approx(0.0, abs=1e-7)
    half = np.where(np.abs(x) < 1, 1.0, 0.0)
    shifted = np.where(np.abs(x - 1) < 1, 1.0, 0.0)
    # uniform on [-1, 1] vs on [0, 2]: overlap of half the mass; JSD = 1/2 bit
    assert jensen_shannon_distance(half, shifted, x) == pytest.approx(np.sqrt(0.5), rel=1e-2)


def test_plot_densities_one_row_per_block():
    import matplotlib

    matplotlib.use("Agg")
    op = DenseOperator(np.diag(np.concatenate([np.linspace(0, 1, 8), np.linspace(2, 5, 6)])))
    op.layout = ParamLayout.from_shapes([("x.weight", (8,)), ("y.weight", (6,))])
    result = per_layer_spectra(op, density=True, density_probes=4, density_steps=8, seed=1)
    fig = result.plot_densities()
    axes = fig.axes
    assert len(axes) == 2 and axes[-1].get_xlabel() == "eigenvalue"
    assert all(ax.get_ylabel() == "density" for ax in axes)
    assert "x (8 parameters)" in axes[0].texts[0].get_text()
    with pytest.raises(ValueError, match="density=True"):
        per_layer_spectra(op).plot_densities()


def test_torch_block_densities_against_dense_block_spectra():
    torch = pytest.importorskip("torch")
    from torch_backend import hessian

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 4)).double()
    X, y = torch.randn(64, 5, dtype=torch.float64), torch.randint(0, 4, (64,))
    op = hessian(model, torch.nn.CrossEntropyLoss(), (X, y), method="func")
    H = op.to_dense().numpy()
    result = per_layer_spectra(op, density=True, density_probes=256, density_steps=40, seed=0)
    assert [layer.name for layer in result.layers] == ["0", "2"]
    check_blocks(op, H, result)


def test_jax_block_densities_against_dense_block_spectra():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from jax_backend import dense_hessian
    from jax_backend import hessian as jax_hessian

    rng = np.random.default_rng(2)
    x, t = rng.standard_normal((40, 4)), rng.standard_normal((40, 3))
    params = {"l1": {"kernel": jnp.asarray(rng.standard_normal((4, 5)) * 0.7),
                     "bias": jnp.zeros(5)},
              "l2": {"kernel": jnp.asarray(rng.standard_normal((5, 3)) * 0.7)}}

    def loss_fn(p, batch):
        inputs, targets = batch
        hidden = jnp.tanh(inputs @ p["l1"]["kernel"] + p["l1"]["bias"])
        return jnp.mean((hidden @ p["l2"]["kernel"] - targets) ** 2)

    op = jax_hessian(loss_fn, params, (x, t))
    H = np.asarray(dense_hessian(loss_fn, params, (x, t)))
    # The last layer's block is A kron I_3 (squared error, linear output): every eigenvalue
    # is threefold and a Rademacher probe's weight on an eigenspace varies much more than
    # on a generic block (one probe put 0.96 of its mass on the top one, where the mean is
    # 0.2). 1024 probes bring W1/range to <= 0.0045 over six seeds (256: up to 0.018).
    result = per_layer_spectra(op, density=True, density_probes=1024, density_steps=40, seed=0)
    assert [layer.name for layer in result.layers] == ["l1", "l2"]
    check_blocks(op, H, result)
