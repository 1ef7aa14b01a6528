"""Exact references from the dense float64 Hessian, cached on disk by a content hash.

The cache key is a SHA-256 of the float64 parameter vector, the inputs and the labels, so a
cached spectrum is only reused for exactly the same model, weights and data. The diagonal is in torch
parameter order (``order="torch"``; other caches are recomputed). The full matrix is not stored (30-50 MB); its eigenvalues, diagonal and trace are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import numpy as np

from .models import Task, exact_hessian

__all__ = ["Reference", "task_key", "reference"]


@dataclasses.dataclass(frozen=True)
class Reference:
    """Eigenvalues (ascending), diagonal and trace of a task's exact Hessian."""

    eigenvalues: np.ndarray
    diagonal: np.ndarray
    seconds: float
    cached: bool

    @property
    def trace(self) -> float:
        return float(np.sum(self.diagonal))

    def top(self, k: int) -> np.ndarray:
        """The ``k`` largest eigenvalues, descending."""
        return self.eigenvalues[::-1][:k].copy()


def task_key(task: Task) -> str:
    """SHA-256 of the float64 parameters, inputs and labels (first 16 hex digits)."""
    digest = hashlib.sha256()
    for p in task.model.parameters():
        digest.update(p.detach().numpy().astype(np.float64).tobytes())
    digest.update(task.X.numpy().astype(np.float64).tobytes())
    digest.update(task.y.numpy().astype(np.int64).tobytes())
    return digest.hexdigest()[:16]


def reference(task: Task, cache_dir: Path | str | None = None) -> Reference:
    """The exact reference of ``task``, read from ``cache_dir`` when present, else computed.

    A computed reference is written to ``cache_dir/reference_<name>_<key>.npz``.
    """
    key = task_key(task)
    path = None if cache_dir is None else Path(cache_dir) / f"reference_{task.name}_{key}.npz"
    if path is not None and path.exists():
        with np.load(path) as data:
            if "order" in data and str(data["order"]) == "torch":
                return Reference(data["eigenvalues"], data["diagonal"], float(data["seconds"]), True)
    start = time.perf_counter()
    H = exact_hessian(task)
    eigenvalues = np.linalg.eigvalsh(H)
    diagonal = np.diag(H).copy()
    seconds = time.perf_counter() - start
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, eigenvalues=eigenvalues, diagonal=diagonal, seconds=seconds,
                            order=np.array("torch"))
    return Reference(eigenvalues, diagonal, seconds, False)
