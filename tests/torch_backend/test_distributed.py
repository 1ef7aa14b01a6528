"""torch.distributed: 2 gloo ranks with uneven shards equal the single-process operator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_backend as tb  # noqa: E402

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _dist_worker import analyse, problem  # noqa: E402


def test_two_ranks_equal_single_process(tmp_path):
    out = tmp_path / "rank0.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(HERE / "_dist_worker.py"), str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["same_on_every_rank"]
    for reduction in ("mean", "sum"):
        _compare(result[reduction], reduction)


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
