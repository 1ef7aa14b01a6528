"""Smoke test of ``benchmarks.parity``: equal accuracy on a tiny MLP, the report from it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

ROOT = str(Path(__file__).resolve().parents[2])  # benchmarks/ is not an installed package
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import parity  # noqa: E402


def test_equal_accuracy_rows_and_report(monkeypatch):
    import torch

    monkeypatch.setattr(parity, "SEEDS", (0,))
    part = parity.equal_accuracy(parity._digits_mlp((64, 8, 10), torch.float64))
    run = part["runs"][0]
    for t in parity.TARGETS:
        ours = run[f"dualhess eigenvalue {t:g}"]
        assert ours["converged"] and ours["error"] <= t  # the accuracy asked for, delivered
        assert ours["check_products"] >= parity_check_steps() and ours["checks"] >= 1
        oracle = run["hessian-eigenthings oracle"][f"{t:g}"]
        if oracle["products"] is not None:
            assert oracle["error"] <= t
    results = {"equal_accuracy": {"tiny MLP": part},
               "meta": {"machine": "test", "load_start": [0], "load_end": [0], "seconds": 1.0}}
    results["targets"] = parity._targets(results)
    text = parity.markdown(results)
    assert "## Products at equal accuracy: tiny MLP" in text
    assert len(results["targets"]) == len(parity.TARGETS)


def parity_check_steps() -> int:
    from dualhess import _eigsh

    return _eigsh._CHECK_STEPS


def test_interleaved_medians():
    calls = []
    times = parity._interleaved({"a": lambda: calls.append("a") or np.zeros(1),
                                 "b": lambda: calls.append("b") or np.zeros(1)}, rounds=3)
    assert set(times) == {"a", "b"} and calls[-6:] == ["a", "b"] * 3
