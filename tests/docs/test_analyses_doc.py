"""docs/analyses.md's code blocks run as written (together, in one fresh interpreter)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "analyses.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_analyses_doc_blocks_run(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    assert len(BLOCKS) == 5
    hugging_face = all(importlib.util.find_spec(m) for m in ("transformers", "accelerate"))
    blocks = [b for b in BLOCKS if hugging_face or "transformers" not in b]
    # each block is a script of its own: run them one after the other in one interpreter
    code = "\n".join(f"exec(compile({b!r}, 'docs/analyses.md block {i}', 'exec'), {{}})"
                     for i, b in enumerate(blocks))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for figure in ("landscape_1d.png", "landscape_2d.png", "per_layer_density.png",
                   "sharpness.png"):
        assert (tmp_path / figure).stat().st_size > 10_000, figure
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("True ")  # the centre of the slice is op.loss
    curvature, lam = (float(v) for v in lines[0].split()[1:3])
    assert curvature == pytest.approx(lam, rel=1e-5)  # second difference, h = 1e-3
