"""torch_backend.input_hessian: the Hessian in the inputs of one batch, against dense float64."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import dualhess  # noqa: E402
import torch_backend as tb  # noqa: E402
from torch_backend.examples import MODELS  # noqa: E402

torch.set_num_threads(1)
DT = torch.float64
CE = torch.nn.CrossEntropyLoss()


def rel(A, B):
    return float(torch.linalg.norm(A - B) / torch.linalg.norm(B))


def dense_input_hessian(scalar, x):
    """``d^2 scalar(x) / dx^2`` over the flattened ``x`` by double backward."""
    flat = x.detach().reshape(-1).clone().requires_grad_(True)
    grad = torch.autograd.grad(scalar(flat.reshape(x.shape)), flat, create_graph=True)[0]
    eye = torch.eye(flat.numel(), dtype=flat.dtype)
    return torch.autograd.grad(grad, flat, eye, is_grads_batched=True)[0].detach()


def _cnn_batch():
    make, _ = MODELS["cnn"]
    model = make(2, seed=0)
    torch.nn.init.normal_(model[0].weight, std=0.5)  # not an untrained, nearly flat model
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(3, 1, 8, 8, generator=gen, dtype=DT)
    y = torch.randint(0, 10, (3,), generator=gen)
    return model.eval(), X, y


@pytest.mark.parametrize("method", ["autograd", "func"])
def test_cnn_batch_matches_dense(method):
    model, X, y = _cnn_batch()
    work = model.to(DT)
    H = dense_input_hessian(lambda x: CE(work(x), y), X)
    op = tb.input_hessian(model, CE, (X, y), method=method, dtype=DT)
    assert op.layout.names == ["inputs"] and op.n == X.numel()
    err = rel(op.to_dense(), H)
    print(f"input Hessian of a CNN batch (3 x 1 x 8 x 8), method={method}: rel err {err:.2e}")
    assert err <= 1e-10
    assert abs(op.loss - float(CE(work(X), y))) <= 1e-12
    # an algorithm on it: the top eigenvalue
    top = dualhess.eigsh(op, k=1, seed=0, tol=1e-10)
    exact = float(torch.linalg.eigvalsh(H)[-1])
    assert abs(top.values[0] - exact) <= 1e-8 * abs(exact)


def test_closure_dict_batch_names_and_integer_labels():
    model, X, y = _cnn_batch()
    work = model.to(DT)

    def closure(m, batch):
        return CE(m(batch["pixels"]), batch["labels"])

    op = tb.input_hessian(model, batch={"pixels": X, "labels": y}, closure=closure, dtype=DT)
    assert op.layout.names == ["pixels"]  # the integer labels stay constants
    H = dense_input_hessian(lambda x: CE(work(x), y), X)
    assert rel(op.to_dense(), H) <= 1e-10
    with pytest.raises(TypeError, match="integer tensors"):
        tb.input_hessian(model, batch={"pixels": X, "labels": y}, closure=closure,
                         wrt=["labels"], dtype=DT)


def test_several_inputs_are_named_and_laid_out_in_order():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 2)
            self.b = torch.nn.Linear(4, 2)

        def forward(self, left, right):
            return torch.tanh(self.a(left)) * self.b(right)

    torch.manual_seed(0)
    model = Two().to(DT)
    left, right = torch.randn(2, 3, dtype=DT), torch.randn(2, 4, dtype=DT)
    target = torch.randn(2, 2, dtype=DT)
    mse = torch.nn.MSELoss()
    op = tb.input_hessian(model, mse, ({"left": left, "right": right}, target))
    assert op.layout.names == ["left", "right"]
    flat = torch.cat([left.reshape(-1), right.reshape(-1)])

    def scalar(v):
        return mse(model(v[:6].reshape(2, 3), v[6:].reshape(2, 4)), target)

    assert rel(op.to_dense(), dense_input_hessian(scalar, flat)) <= 1e-10
    assert set(op.split(flat)) == {"left", "right"}


def test_token_ids_cannot_be_differentiated():
    model = torch.nn.Sequential(torch.nn.Embedding(7, 3), torch.nn.Flatten(), torch.nn.Linear(6, 2))
    ids, y = torch.randint(0, 7, (4, 2)), torch.randint(0, 2, (4,))
    with pytest.raises(TypeError, match="integer tensors.*embeddings"):
        tb.input_hessian(model, CE, (ids, y))
    with pytest.raises(TypeError, match="no floating-point tensor"):
        tb.input_hessian(model, batch={"ids": ids, "labels": y},
                         closure=lambda m, b: CE(m(b["ids"]), b["labels"]))
