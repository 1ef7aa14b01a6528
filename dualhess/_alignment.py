"""Alignment between the flat parameter orders of two operators (e.g. torch and JAX)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["Alignment"]


class Alignment:
    """A permutation between two flat parameter orders, with named blocks.

    ``v_b = v_a[perm]``: entry ``i`` of a vector in order *b* is entry ``perm[i]`` of the
    same vector in order *a*. ``blocks`` names groups of indices in order *a* (one per
    parameter tensor, e.g. ``"conv1.weight"``), for per-block comparisons.

    Examples
    --------
    >>> import numpy as np
    >>> al = Alignment(np.array([2, 0, 1]), blocks=[("w", np.array([0, 1])), ("b", np.array([2]))])
    >>> al.a_to_b(np.array([10.0, 20.0, 30.0]))
    array([30., 10., 20.])
    >>> al.b_to_a(al.a_to_b(np.array([10.0, 20.0, 30.0])))
    array([10., 20., 30.])
    """

    def __init__(
        self,
        perm: Sequence[int] | np.ndarray,
        blocks: Sequence[tuple[str, Sequence[int] | np.ndarray]] | None = None,
    ) -> None:
        perm = np.asarray(perm, dtype=np.int64).reshape(-1)
        n = perm.shape[0]
        if not np.array_equal(np.sort(perm), np.arange(n)):
            raise ValueError("Alignment: perm is not a permutation of 0..n-1")
        self.perm = perm
        self.inverse = np.empty_like(perm)
        self.inverse[perm] = np.arange(n)
        if blocks is None:
            blocks = [("all", np.arange(n))]
        self.blocks: list[tuple[str, np.ndarray]] = [
            (str(name), np.asarray(idx, dtype=np.int64).reshape(-1)) for name, idx in blocks
        ]
        covered = np.concatenate([idx for _, idx in self.blocks]) if self.blocks else np.zeros(0, int)
        if covered.shape[0] != n or not np.array_equal(np.sort(covered), np.arange(n)):
            raise ValueError("Alignment: blocks must partition 0..n-1 (order a)")

    @classmethod
    def identity(cls, n: int, blocks: Sequence[tuple[str, Sequence[int]]] | None = None) -> Alignment:
        return cls(np.arange(n), blocks)

    @property
    def n(self) -> int:
        return int(self.perm.shape[0])

    def a_to_b(self, v: np.ndarray) -> np.ndarray:
        """Reorder a numpy vector (or ``(n, k)`` matrix) from order *a* to order *b*."""
        return np.asarray(v)[self.perm]

    def b_to_a(self, v: np.ndarray) -> np.ndarray:
        """Reorder a numpy vector (or ``(n, k)`` matrix) from order *b* to order *a*."""
        return np.asarray(v)[self.inverse]

    def __repr__(self) -> str:
        return f"Alignment(n={self.n}, blocks={len(self.blocks)})"
