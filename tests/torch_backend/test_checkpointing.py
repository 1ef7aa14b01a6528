"""Activation checkpointing in Hessian-vector products (issue 25's memory-lean LM products).

A checkpointed block keeps no activations in the first-order graph and recomputes its
forward during the backward. Products must equal those of the same model without
checkpointing, for ``torch.utils.checkpoint`` and Hugging Face's
``gradient_checkpointing_enable()`` (which recomputes attention during the backward: it must
run on the same attention kernel as the forward did).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.utils.checkpoint import checkpoint  # noqa: E402

import torch_backend as tb  # noqa: E402


class Blocks(torch.nn.Module):
    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.checkpointed = checkpointed
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh()) for _ in range(3))
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        return self.head(x)


def _products(op, seed=0):
    rng = np.random.default_rng(seed)
    v, V = rng.standard_normal(op.n), rng.standard_normal((op.n, 3))
    return op.matvec(op.asarray(v)).numpy(), op.matmat(op.asarray(V)).numpy()


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("method", ["autograd", "auto"])
def test_torch_utils_checkpoint_products_equal_the_plain_model(method):
    X = torch.randn(20, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (20,), generator=torch.Generator().manual_seed(2))
    data = [(X[:10], y[:10]), (X[10:], y[10:])]
    loss = torch.nn.CrossEntropyLoss()
    plain = _products(tb.hessian(Blocks(False).double(), loss, data, method="autograd"))
    ckpt = _products(tb.hessian(Blocks(True).double(), loss, data, method=method))
    for ours, ref in zip(ckpt, plain):
        assert _rel(ours, ref) <= 1e-12


def test_hugging_face_gradient_checkpointing_products_equal_the_plain_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=30,
                                     n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    plain = transformers.GPT2LMHeadModel(config).double().eval()
    ckpt = transformers.GPT2LMHeadModel(config).double()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt.train()  # Hugging Face checkpoints only in train mode (dropout is 0 here)
    ids = torch.randint(0, 30, (4, 8), generator=torch.Generator().manual_seed(3))
    ids[3, 5:] = 0
    labels = ids.clone()
    labels[3, 5:] = -100  # padding: the token mean needs the kept-label count
    data = [{"input_ids": ids[:2], "labels": labels[:2]},
            {"input_ids": ids[2:], "labels": labels[2:]}]

    def closure(model, batch):
        return model(**batch).loss

    options = {"closure": closure, "data": data, "normalizer": tb.label_count(shift=True)}
    reference = _products(tb.hessian(plain, method="autograd", **options))
    ours = _products(tb.hessian(ckpt, **options))  # auto: torch.func cannot, autograd can
    for got, ref in zip(ours, reference):
        print(f"gradient checkpointing vs plain: rel diff {_rel(got, ref):.2e}")
        assert _rel(got, ref) <= 1e-12
