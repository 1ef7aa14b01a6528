"""Checkpoint files and paths that cannot be used: a CheckpointError naming the file and the fix.

Before issue 23 these gave raw numpy/zipfile errors (``EOFError``, ``BadZipFile``, a hint to
set ``allow_pickle``, ``KeyError: '__meta__'``), and a bad path failed only at the first save,
after products were spent.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

import dualhess
from dualhess import CheckpointError, DenseOperator

errors_table = pytest.mark.errors_table
S = np.diag(np.arange(1.0, 31.0))


class Interrupted(DenseOperator):
    """Raises after ``limit`` products, mid-run: the checkpoint stays on disk."""

    limit = 6

    def _matmat(self, V):
        if self.limit is not None and self.num_matvecs >= self.limit:
            raise RuntimeError("interrupted")
        return self.matrix @ V

    def _matvec(self, v):
        return self._matmat(v[:, None])[:, 0]


class Counting(DenseOperator):
    """Counts every product, the checkpoint's fingerprint included."""

    computed = 0

    def _matmat(self, V):
        Counting.computed += V.shape[1]
        return self.matrix @ V

    def _matvec(self, v):
        return self._matmat(v[:, None])[:, 0]


def _interrupted_checkpoint(path) -> None:
    with pytest.raises(RuntimeError, match="interrupted"):
        dualhess.eigsh(Interrupted(S), k=2, seed=0, checkpoint=path, checkpoint_every=2)
    assert path.exists()


def _resumed() -> Interrupted:
    op = Interrupted(S)
    op.limit = None
    return op


def _no_pickle_hint(exc: BaseException) -> None:
    text = str(exc)
    assert "allow_pickle" not in text and "pickle.load" not in text
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)


@errors_table
def test_empty_checkpoint_file(tmp_path):
    path = tmp_path / "run.npz"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="the file is empty") as info:
        dualhess.eigsh(DenseOperator(S), k=2, seed=0, checkpoint=path)
    assert str(path) in str(info.value) and "delete the file" in str(info.value)
    _no_pickle_hint(info.value)


@errors_table
def test_truncated_checkpoint_file(tmp_path):
    path = tmp_path / "run.npz"
    _interrupted_checkpoint(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is not a readable dualhess checkpoint") as info:
        dualhess.eigsh(DenseOperator(S), k=2, seed=0, checkpoint=path)
    assert "delete the file or pass another checkpoint path" in str(info.value)
    _no_pickle_hint(info.value)


@errors_table
def test_checkpoint_overwritten_with_garbage(tmp_path):
    path = tmp_path / "run.npz"
    _interrupted_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all\n" * 20)
    with pytest.raises(CheckpointError, match=r"not an \.npz archive") as info:
        dualhess.lanczos(DenseOperator(S), 10, seed=0, checkpoint=path)
    _no_pickle_hint(info.value)


@errors_table
def test_npz_that_is_not_a_dualhess_checkpoint(tmp_path):
    path = tmp_path / "run.npz"
    np.savez(path, weights=np.ones(3))
    with pytest.raises(CheckpointError, match="no dualhess metadata"):
        dualhess.trace(DenseOperator(S), num_matvecs=10, seed=0, checkpoint=path)
    np.savez(path, objects=np.array([{"a": 1}], dtype=object))  # pickled content: never loaded
    with pytest.raises(CheckpointError, match="cannot be read") as info:
        dualhess.trace(DenseOperator(S), num_matvecs=10, seed=0, checkpoint=path)
    _no_pickle_hint(info.value)
    np.save(str(path), np.ones(3))  # np.save appends .npy: write a bare .npy under .npz
    os.replace(str(path) + ".npy", path)
    with pytest.raises(CheckpointError, match="single .npy array"):
        dualhess.trace(DenseOperator(S), num_matvecs=10, seed=0, checkpoint=path)


def test_checkpoint_with_missing_products_is_refused(tmp_path):
    path = tmp_path / "run.npz"
    _interrupted_checkpoint(path)
    with np.load(path) as data:
        state = {k: data[k] for k in data.files}
    state.pop("out0")
    np.savez(path, **state)
    with pytest.raises(CheckpointError, match="saved products are incomplete"):
        dualhess.eigsh(_resumed(), k=2, seed=0, checkpoint=path, checkpoint_every=2)


@errors_table
def test_checkpoint_path_under_a_file(tmp_path):
    afile = tmp_path / "results"
    afile.write_text("x")
    Counting.computed = 0
    with pytest.raises(CheckpointError, match="a file stands where a folder is needed"):
        dualhess.eigsh(Counting(S), k=2, seed=0, checkpoint=afile / "run.npz")
    assert Counting.computed == 0  # refused before any product, the fingerprint's included


@errors_table
def test_checkpoint_path_that_is_a_directory(tmp_path):
    Counting.computed = 0
    with pytest.raises(CheckpointError, match="is a directory; pass a file path"):
        dualhess.density(Counting(S), num_probes=2, num_steps=5, seed=0, checkpoint=tmp_path)
    assert Counting.computed == 0


@errors_table
def test_checkpoint_in_a_read_only_directory(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root ignores permissions: simulate what a user sees
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    Counting.computed = 0
    try:
        with pytest.raises(CheckpointError, match="is not writable"):
            dualhess.lanczos(Counting(S), 10, seed=0, checkpoint=folder / "run.npz")
    finally:
        folder.chmod(0o755)
    assert Counting.computed == 0


def test_missing_checkpoint_folder_is_created(tmp_path):
    path = tmp_path / "a" / "b" / "run.npz"
    r = dualhess.eigsh(DenseOperator(S), k=2, seed=0, checkpoint=path)
    assert path.parent.is_dir() and not path.exists()
    np.testing.assert_allclose(r.values, [30.0, 29.0])


@errors_table
def test_stale_temporary_files_are_removed_on_resume(tmp_path):
    path = tmp_path / "run.npz"
    _interrupted_checkpoint(path)
    # what a writer SIGKILLed mid-save leaves beside the checkpoint (tempfile's naming)
    stale = [tmp_path / "run.npz.k3j9x_2a.tmp", tmp_path / "run.npz.q0w1e2r3.tmp"]
    for item in stale:
        item.write_bytes(b"\0" * 4096)
    other = tmp_path / "other.npz.abc.tmp"  # another checkpoint's: not ours to remove
    other.write_bytes(b"\0")
    r = dualhess.eigsh(_resumed(), k=2, seed=0, checkpoint=path, checkpoint_every=2)
    np.testing.assert_allclose(r.values, [30.0, 29.0])
    assert not any(item.exists() for item in stale)
    assert other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.npz.abc.tmp"]


def test_stale_temporary_files_are_removed_on_save(tmp_path):
    from dualhess._checkpoint import Checkpoint

    path = tmp_path / "run.npz"
    ck = Checkpoint(path, DenseOperator(S), "trace", {"seed": 0})
    stale = tmp_path / "run.npz.zz9.tmp"
    stale.write_bytes(b"\0" * 128)
    ck.save({"step": 1})
    assert not stale.exists() and path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.npz"]
