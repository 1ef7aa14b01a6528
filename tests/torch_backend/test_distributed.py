"""torch.distributed: 2 gloo ranks with uneven shards equal the single-process operator.

Four losses: a mean, a sum, and two whose normaliser is not the sample count (``ignore_index``
with the ranks keeping very different shares of the labels, and class weights); the ranks sum
their normalisers, so each equals the single-batch operator and the dense Hessian to 1e-12.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_backend as tb  # noqa: E402

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _dist_launch import launch  # noqa: E402
from _dist_worker import analyse, labels_for, losses, problem  # noqa: E402
from torch_refs import dense_hessian  # noqa: E402


def test_two_ranks_equal_single_process(tmp_path):
    ranks = launch(HERE / "_dist_worker.py", workdir=tmp_path)
    assert [r.pop("is_main_process") for r in ranks] == [True, False]
    assert ranks[0] == ranks[1]  # the same numbers on every rank, bit for bit
    for name, loss in losses().items():
        _compare(ranks[0][name], loss, name)


def _dense_hv(model, loss, X, t, v):
    """The dense Hessian of the single-batch loss times v (reverse over reverse)."""
    return (dense_hessian(model, loss, X, t) @ torch.as_tensor(v)).numpy()


def _compare(got, loss, name):
    model, X, y = problem()
    t = labels_for(name, y)
    op = tb.hessian(model, loss, (X, t), method="func")
    ref = analyse(op)
    v = torch.linspace(-1, 1, op.n, dtype=torch.float64)
    dense = _dense_hv(model, loss, X, t, v)
    np.testing.assert_allclose(got["hv"], dense, rtol=1e-12, atol=1e-12 * np.abs(dense).max())
    assert got["num_samples"] == 150
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-12)
    np.testing.assert_allclose(got["hv"], ref["hv"], rtol=1e-12, atol=1e-12 * np.abs(ref["hv"]).max())
    np.testing.assert_allclose(got["eig"], ref["eig"], rtol=1e-12)
    assert got["trace"] == pytest.approx(ref["trace"], rel=1e-12)
    np.testing.assert_allclose(got["nodes"], ref["nodes"], rtol=1e-12, atol=1e-12 * np.abs(ref["eig"]).max())
    np.testing.assert_allclose(got["weights"], ref["weights"], rtol=1e-10, atol=1e-12)
