"""BackPACK exact diagonals against the dense float64 Hessian / GGN."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("backpack")

from torch_refs import assert_clean, reference, rel_err, trained  # noqa: E402

import dualhess  # noqa: E402
import torch_backend as tb  # noqa: E402

CE = torch.nn.CrossEntropyLoss()


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_hessian_diagonal_matches_dense(name):
    model, X, y = trained(name)
    H = reference(name)
    batches = [(X[:50], y[:50]), (X[50:], y[50:])]  # weighted batches
    op = tb.hessian(model, CE, batches, method="func")
    assert rel_err(op.exact_diagonal(), torch.diagonal(H)) <= 1e-10
    assert rel_err(tb.exact_diagonal(model, CE, (X, y)), torch.diagonal(H)) <= 1e-10
    assert abs(op.exact_trace() - float(torch.trace(H))) <= 1e-10 * float(
        torch.diagonal(H).abs().sum()
    )
    assert abs(tb.exact_trace(model, CE, (X, y)) - float(torch.trace(H))) <= 1e-9
    assert_clean(model)


def test_parameter_block_diagonal():
    model, X, y = trained("mlp")
    H = reference("mlp")
    full = tb.hessian(model, CE, (X, y), method="func")
    op = tb.hessian(model, CE, (X, y), params=["2.weight"], method="func")
    sl = full.layout["2.weight"].slice
    assert rel_err(op.exact_diagonal(), torch.diagonal(H)[sl]) <= 1e-10


@pytest.mark.parametrize("name", ["mlp", "bn_cnn"])
def test_ggn_diagonal_matches_dense(name):
    model, X, y = trained(name)
    op = tb.ggn(model, CE, (X, y))
    G = op.to_dense()
    assert rel_err(op.exact_diagonal(), torch.diagonal(G)) <= 1e-10
    assert_clean(model)


def test_core_exact_methods_use_backpack():
    trace = pytest.importorskip("dualhess._trace")
    diagonal = pytest.importorskip("dualhess._diagonal")
    model, X, y = trained("mlp")
    H = reference("mlp")
    op = tb.hessian(model, CE, (X, y), method="func")
    est = trace.trace(op, method="exact")
    assert abs(float(est.value) - float(torch.trace(H))) <= 1e-9
    d = diagonal.diagonal(op, method="exact")
    assert (
        rel_err(torch.as_tensor(dualhess.Operator.to_numpy(d.values)), torch.diagonal(H)) <= 1e-10
    )


@pytest.mark.parametrize(
    ("name", "curvature", "layer"),
    [
        ("layernorm_mlp", "hessian", "LayerNorm"),
        ("groupnorm_cnn", "ggn", "GroupNorm"),
        ("bn_cnn", "hessian", "BatchNorm2d"),
        ("residual", "hessian", "SumModule"),
    ],
)
def test_unsupported_layers_give_documented_error(name, curvature, layer):
    model, X, y = trained(name)
    with pytest.raises(dualhess.ExactUnavailableError, match=rf"{layer}.*xtrace"):
        tb.exact_diagonal(model, CE, (X, y), curvature=curvature)
    assert_clean(model)


def test_plain_callable_loss_is_unavailable():
    model, X, y = trained("mlp")
    op = tb.hessian(model, torch.nn.functional.cross_entropy, (X, y), method="func")
    with pytest.raises(dualhess.ExactUnavailableError, match="xtrace"):
        op.exact_diagonal()
