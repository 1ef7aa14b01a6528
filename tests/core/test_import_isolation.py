"""`import dualhess` must work with neither torch nor jax installed (DESIGN.md section 1)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = ("torch", "jax", "jaxlib", "flax", "optax", "torch_backend", "jax_backend",
               "backpack", "pyhessian", "matplotlib")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
            return None

    sys.meta_path.insert(0, Block())
    """
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_dualhess_without_frameworks():
    proc = _run(
        """
        import numpy as np
        import dualhess
        op = dualhess.DenseOperator(np.diag([4.0, 1.0, -2.0, 0.5]))
        T = dualhess.lanczos(op, 4, seed=0)
        ev = np.linalg.eigvalsh(T.matrix())
        assert abs(ev.max() - 4.0) < 1e-12 and abs(ev.min() + 2.0) < 1e-12, ev
        for name in ("torch", "jax", "flax", "torch_backend", "jax_backend"):
            assert name not in sys.modules, name
        print("OK")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("OK")


def test_the_blocker_really_hides_the_frameworks():
    # Guards the test above against passing vacuously.
    proc = _run("import torch")
    assert proc.returncode != 0
    assert "hidden by the test" in proc.stderr
