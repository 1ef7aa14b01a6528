"""The examples in the docstrings run and print what they say (doctest, in a subprocess so
that no example's global settings, such as jax_enable_x64, leak into other tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.both
def test_docstring_examples_run():
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--doctest-modules", "-q", "-p", "no:cacheprovider",
         "-o", "addopts=", "dualhess", "torch_backend", "jax_backend"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
