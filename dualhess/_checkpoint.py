"""Checkpoint and resume for long runs.

How resuming works: the algorithms are deterministic given their integer ``seed`` and the
operator's products, so a checkpoint stores the products computed so far (with a hash of each
product's input). A re-run replays the algorithm: every product already in the file is read
back instead of computed (after checking that the algorithm asked for the very same input),
and the run continues from the first product that is missing. The result, ``num_matvecs``
included, is therefore exactly that of an uninterrupted run. The file holds
``n x num_matvecs`` numbers (the size of a Lanczos basis of the same length).

A checkpoint is one ``.npz`` file holding an algorithm's state plus a *fingerprint*: the
algorithm, its settings, the operator's size, dtype and type, and the product of the operator
with a fixed probe. Re-running the same call with the same ``checkpoint=`` path resumes from the
file and returns exactly what an uninterrupted run returns; a file made with other settings or
another operator is refused with :class:`CheckpointMismatchError`, never silently mixed in.

Writes are atomic (a temporary file ``<name>.<random>.tmp`` in the same folder, flushed and
``fsync``-ed, then ``os.replace``), so a process killed mid-write leaves the previous checkpoint
intact; the temporary copies such a kill leaves behind are removed by the next save or resume.
The file is removed when the run completes (``keep=True`` keeps it).

The path is checked before the first product is spent (not a directory, its folder a writable
directory, created when missing), and a file that is not a checkpoint (empty, truncated,
overwritten) is refused with :class:`~dualhess.CheckpointError` naming the file and the fix. The
file is always read with ``allow_pickle=False``: a checkpoint never runs code.

Fingerprinting costs one extra operator product per call (fresh or resumed); it is not counted
in the result's ``num_matvecs``.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ._array import default_rng, dtype_name, from_numpy, is_float64, to_numpy
from ._errors import CheckpointError, CheckpointMismatchError
from ._operator import Operator

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointMismatchError",
    "open_checkpoint",
    "checkpointed",
]

_PROBE_SEED = 20240601
#: Products between two saves when ``checkpoint_every`` is not given.
DEFAULT_EVERY = 10

_FIX = "delete the file or pass another checkpoint path"


def _check_path(path: Path, writer: bool) -> None:
    """Refuse a checkpoint path that could not be written, before any product is spent.

    The folder is created when missing (as the first save would); on the writing rank a
    temporary file is created and removed there, which also catches read-only file systems
    and folders without write permission (``os.access`` is not enough under root or ACLs).
    """
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint={str(path)!r} is a directory; pass a file path such as "
            f"{str(path / 'run.npz')!r}"
        )
    if path.exists() and not path.is_file():
        raise CheckpointError(
            f"checkpoint={str(path)!r} exists but is not a regular file; pass another "
            "checkpoint path"
        )
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise CheckpointError(
            f"checkpoint={str(path)!r}: its folder cannot be made ({exc.strerror}: a file stands "
            f"where a folder is needed, {exc.filename!r}); pass a path in an existing directory"
        ) from None
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint={str(path)!r}: its folder {str(parent)!r} cannot be created "
            f"({exc.strerror}); pass a path in a writable directory"
        ) from None
    if not writer:
        return
    try:
        fd, probe = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint={str(path)!r}: its folder {str(parent)!r} is not writable "
            f"({exc.strerror}); pass a path in a writable directory"
        ) from None
    os.close(fd)
    os.unlink(probe)


def _remove_stale_temporaries(path: Path) -> None:
    """Remove ``<name>.*.tmp`` copies left beside ``path`` by a writer killed mid-save."""
    for stale in path.parent.glob(path.name + ".*.tmp"):
        try:
            stale.unlink()
        except OSError:
            pass  # gone already, or not ours to remove: the next save tries again


def _canonical(settings: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in sorted(settings.items()):
        if isinstance(value, np.random.Generator):
            value = "<generator>"
        elif isinstance(value, (np.integer, np.floating)):
            value = value.item()
        elif not isinstance(value, (int, float, str, bool, type(None), list, tuple)):
            value = repr(value)
        out[key] = value
    return json.loads(json.dumps(out))


class Checkpoint:
    """The checkpoint of one algorithm run.

    Parameters
    ----------
    path : str or Path
        The ``.npz`` file.
    op : Operator
        The operator of the run (fingerprinted with one product).
    kind : str
        The algorithm (``"lanczos"``, ``"eigsh"``, ``"trace"``, ...).
    settings : dict
        Everything that determines the result (budgets, seed, method, ...). A checkpoint with
        different settings is refused.
    every : int
        Save every ``every`` steps (the unit is the algorithm's: Lanczos steps, product columns).
    keep : bool
        Keep the file after the run completes.

    Examples
    --------
    >>> import numpy as np, tempfile, os, dualhess
    >>> op = dualhess.DenseOperator(np.diag([3.0, 1.0]))
    >>> path = os.path.join(tempfile.mkdtemp(), "run.npz")
    >>> ck = Checkpoint(path, op, "demo", {"steps": 3, "seed": 0}, every=1)
    >>> ck.load() is None
    True
    >>> ck.save({"step": 1, "x": np.ones(2)})
    >>> int(Checkpoint(path, op, "demo", {"steps": 3, "seed": 0}, every=1).load()["step"])
    1
    """

    def __init__(
        self,
        path: str | os.PathLike,
        op: Operator,
        kind: str,
        settings: dict[str, Any],
        *,
        every: int = 1,
        keep: bool = False,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
            raise ValueError(f"checkpoint_every must be a positive int, got {every!r}")
        seed = settings.get("seed")
        if seed is None or isinstance(seed, np.random.Generator):
            raise ValueError(
                "checkpoint= needs an integer seed: with seed=None or a Generator a resumed run "
                "could not reproduce the uninterrupted one"
            )
        default_rng(seed)  # a negative seed is refused here, before the fingerprint product
        self.path = Path(path)
        _check_path(self.path, self._writer())
        self.every = int(every)
        self.keep = keep
        self.op = op
        self.meta = {
            "kind": kind,
            "settings": _canonical(settings),
            "n": op.n,
            "dtype": dtype_name(op.dtype),
            "operator": type(op).__name__,
        }
        count = op.num_matvecs
        probe = np.random.default_rng(_PROBE_SEED).standard_normal(op.n)
        self.probe_product = to_numpy(op.matvec(op.asarray(probe))).astype(np.float64)
        op.num_matvecs = count  # the fingerprint is not part of the algorithm's budget
        self._rtol = 1e-10 if is_float64(op.dtype) else 1e-4

    def due(self, step: int) -> bool:
        """Whether a save is due after ``step`` (1-based count of completed steps)."""
        return step % self.every == 0

    def load(self) -> dict[str, np.ndarray] | None:
        """The saved state, ``None`` when there is no file; refuses a foreign checkpoint."""
        if self._writer():
            _remove_stale_temporaries(self.path)
        if not self.path.exists():
            return None
        state, meta, probe_product = self._read()
        for key in ("kind", "n", "dtype", "operator", "settings"):
            if meta.get(key) != self.meta[key]:
                raise CheckpointMismatchError(
                    f"checkpoint {self.path} was made by another run: its {key} is "
                    f"{meta.get(key)!r}, this run's is {self.meta[key]!r}. Delete the file or "
                    "pass another checkpoint path."
                )
        scale = max(float(np.linalg.norm(self.probe_product)), np.finfo(float).tiny)
        diff = float(np.linalg.norm(probe_product - self.probe_product)) / scale
        if diff > self._rtol:
            raise CheckpointMismatchError(
                f"checkpoint {self.path} was made with another operator (its products differ "
                f"by {diff:.2e} relative); delete the file or pass another checkpoint path"
            )
        return state

    def _corrupt(self, why: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {str(self.path)!r} is not a readable dualhess checkpoint ({why}); it "
            f"may be truncated, empty or overwritten: {_FIX} (the run then starts afresh)"
        )

    def _read(self) -> tuple[dict[str, np.ndarray], dict[str, Any], np.ndarray]:
        """The file's arrays, its metadata and its fingerprint; CheckpointError when the file
        is not a checkpoint (never loaded with ``allow_pickle``)."""
        if self.path.stat().st_size == 0:
            raise self._corrupt("the file is empty")
        try:
            data = np.load(self.path, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            why = "not an .npz archive" if isinstance(exc, (ValueError, zipfile.BadZipFile)) else str(exc)
            raise self._corrupt(why) from None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise self._corrupt("a single .npy array, not an .npz archive")
        try:
            with data:
                state = {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError):
            raise self._corrupt("an entry of the archive cannot be read") from None
        try:
            meta = json.loads(str(state.pop("__meta__")))
            probe_product = np.asarray(state.pop("__probe_product__"), dtype=np.float64)
        except (KeyError, ValueError, TypeError):
            raise self._corrupt("no dualhess metadata in the archive") from None
        if not isinstance(meta, dict) or probe_product.shape != self.probe_product.shape:
            raise self._corrupt("its metadata is malformed")
        return state, meta, probe_product

    @staticmethod
    def _writer() -> bool:
        """Under ``torchrun`` every rank runs the same algorithm; only rank 0 writes."""
        return os.environ.get("RANK", "0") == "0"

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` (arrays and scalars; native arrays are moved to numpy) atomically.

        Under ``torch.distributed`` (``RANK`` set by ``torchrun``) only rank 0 writes; every
        rank reads the same file when resuming.
        """
        if not self._writer():
            return
        arrays = {k: to_numpy(v) if hasattr(v, "shape") else np.asarray(v) for k, v in state.items()}
        arrays["__meta__"] = np.asarray(json.dumps(self.meta))
        arrays["__probe_product__"] = self.probe_product
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(self.path)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def finish(self) -> None:
        """The run completed: remove the file unless ``keep``."""
        if not self.keep and self._writer() and self.path.exists():
            self.path.unlink()


def open_checkpoint(
    path: str | os.PathLike | None,
    op: Operator,
    kind: str,
    settings: dict[str, Any],
    every: int | None,
) -> Checkpoint | None:
    """A :class:`Checkpoint` when ``path`` is given, else ``None`` (no checkpointing)."""
    if path is None:
        return None
    return Checkpoint(path, op, kind, settings, every=DEFAULT_EVERY if every is None else every)


class _ReplayOperator(Operator):
    """Wraps an operator: products come from the checkpoint when there, else are computed
    ``every`` columns at a time and saved."""

    def __init__(self, op: Operator, ckpt: Checkpoint) -> None:
        super().__init__(op.shape, op.dtype, like=op._like, check_finite=op.check_finite)
        self.parent = op
        self.layout = getattr(op, "layout", None)
        self.ckpt = ckpt
        state = ckpt.load() or {}
        try:
            count = int(state.get("num_calls", 0))
            self.inputs: list[str] = [str(state[f"in{i}"]) for i in range(count)]
            self.outputs: list[np.ndarray] = [np.asarray(state[f"out{i}"]) for i in range(count)]
        except (KeyError, ValueError, TypeError):
            raise ckpt._corrupt("its saved products are incomplete") from None
        if any(out.ndim != 2 or out.shape[0] != op.n for out in self.outputs):
            raise ckpt._corrupt("its saved products have the wrong shape")
        self.call = 0
        self.since_save = 0

    def exact_diagonal(self) -> Any:
        return self.parent.exact_diagonal()

    def exact_trace(self) -> float:
        return self.parent.exact_trace()

    def _save(self) -> None:
        state: dict[str, Any] = {"num_calls": len(self.outputs)}
        for i, (digest, out) in enumerate(zip(self.inputs, self.outputs)):
            state[f"in{i}"] = np.asarray(digest)
            state[f"out{i}"] = out
        self.ckpt.save(state)
        self.since_save = 0

    def _matmat(self, V: Any) -> Any:
        import hashlib

        host = np.ascontiguousarray(to_numpy(V))
        digest = hashlib.sha256(host.tobytes()).hexdigest()
        i = self.call
        self.call += 1
        if i < len(self.inputs):
            if self.inputs[i] != digest:
                raise CheckpointMismatchError(
                    f"checkpoint {self.ckpt.path}: product {i} of the resumed run has another "
                    "input than the checkpointed run (the run is not the same); delete the file"
                )
            done = self.outputs[i]
        else:
            self.inputs.append(digest)
            done = np.zeros((host.shape[0], 0), dtype=host.dtype)
            self.outputs.append(done)
        k = host.shape[1]
        while done.shape[1] < k:
            # whole chunks, so that a checkpoint is due exactly every `every` products
            step = min(self.ckpt.every - self.since_save, k - done.shape[1])
            chunk = V[:, done.shape[1] : done.shape[1] + step]
            part = to_numpy(self.parent.matmat(chunk))
            done = np.concatenate([done, part], axis=1)
            self.outputs[i] = done
            self.since_save += step
            if self.since_save >= self.ckpt.every:
                self._save()
        return from_numpy(done, self._like)


class checkpointed:
    """Context manager: the operator to run an algorithm on, with checkpoint and resume.

    ``with checkpointed(op, path, every, kind, settings) as work: ...`` gives ``op`` itself
    when ``path`` is None; otherwise a wrapper that replays saved products and saves new
    ones. On normal exit the checkpoint file is removed; after an exception (or a kill) it
    stays, and the same call resumes from it.
    """

    def __init__(
        self,
        op: Operator,
        path: str | os.PathLike | None,
        every: int | None,
        kind: str,
        settings: dict[str, Any],
    ) -> None:
        self.ckpt = open_checkpoint(path, op, kind, settings, every)
        self.work = op if self.ckpt is None else _ReplayOperator(op, self.ckpt)

    def __enter__(self) -> Operator:
        return self.work

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None and self.ckpt is not None:
            self.ckpt.finish()
