"""torch.distributed: 2 gloo ranks with uneven shards equal the single-process operator."""

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
from _dist_worker import analyse, problem  # noqa: E402


def test_two_ranks_equal_single_process(tmp_path):
    ranks = launch(HERE / "_dist_worker.py", workdir=tmp_path)
    assert [r.pop("is_main_process") for r in ranks] == [True, False]
    assert ranks[0] == ranks[1]  # the same numbers on every rank, bit for bit
    for reduction in ("mean", "sum"):
        _compare(ranks[0][reduction], reduction)


def _compare(got, reduction):
    model, X, y = problem()
    op = tb.hessian(model, torch.nn.CrossEntropyLoss(reduction=reduction), (X, y), method="func")
    ref = analyse(op)
    assert got["num_samples"] == 150
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-12)
    np.testing.assert_allclose(got["hv"], ref["hv"], rtol=1e-12, atol=1e-12 * np.abs(ref["hv"]).max())
    np.testing.assert_allclose(got["eig"], ref["eig"], rtol=1e-12)
    assert got["trace"] == pytest.approx(ref["trace"], rel=1e-12)
    np.testing.assert_allclose(got["nodes"], ref["nodes"], rtol=1e-12, atol=1e-12 * np.abs(ref["eig"]).max())
    np.testing.assert_allclose(got["weights"], ref["weights"], rtol=1e-10, atol=1e-12)
