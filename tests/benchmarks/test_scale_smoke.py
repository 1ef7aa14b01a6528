"""Smoke test of ``python -m benchmarks.scale --tiny``: a tiny GPT-2, three stages, both outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = str(Path(__file__).resolve().parents[2])  # benchmarks/ is not an installed package
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import scale  # noqa: E402


def test_scale_benchmark_smoke(tmp_path):
    scale.main(["--tiny", "--stages", "gradient", "product", "top1_disk", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "scale.json").read_text())
    rows = results["rows"]
    assert all(rows[s]["status"] == "ok" for s in ("gradient", "product", "top1_disk")), rows
    assert rows["gradient"]["wall_s"] > 0 and rows["product"]["peak_mb"] > 0
    assert rows["top1_disk"]["converged"] and rows["top1_disk"]["products"] > 1
    ratio = next(t for t in results["targets"] if t["target"].startswith("product time"))
    assert ratio["value"] == pytest.approx(rows["product"]["wall_s"] / rows["gradient"]["wall_s"])
    table = (tmp_path / "scale.md").read_text()
    assert "| gradient |" in table and "| top1_disk |" in table and "jax_twin | -" in table


def test_peak_rss_sees_an_allocation():
    import numpy as np

    with scale.PeakRSS() as mem:
        block = np.ones(64 * 2**20 // 8)  # 64 MB, touched
        block[::512] += 1.0
    del block
    assert 48 <= mem.increase_mb <= 200


def test_gpu_script_runs_the_gpt2_rows_through_the_scale_benchmark(tmp_path):
    """``benchmarks.gpu --models gpt2_small`` runs the scale stages on its device (here the
    CPU, with ``--allow-cpu --tiny``) and writes their table beside its own."""
    from benchmarks import gpu

    assert gpu.main(["--models", "gpt2_small", "--allow-cpu", "--tiny", "--out",
                     str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "scale.json").read_text())["rows"]
    assert rows["gradient"]["status"] == "ok" and rows["product"]["status"] == "ok", rows
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["results"][0]["model"] == "gpt2_small"
    assert report["results"][0]["status"] == "ok"
