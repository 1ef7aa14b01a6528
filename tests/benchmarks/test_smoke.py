"""Smoke test of the benchmark suite: the CPU suite's code path at tiny sizes (a few seconds).

Anchors that are not installed are skipped by the suite itself (rows with status
``skipped``); this test needs torch, scikit-learn and JAX (the exact reference).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("jax")

ROOT = str(Path(__file__).resolve().parents[2])  # benchmarks/ is not an installed package
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import anchors  # noqa: E402
from benchmarks.run import SMOKE, discrete_density, run_suite, wasserstein, write_results  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def results():
    cfg = dataclasses.replace(SMOKE, models=("mlp",))
    return run_suite(cfg, cache_dir=None, log=lambda _: None)


def _row(results, task, tool):
    return next(r for r in results["rows"] if (r["task"], r["tool"]) == (task, tool))


def test_dualhess_rows_match_exact_reference(results):
    top = _row(results, "top-2", "dualhess")
    assert top["status"] == "ok"
    assert top["rel_error"] <= 1e-8  # eigsh at tol 1e-8 against the dense float64 Hessian
    assert top["num_matvecs"] > 0 and top["wall_s"] > 0
    exact = _row(results, "diagonal", "dualhess-exact")
    assert exact["status"] == "ok" and exact["rel_error"] <= 1e-10  # BackPACK vs dense diagonal
    density = _row(results, "density 2x5", "dualhess")
    assert density["operator_calls"] == 5 and density["num_matvecs"] == 10  # probes advance together


def test_anchor_rows_are_recorded_or_skipped(results):
    for tool in ("scipy", "curvlinops", "hessian-eigenthings", "pyhessian"):
        row = _row(results, "top-2", tool)
        if not anchors.available(tool):
            assert row["status"] == "skipped"
            continue
        assert row["status"] == "ok", row["note"]
        assert row["ratio_to_dualhess"] is not None
    if anchors.available("scipy"):
        assert _row(results, "top-2", "scipy")["rel_error"] <= 1e-8
    if anchors.available("backpack"):
        assert _row(results, "trace", "backpack")["rel_error"] <= 1e-10
    if anchors.available("pyhessian"):  # PyHessian's density calls the removed torch.eig
        assert _row(results, "density 1x5", "pyhessian")["status"] == "failed"


def test_targets_and_outputs(results, tmp_path):
    names = [t["target"] for t in results["targets"]]
    assert any("top-2 accuracy" in n for n in names)
    assert any("probes advance together" in n for n in names)
    assert any("HVP / gradient" in n for n in names)
    json_path, md_path = write_results(results, tmp_path)
    loaded = json.loads(json_path.read_text())
    assert loaded["rows"] == json.loads(json.dumps(results["rows"], default=float))
    text = md_path.read_text()
    assert "| target |" in text and "## mlp" in text


def test_density_error_metric_is_exact_on_known_measures():
    eigenvalues = np.array([0.0, 1.0])
    # The exact discrete measure has distance 0; moving all mass to 0 costs half the width.
    assert discrete_density(eigenvalues, np.array([0.5, 0.5]), eigenvalues) == pytest.approx(0.0, abs=1e-4)
    assert discrete_density(np.array([0.0]), np.array([1.0]), eigenvalues) == pytest.approx(0.5, abs=1e-4)
    grid = np.linspace(-1.0, 2.0, 30001)
    narrow = np.exp(-0.5 * ((grid[:, None] - eigenvalues) / 1e-3) ** 2).sum(axis=1)
    assert wasserstein(grid, narrow, eigenvalues) == pytest.approx(0.0, abs=2e-3)


def test_realistic_part_at_tiny_sizes(tmp_path):
    """The end-to-end rows (dualhess torch only here: anchors and JAX cost minutes)."""
    pytest.importorskip("transformers")
    import dualhess
    import torch_backend
    from benchmarks import realistic

    out = realistic.run_realistic(realistic.TINY, models=("gpt2",), repeats=1, tools=())
    (entry,) = out["models"]
    (row,) = entry["rows"]
    assert row["status"] == "ok" and row["converged"] and row["hvps"] > 0
    assert row["end_to_end_s"] == pytest.approx(row["construction_s"] + row["eigsh_s"])
    assert 0 <= row["bookkeeping_share"] and row["product_over_gradient"] > 0
    # the timing wrapper does not change the numbers: the same eigsh on the plain operator
    task = realistic.realistic_task("gpt2", realistic.TINY)
    op = torch_backend.hessian(task.model, task.loss_fn, task.data)
    plain = dualhess.eigsh(op, k=realistic.K, tol=realistic.TOL, seed=0)
    np.testing.assert_allclose(row["values"], plain.values, rtol=1e-6)
    names = [t["target"] for t in out["targets"]]
    assert any("bookkeeping" in n for n in names) and any("< 600 s" in n for n in names)
    text = realistic.markdown(out)
    assert "## gpt2" in text and "| target |" in text
