"""Bad arguments to the algorithms: clear errors before any product (rows of docs/errors.md)."""

from __future__ import annotations

import numpy as np
import pytest

import dualhess
from dualhess import CheckpointMismatchError, DenseOperator

errors_table = pytest.mark.errors_table
A = np.diag(np.arange(1.0, 6.0))


@errors_table
def test_eigsh_k_at_least_n():
    for k in (5, 6):
        with pytest.raises(ValueError, match="eigsh: k must be < n"):
            dualhess.eigsh(A, k=k)


@errors_table
def test_eigsh_unknown_which():
    with pytest.raises(ValueError, match="eigsh: which must be one of"):
        dualhess.eigsh(A, k=1, which="largest")


@errors_table
def test_eigsh_bad_tol():
    for tol in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="eigsh: tol must be a finite number >= 0"):
            dualhess.eigsh(A, k=1, tol=tol)


@errors_table
def test_eigsh_budget_below_k():
    with pytest.raises(ValueError, match="eigsh: max_matvecs must be >= k"):
        dualhess.eigsh(A, k=2, max_matvecs=1)


@errors_table
def test_zero_budgets():
    with pytest.raises(ValueError, match="trace: num_matvecs must be positive"):
        dualhess.trace(A, num_matvecs=0)
    with pytest.raises(ValueError, match="density: num_probes must be positive"):
        dualhess.density(A, num_probes=0)
    with pytest.raises(ValueError, match="lanczos: num_steps must be positive"):
        dualhess.lanczos(A, 0)


@errors_table
def test_checkpoint_from_other_settings(tmp_path):
    class Interrupted(DenseOperator):
        limit = 6

        def _matmat(self, V):
            if self.num_matvecs >= self.limit:
                raise RuntimeError("interrupted")  # mid-run: the checkpoint stays
            return self.matrix @ V

        def _matvec(self, v):
            return self._matmat(v[:, None])[:, 0]

    path = tmp_path / "run.npz"
    S = np.diag(np.arange(1.0, 31.0))
    with pytest.raises(RuntimeError, match="interrupted"):
        dualhess.lanczos(Interrupted(S), 20, seed=0, checkpoint=path, checkpoint_every=2)
    assert path.exists()
    with pytest.raises(CheckpointMismatchError, match="was made by another run: its settings"):
        dualhess.lanczos(Interrupted(S), 21, seed=0, checkpoint=path)
