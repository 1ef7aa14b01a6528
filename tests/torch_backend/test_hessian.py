"""Hessian operator: every method against the exact dense float64 Hessian."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch_refs import (  # noqa: E402
    MODELS,
    assert_clean,
    dense_hessian,
    digits,
    flat_params,
    reference,
    rel_err,
    trained,
)

import torch_backend as tb  # noqa: E402

CE = torch.nn.CrossEntropyLoss()


@pytest.mark.parametrize("name", list(MODELS))
def test_every_method_matches_dense(name):
    model, X, y = trained(name)
    H = reference(name)
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(H.shape[0], 3, generator=gen, dtype=torch.float64)
    for method in ("func", "autograd", "pyhessian", "auto"):
        op = tb.hessian(model, CE, (X, y), method=method)
        assert op.method in ("func", "autograd", "pyhessian")
        assert op.n == H.shape[0] and op.layout.names == [n for n, _ in model.named_parameters()]
        assert rel_err(op.matvec(V[:, 0]), H @ V[:, 0]) <= 1e-10, method
        assert rel_err(op.matmat(V), H @ V) <= 1e-10, method
        op.chunk_size = 2
        assert rel_err(op.matmat(V), H @ V) <= 1e-10, method
    assert_clean(model)


def test_auto_records_choice():
    model, X, y = trained("mlp")
    op = tb.hessian(model, CE, (X, y))
    # the rule itself is tested with a patched clock in tests/torch_backend/test_engines.py
    assert "autograd" in op.method_timings
    assert ("func" in op.method_timings) != ("func" in op.method_failures)
    assert op.method in ("autograd", "func") and op.matmat_method == f"{op.method} (columns)"


@pytest.mark.parametrize("method", ["func", "autograd", "pyhessian"])
def test_loader_with_unequal_last_batch(method):
    from torch.utils.data import DataLoader, TensorDataset

    model, X, y = trained("mlp")
    H = reference("mlp")
    loader = DataLoader(TensorDataset(X, y), batch_size=50)  # 50, 50, 28
    op = tb.hessian(model, CE, loader, method=method)
    assert op.num_samples == X.shape[0]
    V = torch.randn(op.n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert rel_err(op.matmat(V), H @ V) <= 1e-10
    # a plain list of batches is the same operator
    batches = [(X[i : i + 40], y[i : i + 40]) for i in range(0, X.shape[0], 40)]
    op_list = tb.hessian(model, CE, batches, method=method)
    assert rel_err(op_list.matvec(V[:, 0]), H @ V[:, 0]) <= 1e-10


def test_sum_reduction_and_plain_callable():
    model, X, y = trained("mlp")
    H = reference("mlp")
    N = X.shape[0]
    batches = [(X[:100], y[:100]), (X[100:], y[100:])]
    op_sum = tb.hessian(model, torch.nn.CrossEntropyLoss(reduction="sum"), batches, method="func")
    v = torch.randn(op_sum.n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert op_sum.reduction == "sum"
    assert rel_err(op_sum.matvec(v), N * (H @ v)) <= 1e-10

    def summed(out, t):
        return torch.nn.functional.cross_entropy(out, t, reduction="sum")

    op_callable = tb.hessian(model, summed, batches, method="autograd", reduction="sum")
    assert rel_err(op_callable.matvec(v), N * (H @ v)) <= 1e-10
    # default for a plain callable is "mean"
    op_mean = tb.hessian(model, torch.nn.functional.cross_entropy, batches, method="func")
    assert rel_err(op_mean.matvec(v), H @ v) <= 1e-10


@pytest.mark.parametrize("method", ["func", "autograd", "pyhessian"])
def test_parameter_block(method):
    model, X, y = trained("cnn")
    H = reference("cnn")
    names = [n for n, _ in model.named_parameters()]
    op_all = tb.hessian(model, CE, (X, y), method="func")
    block = ["0.weight", "4.bias"]
    op = tb.hessian(model, CE, (X, y), params=block, method=method)
    idx = torch.cat([torch.arange(op_all.layout[n].start, op_all.layout[n].stop) for n in block])
    assert op.layout.names == block and op.n == idx.numel()
    V = torch.randn(op.n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert rel_err(op.matmat(V), H[idx][:, idx] @ V) <= 1e-10
    op_pred = tb.hessian(model, CE, (X, y), params=lambda n: n.startswith("4."), method=method)
    assert op_pred.layout.names == [n for n in names if n.startswith("4.")]
    idx = torch.arange(op_all.layout["4.weight"].start, op_all.layout["4.bias"].stop)
    W = torch.randn(idx.numel(), 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    assert rel_err(op_pred.matmat(W), H[idx][:, idx] @ W) <= 1e-10


def test_split_join_roundtrip():
    model, X, y = trained("mlp")
    op = tb.hessian(model, CE, (X, y), method="func")
    v = torch.arange(op.n, dtype=torch.float64)
    parts = op.split(v)
    assert list(parts) == [n for n, _ in model.named_parameters()]
    for n, p in model.named_parameters():
        assert parts[n].shape == p.shape
    assert torch.equal(op.join(parts), v)


def test_float32_model_analysed_in_float64_copy():
    model64, X, y = trained("mlp")
    model = type(model64)(*[m for m in __import__("copy").deepcopy(model64)]).float()
    model.train()  # Tanh/Linear only: train mode is harmless, and must be preserved
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    op = tb.hessian(model, CE, (X.float(), y), dtype=torch.float64, method="func")
    assert op.dtype == torch.float64
    Xd = X.float().double()
    H = dense_hessian(model64.__class__(*__import__("copy").deepcopy(model).double()), CE, Xd, y)
    v = torch.randn(op.n, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert rel_err(op.matvec(v), H @ v) <= 1e-10
    assert model.training and all(p.dtype == torch.float32 for p in model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    assert_clean(model)


class TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(64, 10).double()
        self.b = torch.nn.Linear(64, 10).double()

    def forward(self, x, z):
        return self.a(x) + torch.tanh(self.b(z))


@pytest.mark.parametrize("method", ["func", "autograd"])
def test_tuple_and_dict_inputs(method):
    X, y = digits(True)
    X, y = X[:64], y[:64]
    Z = X.flip(1)
    torch.manual_seed(0)
    model = TwoInputs()
    names = [n for n, _ in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(t):
        parts, s = {}, 0
        for n, p in model.named_parameters():
            parts[n] = t[s : s + p.numel()].reshape(p.shape)
            s += p.numel()
        return CE(torch.func.functional_call(model, parts, (X, Z)), y)

    H = torch.autograd.functional.hessian(f, theta)
    v = torch.randn(theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    op_t = tb.hessian(model, CE, ((X, Z), y), method=method)
    op_d = tb.hessian(model, CE, ({"x": X, "z": Z}, y), method=method)
    assert op_t.layout.names == names
    assert rel_err(op_t.matvec(v), H @ v) <= 1e-10
    assert rel_err(op_d.matvec(v), H @ v) <= 1e-10


def _tiny_transformer(seed=0):
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0,
                                             batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
    return torch.nn.Sequential(encoder, torch.nn.Flatten(), torch.nn.Linear(8 * 5, 3)).double().eval()


def test_attention_models_use_a_differentiable_kernel():
    """nn.TransformerEncoder calls scaled_dot_product_attention, whose fused CPU/GPU kernels
    have no double backward and no forward AD; products must still work and be exact."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = _tiny_transformer()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(6, 5, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=gen)
    names, theta = flat_params(model)
    shapes = [p.shape for p in model.parameters()]

    def logits(flat):
        parts = dict(zip(names, (t.reshape(s) for t, s in zip(flat.split(
            [s.numel() for s in shapes]), shapes))))
        return torch.func.functional_call(model, parts, (X,))

    # The fused kernel really is what a plain double backward hits here.
    theta_ = theta.clone().requires_grad_(True)
    g = torch.autograd.grad(CE(logits(theta_), y), theta_, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(g, theta_, torch.ones_like(g))
    with sdpa_kernel([SDPBackend.MATH]):
        H = dense_hessian(model, CE, X, y)
        J = torch.autograd.functional.jacobian(logits, theta).reshape(-1, theta.numel())
        z = logits(theta).detach()
        H_out = torch.autograd.functional.hessian(lambda o: CE(o.reshape(z.shape), y),
                                                  z.reshape(-1))
    V = torch.randn(H.shape[0], 3, generator=gen, dtype=torch.float64)
    for method in ("func", "autograd", "auto"):
        op = tb.hessian(model, CE, (X, y), method=method)
        assert rel_err(op.matvec(V[:, 0]), H @ V[:, 0]) <= 1e-10, method
        assert rel_err(op.matmat(V), H @ V) <= 1e-10, method
    G = J.T @ H_out @ J
    ggn = tb.ggn(model, CE, (X, y))
    assert rel_err(ggn.matmat(V), G @ V) <= 1e-10
    assert torch.backends.mha.get_fastpath_enabled()  # restored after every product
    assert_clean(model)
