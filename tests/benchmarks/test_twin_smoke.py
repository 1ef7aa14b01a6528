"""Smoke test of ``python -m benchmarks.twin``: one family at the tiniest size, both outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("jax")

ROOT = str(Path(__file__).resolve().parents[2])  # benchmarks/ is not an installed package
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import twin  # noqa: E402

pytestmark = pytest.mark.both


def test_twin_benchmark_smoke(tmp_path):
    twin.main(["--size", "tiny", "--families", "transformer_encoder", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "twin.json").read_text())
    (row,) = results["rows"]
    assert row["status"] == "ok", row
    assert row["max_rel_diff"] <= 1e-12  # the two products agree in float64
    assert row["torch_hvp_s"] > 0 and row["jax_hvp_s"] > 0 and row["conversion_s"] > 0
    assert row["jax_over_torch"] == pytest.approx(row["jax_hvp_s"] / row["torch_hvp_s"])
    table = (tmp_path / "twin.md").read_text()
    assert "| transformer_encoder |" in table and "JAX / torch" in table
