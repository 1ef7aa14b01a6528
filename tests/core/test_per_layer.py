"""Per-layer spectra against dense block Hessians (numpy and a tiny float64 torch model)."""

from __future__ import annotations

import numpy as np
import pytest

from dualhess import DenseOperator, ParamLayout, eigsh
from dualhess._per_layer import group_by_layer, per_layer_spectra
from dualhess._wrappers import BlockOperator


def _indefinite(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n))
    return (A + A.T) / 2


def test_block_operator_is_the_principal_submatrix():
    H = _indefinite(7, 0)
    op = DenseOperator(H)
    op.layout = ParamLayout.from_shapes([("a", (2,)), ("b", (1, 2)), ("c", (3,))])
    block = BlockOperator(op, ["c", "a"])  # non-contiguous, layout order kept
    idx = [0, 1, 4, 5, 6]
    np.testing.assert_allclose(block.to_dense(), H[np.ix_(idx, idx)], rtol=0, atol=1e-15)
    assert block.layout.names == ["a", "c"]
    np.testing.assert_allclose(block.exact_diagonal(), np.diag(H)[idx])
    with pytest.raises(KeyError, match="unknown parameters"):
        BlockOperator(op, ["nope"])
    with pytest.raises(ValueError, match="layout"):
        BlockOperator(DenseOperator(H), ["a"])


def test_eigsh_warm_start_v0_and_cold():
    H = np.diag(np.linspace(-3.0, 2.0, 60))
    op = DenseOperator(H)
    cold = eigsh(op, k=1, tol=1e-10, max_basis=8, seed=0)
    assert cold.converged[0]
    assert abs(cold.values[0] - 2.0) <= 1e-10 * 2.0
    # Warm start from a vector close to the top eigenvector: a few products, not a cold run.
    start = np.zeros(60)
    start[-1], start[0] = 1.0, 1e-3
    warm = eigsh(op, k=1, tol=1e-10, max_basis=8, seed=0, v0=start)
    assert warm.converged[0] and warm.values[0] == pytest.approx(2.0, abs=1e-12)
    assert warm.num_matvecs < cold.num_matvecs
    with pytest.raises(ValueError, match="shape"):
        eigsh(op, k=1, v0=np.ones(3))
    with pytest.raises(ValueError, match="zero or non-finite"):
        eigsh(op, k=1, v0=np.zeros(60))
    with pytest.raises(ValueError, match="block_size"):
        eigsh(op, k=1, v0=np.ones((60, 2)))


def test_per_layer_on_dense_blocks_stochastic_and_exact():
    n = 150
    H = _indefinite(n, 1)
    op = DenseOperator(H)
    op.layout = ParamLayout.from_shapes(
        [("l1.weight", (10, 12)), ("l1.bias", (10,)), ("l2.weight", (20,))]
    )
    groups = group_by_layer(op.layout)
    assert groups == {"l1": ["l1.weight", "l1.bias"], "l2": ["l2.weight"]}
    result = per_layer_spectra(op, tol=1e-8, trace_matvecs=40, seed=0, exact_trace=False)
    l1, l2 = result["l1"], result["l2"]
    b1 = H[:130, :130]
    top = np.linalg.eigvalsh(b1)[-1]
    # |theta - lambda| <= ||r|| <= tol |theta|
    assert abs(l1.top_eigenvalue - top) <= 1e-8 * abs(l1.top_eigenvalue)
    assert l1.method == "lanczos+xtrace" and l1.size == 130
    assert abs(l1.trace - np.trace(b1)) <= 5 * l1.trace_stderr
    # 20 <= trace_matvecs: built densely, exact.
    b2 = H[130:, 130:]
    assert l2.method == "dense"
    assert l2.top_eigenvalue == pytest.approx(np.linalg.eigvalsh(b2)[-1], abs=1e-12)
    assert l2.trace == pytest.approx(np.trace(b2), abs=1e-12)
    # With the exact diagonal the traces are exact.
    exact = per_layer_spectra(op, groups="parameter", tol=1e-8, trace_matvecs=40, seed=0)
    assert [layer.name for layer in exact.layers] == ["l1.weight", "l1.bias", "l2.weight"]
    assert exact["l1.weight"].method == "lanczos+exact"
    assert exact["l1.weight"].trace == pytest.approx(np.trace(H[:120, :120]), abs=1e-10)
    assert exact.total.trace == pytest.approx(np.trace(H), abs=1e-10)
    custom = per_layer_spectra(op, groups={"w": lambda s: s.endswith("weight")},
                               include_total=False, seed=0)
    idx = list(range(120)) + list(range(130, 150))
    assert custom["w"].trace == pytest.approx(np.trace(H[np.ix_(idx, idx)]), abs=1e-10)
    assert custom.total is None
    with pytest.raises(ValueError, match="groups"):
        per_layer_spectra(op, groups="module")


@pytest.mark.torch
def test_per_layer_torch_model_against_dense_blocks(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    import torch_backend as tb
    from torch_backend.examples import load_digits, make_mlp

    X, y = load_digits(torch.float64, n=64, flat=True)
    model, loss = make_mlp(hidden=3, seed=0), torch.nn.CrossEntropyLoss()
    op = tb.hessian(model, loss, (X, y), method="func")
    H = op.to_dense().numpy()
    result = per_layer_spectra(op, tol=1e-9, trace_matvecs=200, seed=0)  # blocks dense
    assert [layer.name for layer in result.layers] == ["0", "2"]
    for layer in result.layers:
        idx = np.concatenate([np.arange(op.n)[op.layout[p].slice] for p in layer.params])
        block = H[np.ix_(idx, idx)]
        top = np.linalg.eigvalsh(block)[-1]
        assert abs(layer.top_eigenvalue - top) <= 1e-9 * abs(top) + 1e-12
        assert layer.trace == pytest.approx(np.trace(block), rel=1e-10, abs=1e-12)
    # The same through blocks built by the backend (differentiating only those parameters).
    direct = per_layer_spectra(
        op, block_operator=lambda names: tb.hessian(model, loss, (X, y), params=names,
                                                    method="func"),
        tol=1e-9, trace_matvecs=200, seed=0, include_total=False,
    )
    for a, b in zip(direct.layers, result.layers):
        assert a.top_eigenvalue == pytest.approx(b.top_eigenvalue, rel=2e-9)
        assert a.trace == pytest.approx(b.trace, rel=1e-10)
    table = result.table()
    assert "top eigenvalue" in table and "(all)" in table
    assert result.table("markdown").startswith("| layer |")
    import matplotlib

    matplotlib.use("Agg")
    fig = result.plot(tmp_path / "layers.png")
    assert (tmp_path / "layers.png").stat().st_size > 0 and len(fig.axes) == 2
