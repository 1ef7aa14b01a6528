"""chunk_size="auto": measured per-product memory and free memory decide the chunk."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import torch_backend as tb  # noqa: E402
from torch_backend import _memory as memory  # noqa: E402


def _problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    X, y = torch.randn(512, 64, dtype=torch.float64), torch.randint(0, 10, (512,))
    return model.double().eval(), torch.nn.CrossEntropyLoss(), (X, y)


def test_auto_chunk_is_all_columns_when_memory_is_plentiful():
    op = tb.hessian(*_problem(), method="func", chunk_size="auto")
    assert op.chunk_size == op.n


def test_auto_chunk_shrinks_with_free_memory(monkeypatch):
    op = tb.hessian(*_problem(), method="func")
    vector = op.n * 8
    monkeypatch.setattr(memory, "free_memory", lambda device: 400 * vector)
    small = memory.auto_chunk_size(op)
    monkeypatch.setattr(memory, "free_memory", lambda device: 4000 * vector)
    large = memory.auto_chunk_size(op)
    assert 1 <= small < large <= op.n
    # the per-column cost is at least 4 vectors, so 80% of 400 vectors allows at most 80 columns
    assert small <= 80
    monkeypatch.setattr(memory, "free_memory", lambda device: 0)
    assert memory.auto_chunk_size(op) == 1  # never below one column
