"""Operators that wrap another operator: on the host, in another order, or one block of it.

- :class:`HostOperator`: the same operator on numpy vectors (products still run in the inner
  operator's framework and device); optionally in another flat order (an alignment).
- :class:`PermutedOperator`: the operator in another flat parameter order, ``P^T H P``, on
  the native arrays.
- :class:`BlockOperator`: the principal submatrix ``H[S, S]`` of a group of parameters.

Examples
--------
>>> import numpy as np
>>> from dualhess import DenseOperator, ParamLayout
>>> from dualhess._wrappers import BlockOperator, HostOperator
>>> op = DenseOperator(np.diag([0.0, 4.0, 8.0]))
>>> op.layout = ParamLayout.from_shapes([("w", (2,)), ("b", (1,))])
>>> BlockOperator(HostOperator(op), ["b"]).to_dense()
array([[8.]])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._alignment import Alignment
from ._array import array_namespace, device, is_float64, to_numpy
from ._operator import Operator, ParamEntry, ParamLayout

__all__ = ["HostOperator", "PermutedOperator", "BlockOperator"]


class PermutedOperator(Operator):
    """An operator seen in another flat parameter order: ``P^T H P``.

    ``inner`` acts on vectors in order *b*; this operator acts on vectors in order *a*, with
    ``v_b = v_a[align.perm]`` (see :class:`~dualhess.alignment.Alignment`). The permutation
    runs on the native arrays (no host round trip). Used to present the JAX twin's Hessian in
    the PyTorch order so both frameworks see identical probes.

    Examples
    --------
    >>> import numpy as np
    >>> from dualhess import DenseOperator
    >>> from dualhess import Alignment
    >>> op = PermutedOperator(DenseOperator(np.diag([1.0, 2.0, 3.0])), Alignment([2, 0, 1]))
    >>> op @ np.ones(3)
    array([2., 3., 1.])
    """

    def __init__(self, inner: Operator, align: Alignment) -> None:
        if align.n != inner.n:
            raise ValueError(f"the alignment is for n={align.n}, the operator has n={inner.n}")
        super().__init__(inner.shape, inner.dtype, like=inner._like, chunk_size=None,
                         check_finite=False)
        self.inner = inner
        self.align = align
        xp = array_namespace(inner._like)
        self._perm = xp.asarray(align.perm)
        self._inverse = xp.asarray(align.inverse)
        self.method = getattr(inner, "method", None)

    def _matmat(self, V: Any) -> Any:
        xp = array_namespace(V)
        out = self.inner.matmat(xp.take(V, self._perm, axis=0))
        return xp.take(out, self._inverse, axis=0)

    def _matvec(self, v: Any) -> Any:
        xp = array_namespace(v)
        return xp.take(self.inner.matvec(xp.take(v, self._perm, axis=0)), self._inverse, axis=0)

    def exact_trace(self) -> float:
        return self.inner.exact_trace()  # the trace does not depend on the order

    # the loss behind the operator, in this order (loss landscapes, gradient overlaps)
    def loss_at(self, delta: Any) -> float:
        return self.inner.loss_at(array_namespace(delta).take(delta, self._perm, axis=0))

    def gradient(self) -> Any:
        g = self.inner.gradient()
        return array_namespace(g).take(g, self._inverse, axis=0)


class HostOperator(Operator):
    """An operator whose vectors live on the host as numpy arrays; products run in ``inner``.

    Every product moves the block of vectors to ``inner``'s framework and device, applies
    ``inner`` there, and brings the result back, optionally reordered by an alignment
    (``v_b = v_a[align.perm]``, as in :class:`PermutedOperator`). The algorithms' own vector
    work (reorthogonalisation, Rayleigh-Ritz, probes) then runs in numpy. Used for operators
    whose arrays dispatch op by op with a compilation per new shape (``op.fixed_shapes``,
    JAX), where the many small vector operations of Lanczos are far slower than numpy, while
    the products stay compiled on the device. The host dtype is float64 for a float64
    operator and float32 otherwise (numpy has no bfloat16).

    Examples
    --------
    >>> import numpy as np
    >>> from dualhess import DenseOperator
    >>> op = HostOperator(DenseOperator(np.diag([1.0, 2.0, 3.0])))
    >>> op @ np.ones(3)
    array([1., 2., 3.])
    """

    def __init__(self, inner: Operator, align: Alignment | None = None) -> None:
        if align is not None and align.n != inner.n:
            raise ValueError(f"the alignment is for n={align.n}, the operator has n={inner.n}")
        host_dtype = np.float64 if is_float64(inner.dtype) else np.float32
        super().__init__(inner.shape, np.dtype(host_dtype), like=np.zeros(0, dtype=host_dtype),
                         chunk_size=None, check_finite=False)
        self.inner = inner
        self.align = align
        self.method = getattr(inner, "method", None)
        self.layout = getattr(inner, "layout", None) if align is None else None

    def _matmat(self, V: Any) -> Any:
        if self.align is not None:
            V = self.align.a_to_b(V)
        out = to_numpy(self.inner.matmat(self.inner.asarray(V))).astype(self.dtype, copy=False)
        return out if self.align is None else self.align.b_to_a(out)

    def _matvec(self, v: Any) -> Any:
        if self.align is not None:
            return self._matmat(v.reshape(-1, 1)).reshape(-1)
        # the inner matvec directly: no eager slice/reshape of a jax block (each compiled
        # once per shape, ~1 s of first-call compilation per process at n = 176,402)
        return to_numpy(self.inner.matvec(self.inner.asarray(v))).astype(self.dtype, copy=False)

    def exact_trace(self) -> float:
        return self.inner.exact_trace()  # the trace does not depend on the order

    # the loss behind the operator, on host vectors in this order
    def _to_host(self, x: Any) -> np.ndarray:
        out = to_numpy(x).astype(self.dtype, copy=False)
        return out if self.align is None else self.align.b_to_a(out)

    def loss_at(self, delta: Any) -> float:
        delta = np.asarray(delta)
        if self.align is not None:
            delta = self.align.a_to_b(delta)
        return self.inner.loss_at(self.inner.asarray(delta))

    def gradient(self) -> np.ndarray:
        return self._to_host(self.inner.gradient())

    @property
    def params_flat(self) -> np.ndarray:
        """The inner operator's parameters (where it exposes them), on the host, in this order."""
        inner = getattr(self.inner, "params_flat", None)
        if inner is None:
            raise AttributeError(f"{type(self.inner).__name__} exposes no params_flat")
        return self._to_host(inner)


class BlockOperator(Operator):
    """The principal submatrix ``H[S, S]`` of an operator for a group of parameters ``S``.

    A block vector is padded with zeros to the full length, multiplied by the full operator,
    and restricted back to ``S``: one full product per block product, exact, and for any
    framework.

    Parameters
    ----------
    op : Operator
        The full operator; must have a ``layout``.
    names : sequence of str or callable
        The parameters of the block (names or a predicate on names).

    Examples
    --------
    >>> import numpy as np
    >>> from dualhess import DenseOperator, ParamLayout
    >>> op = DenseOperator(np.diag([0.0, 4.0, 8.0]))
    >>> op.layout = ParamLayout.from_shapes([("w", (2,)), ("b", (1,))])
    >>> BlockOperator(op, ["b"]).to_dense()
    array([[8.]])
    """

    def __init__(self, op: Operator, names: Sequence[str] | Callable[[str], bool]) -> None:
        layout = getattr(op, "layout", None)
        if layout is None:
            raise ValueError(
                "BlockOperator needs an operator with a parameter layout (op.layout); "
                "backend operators have one, for a DenseOperator set op.layout = ParamLayout..."
            )
        if layout.size != op.n:
            raise ValueError(f"op.layout has size {layout.size} but the operator has n={op.n}")
        self.parent = op
        self.entries: list[ParamEntry] = layout.select(names)
        self.layout = ParamLayout.from_shapes((e.name, e.shape) for e in self.entries)
        self._chosen = {e.name for e in self.entries}
        like = op.asarray(np.zeros(0))
        super().__init__(
            (self.layout.size, self.layout.size),
            op.dtype,
            like=like,
            chunk_size=op.chunk_size,
            check_finite=op.check_finite,
        )

    def _matmat(self, V: Any) -> Any:
        xp = array_namespace(V)
        k = V.shape[1]
        pieces = []
        for entry in self.parent.layout:
            if entry.name in self._chosen:
                own = self.layout[entry.name]
                pieces.append(V[own.start : own.stop, :])
            else:
                pieces.append(xp.zeros((entry.size, k), dtype=V.dtype, device=device(V)))
        full = self.parent.matmat(xp.concat(pieces, axis=0))
        return xp.concat([full[e.start : e.stop, :] for e in self.entries], axis=0)

    def exact_diagonal(self) -> Any:
        diag = self.parent.exact_diagonal()
        xp = array_namespace(diag)
        return xp.concat([diag[e.start : e.stop] for e in self.entries])

    # the loss along the block's parameters, the others fixed
    def loss_at(self, delta: Any) -> float:
        xp = array_namespace(delta)
        pieces = []
        for entry in self.parent.layout:
            if entry.name in self._chosen:
                own = self.layout[entry.name]
                pieces.append(delta[own.start : own.stop])
            else:
                pieces.append(xp.zeros((entry.size,), dtype=delta.dtype, device=device(delta)))
        return self.parent.loss_at(xp.concat(pieces))

    def gradient(self) -> Any:
        g = self.parent.gradient()
        return array_namespace(g).concat([g[e.start : e.stop] for e in self.entries])
