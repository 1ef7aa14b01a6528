"""Checkpoint and resume for long runs.

A checkpoint is one ``.npz`` file holding an algorithm's state plus a *fingerprint*: the
algorithm, its settings, the operator's size, dtype and type, and the product of the operator
with a fixed probe. Re-running the same call with the same ``checkpoint=`` path resumes from the
file and returns exactly what an uninterrupted run returns; a file made with other settings or
another operator is refused with :class:`CheckpointMismatchError`, never silently mixed in.

Writes are atomic (a temporary file in the same folder, flushed and ``fsync``-ed, then
``os.replace``), so a process killed mid-write leaves the previous checkpoint intact. The file is
removed when the run completes (``keep=True`` keeps it).

Fingerprinting costs one extra operator product per call (fresh or resumed); it is not counted
in the result's ``num_matvecs``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ._array import dtype_name, is_float64, to_numpy
from .operator import Operator

__all__ = ["Checkpoint", "CheckpointMismatchError", "open_checkpoint"]

_PROBE_SEED = 20240601


class CheckpointMismatchError(ValueError):
    """The checkpoint file belongs to another run (other settings or another operator)."""


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
    >>> ck = Checkpoint(path, op, "demo", {"steps": 3}, every=1)
    >>> ck.load() is None
    True
    >>> ck.save({"step": 1, "x": np.ones(2)})
    >>> int(Checkpoint(path, op, "demo", {"steps": 3}, every=1).load()["step"])
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
        self.path = Path(path)
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
        if not self.path.exists():
            return None
        with np.load(self.path, allow_pickle=False) as data:
            state = {k: data[k] for k in data.files}
        meta = json.loads(str(state.pop("__meta__")))
        probe_product = state.pop("__probe_product__")
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

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` (arrays and scalars; native arrays are moved to numpy) atomically."""
        arrays = {k: to_numpy(v) if hasattr(v, "shape") else np.asarray(v) for k, v in state.items()}
        arrays["__meta__"] = np.asarray(json.dumps(self.meta))
        arrays["__probe_product__"] = self.probe_product
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
        if not self.keep and self.path.exists():
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
    return Checkpoint(path, op, kind, settings, every=1 if every is None else every)
