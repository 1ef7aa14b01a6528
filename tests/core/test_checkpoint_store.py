"""The checkpoint store: fingerprints, refusal of foreign checkpoints, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest

from dualhess import DenseOperator
from dualhess._checkpoint import Checkpoint, CheckpointMismatchError


def _op(scale: float = 1.0) -> DenseOperator:
    return DenseOperator(scale * np.diag(np.arange(1.0, 6.0)))


def test_round_trip_and_fingerprint_not_counted(tmp_path):
    op = _op()
    ck = Checkpoint(tmp_path / "c.npz", op, "lanczos", {"seed": 0, "num_steps": 4})
    assert op.num_matvecs == 0
    assert ck.load() is None
    ck.save({"step": 3, "alpha": np.array([1.0, 2.0, 3.0])})
    state = Checkpoint(tmp_path / "c.npz", op, "lanczos", {"seed": 0, "num_steps": 4}).load()
    assert int(state["step"]) == 3
    np.testing.assert_array_equal(state["alpha"], [1.0, 2.0, 3.0])
    ck.finish()
    assert not (tmp_path / "c.npz").exists()


def test_other_settings_are_refused(tmp_path):
    Checkpoint(tmp_path / "c.npz", _op(), "lanczos", {"seed": 0, "num_steps": 4}).save({"step": 1})
    with pytest.raises(CheckpointMismatchError, match="its settings is"):
        Checkpoint(tmp_path / "c.npz", _op(), "lanczos", {"seed": 1, "num_steps": 4}).load()
    with pytest.raises(CheckpointMismatchError, match="its kind is 'lanczos'"):
        Checkpoint(tmp_path / "c.npz", _op(), "density", {"seed": 0, "num_steps": 4}).load()


def test_another_operator_is_refused(tmp_path):
    Checkpoint(tmp_path / "c.npz", _op(), "trace", {"seed": 0}).save({"step": 1})
    with pytest.raises(CheckpointMismatchError, match="another operator"):
        Checkpoint(tmp_path / "c.npz", _op(1.0 + 1e-6), "trace", {"seed": 0}).load()


def test_seed_must_be_an_int(tmp_path):
    with pytest.raises(ValueError, match="integer seed"):
        Checkpoint(tmp_path / "c.npz", _op(), "trace", {"seed": None})


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    ck = Checkpoint(path, _op(), "trace", {"seed": 0})
    ck.save({"step": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="simulated"):
        ck.save({"step": 2})
    monkeypatch.undo()
    assert int(ck.load()["step"]) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]  # no temporary file left behind
