"""The one seam: a symmetric linear operator on a flat parameter vector.

Every curvature matrix in dualhess (Hessian, GGN, Fisher, a dense test matrix) is an
:class:`Operator`. The algorithms only ever call :meth:`Operator.matvec` and
:meth:`Operator.matmat`, so they run unchanged on numpy, torch and jax arrays.

Following :class:`scipy.sparse.linalg.LinearOperator`, a subclass implements *one* of
``_matvec`` (``(n,) -> (n,)``) or ``_matmat`` (``(n, k) -> (n, k)``); the base class
supplies the other, input checks, the product counter, chunking of ``matmat`` by
``chunk_size`` columns, ``@``, :meth:`to_scipy` and :meth:`to_dense`.

Examples
--------
>>> import numpy as np
>>> from dualhess import DenseOperator
>>> op = DenseOperator(np.diag([3.0, 1.0, -2.0]))
>>> op @ np.ones(3)
array([ 3.,  1., -2.])
>>> op.num_matvecs
1
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ._array import (
    array_namespace,
    compiles_per_shape,
    device,
    dtype_eps,
    dtype_name,
    from_numpy,
    places_itself,
    to_numpy,
)
from ._errors import ExactUnavailableError, LossUnavailableError, OperatorError

__all__ = [
    "Operator",
    "DenseOperator",
    "ParamLayout",
    "ParamEntry",
    "ExactUnavailableError",
    "OperatorError",
    "DEFAULT_DENSE_LIMIT",
]

#: Largest ``n`` :meth:`Operator.to_dense` builds without an explicit ``max_size``.
DEFAULT_DENSE_LIMIT = 8192




def _namespace_name(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return "numpy"
    return array_namespace(x).__name__.replace("array_api_compat.", "").split(".")[0]


class Operator:
    """A symmetric ``n x n`` linear operator acting on native 1-D / 2-D arrays.

    Parameters
    ----------
    shape : tuple of int
        ``(n, n)``.
    dtype : dtype
        The native dtype of vectors the operator accepts and returns.
    like : array, optional
        A native array (any shape) whose namespace, dtype and device define the
        operator's vectors. Used by :meth:`asarray` to turn numpy probes into native
        arrays. Defaults to numpy float64.
    chunk_size : int, optional
        At most this many columns go through one vectorised ``_matmat`` call, so peak
        memory is ``chunk_size`` times that of one product. ``None``: all columns at once.
    check_finite : bool
        Raise :class:`OperatorError` when a product contains NaN or Inf (default True).

    Notes
    -----
    Subclasses implement ``_matvec(v)`` or ``_matmat(V)``. They may also override
    :meth:`exact_diagonal` (and :meth:`exact_trace`) when an exact diagonal is available.
    """

    layout: ParamLayout | None = None
    #: Whether every product is a new array that nothing else references, so that an
    #: algorithm may overwrite it (a host or disk basis orthogonalises it in place instead of
    #: copying it). False unless a subclass guarantees it: a wrapper that returns stored
    #: products (a checkpoint replay) must not see them changed.
    owns_outputs: bool = False

    def __init__(
        self,
        shape: tuple[int, int],
        dtype: Any = None,
        *,
        like: Any = None,
        chunk_size: int | None = None,
        check_finite: bool = True,
    ) -> None:
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2 or shape[0] != shape[1]:
            raise OperatorError(f"an Operator is square (n, n); got shape {shape}")
        if shape[0] < 1:
            raise OperatorError(f"an Operator needs n >= 1; got shape {shape}")
        if like is None:
            like = np.zeros(0, dtype=np.float64 if dtype is None else dtype)
        self.shape: tuple[int, int] = shape
        self.dtype = like.dtype if dtype is None else dtype
        self._like = like
        self.chunk_size = chunk_size
        self.check_finite = check_finite
        self.num_matvecs = 0
        if type(self)._matvec is Operator._matvec and type(self)._matmat is Operator._matmat:
            raise TypeError(f"{type(self).__name__} must implement _matvec or _matmat")

    # ------------------------------------------------------------------ properties
    @property
    def n(self) -> int:
        """The dimension ``n``."""
        return self.shape[0]

    @property
    def chunk_size(self) -> int | None:
        """How many columns one vectorised product takes in :meth:`matmat`."""
        return self._chunk_size

    @chunk_size.setter
    def chunk_size(self, value: int | None) -> None:
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise OperatorError(f"chunk_size must be a positive int or None, got {value!r}")
        self._chunk_size = None if value is None else int(value)

    @property
    def xp(self) -> Any:
        """The array namespace of the operator's vectors."""
        return array_namespace(self._like)

    @property
    def device(self) -> Any:
        """The device of the operator's vectors (``None`` when not checked)."""
        try:
            return device(self._like)
        except Exception:  # pragma: no cover - exotic arrays
            return None

    @property
    def framework(self) -> str:
        """``'numpy'``, ``'torch'`` or ``'jax'``: a label for reports, never a switch."""
        return _namespace_name(self._like)

    @property
    def fixed_shapes(self) -> bool:
        """Capability flag: eager array operations on this operator's vectors compile once
        per distinct shape (JAX), so algorithms keep their array shapes fixed or run their
        bookkeeping on the host (:class:`~dualhess._wrappers.HostOperator`). Default: what
        the array library of the vectors does; an operator class may override it."""
        return compiles_per_shape(self._like)

    # ------------------------------------------------------------------ conversions
    def asarray(self, x: Any) -> Any:
        """Convert a numpy (or any) array to a native array of the operator's dtype/device."""
        if not isinstance(x, np.ndarray):
            x = to_numpy(x)
        if x.dtype.kind != "f":  # integers, booleans: through float64
            x = np.asarray(x, dtype=np.float64)
        # A floating array goes as it is (one cast, to the operator's dtype): a float32
        # vector went through a float64 copy first, 950 MB beside GPT-2 small's 475 MB.
        return from_numpy(x, self._like)

    @staticmethod
    def to_numpy(x: Any) -> np.ndarray:
        """Return a native array as numpy on the host."""
        return to_numpy(x)

    # ------------------------------------------------------------------ checks
    def _check_input(self, x: Any, ndim: int) -> None:
        what = "vector" if ndim == 1 else "matrix"
        expected = "(n,)" if ndim == 1 else "(n, k)"
        shape = getattr(x, "shape", None)
        if shape is None:
            raise OperatorError(
                f"expected a native {what} of shape {expected} with n={self.n}, "
                f"got {type(x).__name__}"
            )
        if _namespace_name(x) != self.framework:
            raise OperatorError(
                f"this operator works on {self.framework} arrays, got a "
                f"{_namespace_name(x)} array; convert it with op.asarray(...)"
            )
        if len(shape) != ndim or shape[0] != self.n or (ndim == 2 and shape[1] < 1):
            raise OperatorError(
                f"expected a {what} of shape {expected} with n={self.n}, got shape {tuple(shape)}"
            )
        if x.dtype != self.dtype:
            raise OperatorError(
                f"dtype mismatch: the operator is {dtype_name(self.dtype)}, the {what} is "
                f"{dtype_name(x.dtype)}; convert with op.asarray(...) or .to(dtype)"
            )
        own = self.device
        if own is not None:
            try:
                dev = device(x)
            except Exception:  # pragma: no cover
                dev = own
            if str(dev) != str(own) and not places_itself(self._like):
                raise OperatorError(
                    f"device mismatch: the operator lives on {own}, the {what} on {dev}"
                )

    def _check_output(self, y: Any) -> Any:
        if self.check_finite:
            xp = array_namespace(y)
            # A sum of numbers is finite only if every number is (a NaN or an Inf makes it
            # NaN or Inf), so one reduction proves a finite output; only a non-finite sum
            # (a bad entry, or finite entries overflowing) is checked entry by entry.
            # ``isfinite`` on every entry made three temporaries of the output's size:
            # 1.4 s of a 3.8 s product on GPT-2 small (124M parameters).
            if not bool(xp.isfinite(xp.sum(y))) and not bool(xp.all(xp.isfinite(y))):
                raise OperatorError(
                    f"{type(self).__name__} produced NaN or Inf; check the parameters, "
                    "the data and the loss for non-finite values"
                )
        return y

    # ------------------------------------------------------------------ products
    def _matvec(self, v: Any) -> Any:
        xp = array_namespace(v)
        return xp.reshape(self._matmat(xp.reshape(v, (-1, 1))), (-1,))

    def _matmat(self, V: Any) -> Any:
        xp = array_namespace(V)
        cols = [self._matvec(V[:, j]) for j in range(V.shape[1])]
        return xp.stack(cols, axis=1)

    def matvec(self, v: Any) -> Any:
        """Return ``H @ v`` for a native vector of shape ``(n,)``."""
        self._check_input(v, 1)
        y = self._matvec(v)
        self.num_matvecs += 1
        return self._check_output(y)

    def matmat(self, V: Any) -> Any:
        """Return ``H @ V`` for a native matrix of shape ``(n, k)``, ``chunk_size`` columns at a time."""
        self._check_input(V, 2)
        k = V.shape[1]
        xp = array_namespace(V)
        step = k if self.chunk_size is None else self.chunk_size
        if k == 1 and type(self)._matvec is not Operator._matvec:
            out = xp.reshape(self._matvec(V[:, 0]), (-1, 1))
        elif step >= k:
            out = self._matmat(V)
        else:
            out = xp.concat([self._matmat(V[:, j : j + step]) for j in range(0, k, step)], axis=1)
        self.num_matvecs += k
        return self._check_output(out)

    def __matmul__(self, x: Any) -> Any:
        ndim = len(getattr(x, "shape", ()))
        if ndim == 1:
            return self.matvec(x)
        if ndim == 2:
            return self.matmat(x)
        raise OperatorError(f"op @ x needs a 1-D or 2-D array, got {ndim}-D")

    def reset_counter(self) -> None:
        """Set :attr:`num_matvecs` back to zero."""
        self.num_matvecs = 0

    # ------------------------------------------------------------------ exact quantities
    def exact_diagonal(self) -> Any:
        """The exact diagonal as a native ``(n,)`` array, where the operator can provide it.

        Raises
        ------
        ExactUnavailableError
            When the operator has no exact diagonal (use ``method='xdiag'``).
        """
        raise ExactUnavailableError(
            f"{type(self).__name__} has no exact diagonal; use a stochastic estimate "
            "(dualhess.diagonal(op, method='xdiag') or dualhess.trace(op, method='xtrace'))"
        )

    def exact_trace(self) -> float:
        """The exact trace, where the operator can provide it (sum of the exact diagonal)."""
        return float(np.sum(to_numpy(self.exact_diagonal()), dtype=np.float64))

    # ------------------------------------------------------------------ the loss behind it
    def loss_at(self, delta: Any) -> float:
        """The whole-data-set loss at ``theta + delta``, where the operator has a loss.

        Backend curvature operators (Hessian, GGN, Fisher in either framework) evaluate the
        loss they are the curvature of, over the same data and with the same weighting, at
        the parameters shifted by ``delta``. Loss landscapes (:func:`dualhess.loss_landscape`)
        are built from it.

        Parameters
        ----------
        delta : native array, shape (n,)
            The shift, in the operator's flat parameter order (``op.layout``).

        Raises
        ------
        LossUnavailableError
            When the operator is a plain matrix with no loss behind it.
        """
        raise self._no_loss("loss_at()")

    def gradient(self) -> Any:
        """The gradient of the whole-data-set loss at ``theta``, a native ``(n,)`` vector.

        Raises
        ------
        LossUnavailableError
            When the operator is a plain matrix with no loss behind it.
        """
        raise self._no_loss("gradient()")

    def _no_loss(self, call: str) -> LossUnavailableError:
        return LossUnavailableError(
            f"{type(self).__name__} has no loss behind it, so {call} is not available: "
            "loss_at() and gradient() need a backend curvature operator "
            "(torch_backend.hessian, jax_backend.hessian, ...); for a matrix of your own, "
            "subclass the operator and implement loss_at/gradient"
        )

    # ------------------------------------------------------------------ interop
    def to_scipy(self) -> Any:
        """A :class:`scipy.sparse.linalg.LinearOperator` on numpy float64 vectors.

        Each product converts to the native array type and back, so
        ``scipy.sparse.linalg.eigsh(op.to_scipy(), k=5)`` and ``cg`` work directly.
        """
        from scipy.sparse.linalg import LinearOperator

        def mv(v: np.ndarray) -> np.ndarray:
            v = np.asarray(v).reshape(-1)
            return to_numpy(self.matvec(self.asarray(v))).astype(np.float64)

        def mm(V: np.ndarray) -> np.ndarray:
            return to_numpy(self.matmat(self.asarray(np.asarray(V)))).astype(np.float64)

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mm, dtype=np.float64)

    def to_dense(self, max_size: int | None = None) -> Any:
        """The full ``n x n`` matrix as a native array, built column block by column block.

        Parameters
        ----------
        max_size : int, optional
            Refuse when ``n`` exceeds this (default :data:`DEFAULT_DENSE_LIMIT`), since the
            result takes ``8 n^2`` bytes in float64 and ``n`` products.
        """
        limit = DEFAULT_DENSE_LIMIT if max_size is None else int(max_size)
        if self.n > limit:
            gib = 8 * self.n**2 / 2**30
            raise OperatorError(
                f"to_dense() refuses n={self.n} > max_size={limit}: the matrix would need "
                f"{gib:.1f} GiB and {self.n} products. Use the matrix-free algorithms "
                "(eigsh, trace, density) or pass max_size= explicitly."
            )
        eye = self.asarray(np.eye(self.n))
        return self.matmat(eye)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={self.n}, dtype={dtype_name(self.dtype)}, "
            f"framework={self.framework}, num_matvecs={self.num_matvecs})"
        )


class DenseOperator(Operator):
    """An operator backed by an explicit symmetric matrix (numpy, torch or jax, 2-D).

    Parameters
    ----------
    matrix : array of shape (n, n)
        A square, symmetric matrix. Every algorithm assumes symmetry, so a matrix whose
        asymmetry exceeds rounding, ``||A - A^T||_F > 100 eps n ||A||_F`` (``eps`` of the
        matrix's dtype, float64 for integers), is refused with :class:`OperatorError`.
        Symmetrise such a matrix first (``(A + A.T) / 2``) if that is what you mean.
        An integer or boolean matrix is converted to float64 (as ``numpy.linalg.eigh`` and
        ``scipy.sparse.linalg.eigsh`` do): the algorithms' vectors and Krylov coefficients
        are real numbers, so products in an integer dtype would truncate them, and integers
        up to 2**53 are exact in float64. ``op.dtype`` is then float64 (the array library's
        default float where it has no float64, e.g. JAX without x64). A complex matrix is
        refused: a Hessian is real symmetric.
    chunk_size : int, optional
        See :class:`Operator`.
    check_symmetric : bool
        Verify the symmetry (default True; one host pass over the matrix). ``False`` skips
        the check for a matrix known to be symmetric; the results are meaningless otherwise.
    check_finite : bool
        See :class:`Operator`.

    Examples
    --------
    >>> import numpy as np, dualhess
    >>> op = dualhess.DenseOperator(np.diag(np.arange(1.0, 11.0)))
    >>> dualhess.eigsh(op, k=2, seed=0).values
    array([10.,  9.])
    """

    def __init__(
        self,
        matrix: Any,
        *,
        chunk_size: int | None = None,
        check_symmetric: bool = True,
        check_finite: bool = True,
    ) -> None:
        shape = getattr(matrix, "shape", None)
        if shape is None:
            matrix = np.asarray(matrix, dtype=np.float64)
            shape = matrix.shape
        if len(shape) != 2 or shape[0] != shape[1]:
            raise OperatorError(f"DenseOperator needs a square 2-D matrix, got shape {tuple(shape)}")
        kind = dtype_name(matrix.dtype)
        if kind.startswith("complex"):
            raise OperatorError(
                f"DenseOperator: the matrix is {kind}; a Hessian is real symmetric and every "
                "algorithm assumes one. Pass the real part (A.real) if the imaginary part is zero"
            )
        if kind == "bool" or kind.startswith(("int", "uint")):
            # Products, probes and Krylov coefficients are real numbers: compute in float64
            # (exact for integers up to 2**53), as numpy.linalg.eigh and scipy do.
            if isinstance(matrix, np.ndarray):
                matrix = matrix.astype(np.float64)
            else:
                xp = array_namespace(matrix)
                matrix = xp.astype(matrix, getattr(xp, "float64", xp.float32))
        if check_symmetric:
            _check_symmetric(to_numpy(matrix))
        self.matrix = matrix
        xp = array_namespace(matrix)
        super().__init__(
            tuple(shape),
            matrix.dtype,
            like=xp.reshape(matrix[0, :0], (0,)),
            chunk_size=chunk_size,
            check_finite=check_finite,
        )

    def _matmat(self, V: Any) -> Any:
        return self.matrix @ V

    def _matvec(self, v: Any) -> Any:
        return self.matrix @ v

    def exact_diagonal(self) -> Any:
        xp = array_namespace(self.matrix)
        return xp.linalg.diagonal(self.matrix) if hasattr(xp, "linalg") else xp.diagonal(self.matrix)


def _check_symmetric(M: np.ndarray) -> None:
    """Refuse ``M`` when ``||M - M^T||_F > 100 eps n ||M||_F`` (beyond rounding).

    Entries are scaled by the largest magnitude first, so the norms neither overflow nor
    underflow (entries from 1e-200 to 1e200 are fine). Non-finite matrices are left to the
    finite checks of the products.
    """
    n = M.shape[0]
    kind = M.dtype.kind
    A = np.asarray(M, dtype=np.complex128 if kind == "c" else np.float64)
    eps = dtype_eps(M.dtype)  # float64's for integer matrices
    if not np.all(np.isfinite(A)):
        return
    peak = float(np.abs(A).max()) if A.size else 0.0
    if peak == 0.0:
        return
    A = A / peak
    asym = float(np.linalg.norm(A - A.T))
    size = float(np.linalg.norm(A))
    tol = 100.0 * eps * n * size
    if asym > tol:
        raise OperatorError(
            f"DenseOperator: the matrix is not symmetric (||A - A^T||_F / ||A||_F = "
            f"{asym / size:.2e}, rounding allows {tol / size:.1e} for n={n} in "
            f"{M.dtype}); every algorithm assumes a symmetric matrix. Pass (A + A.T) / 2 "
            "if the symmetric part is what you mean."
        )


# ---------------------------------------------------------------------- layout
def _to_device(x: Any, where: Any) -> Any:
    """Move a native array to the device ``where`` (``x.to(where)`` for torch; the Array API
    ``to_device`` otherwise). The one place the layout moves a block, so tests can watch it."""
    import array_api_compat

    return array_api_compat.to_device(x, where)


def _device_key(where: Any) -> str | None:
    """A device as the string the layout compares (``None`` stays ``None``)."""
    return None if where is None else str(where)


@dataclasses.dataclass(frozen=True)
class ParamEntry:
    """One named parameter inside a flat vector: ``flat[start:stop].reshape(shape)``.

    ``device`` is where the parameter itself lives (a torch device, a JAX device or
    sharding; ``None``: wherever the flat vector is). :meth:`ParamLayout.split` places the
    block there.
    """

    name: str
    shape: tuple[int, ...]
    start: int
    stop: int
    device: Any = None

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)


class ParamLayout:
    """The ordered parameter map of a flat vector: names, shapes, slices and placement.

    Backends build one per operator (``op.layout``) so vectors can be split into named
    tensors, joined back, and aligned across frameworks.

    Placement is part of the layout: each entry may name the device its parameter lives on
    (``ParamEntry.device``) and the layout the *home* device of its flat vectors
    (``home``). :meth:`split` then hands out each block on its entry's device, and
    :meth:`join` gathers blocks from wherever they are onto the home device, so a model whose
    layers live on several devices (Hugging Face ``device_map="auto"``) gets its blocks where
    its parameters are, while the algorithms only ever see flat vectors on one device. With
    no devices named (the default) nothing is moved, as before.

    Parameters
    ----------
    entries : sequence of ParamEntry
        The parameters in flat order.
    home : device, optional
        The device flat vectors live on: :meth:`join` puts its result there. ``None``: the
        result stays where the blocks are (they must then share a device).

    Examples
    --------
    >>> import numpy as np
    >>> layout = ParamLayout.from_shapes([("w", (2, 3)), ("b", (2,))])
    >>> layout.size
    8
    >>> parts = layout.split(np.arange(8.0))
    >>> parts["b"]
    array([6., 7.])
    >>> layout.join(parts).shape
    (8,)

    Entries that name devices (here all the host's, so nothing moves):

    >>> placed = ParamLayout.from_shapes([("w", (2, 3)), ("b", (2,))],
    ...                                  devices={"w": "cpu", "b": "cpu"}, home="cpu")
    >>> placed.devices, placed.spans_devices
    (('cpu',), False)
    """

    def __init__(self, entries: Sequence[ParamEntry], *, home: Any = None) -> None:
        self.entries: tuple[ParamEntry, ...] = tuple(entries)
        self._by_name = {e.name: e for e in self.entries}
        if len(self._by_name) != len(self.entries):
            raise ValueError("ParamLayout: duplicate parameter names")
        self.home = home
        self._home_key = _device_key(home)
        self._keys = tuple(_device_key(e.device) for e in self.entries)

    @classmethod
    def from_shapes(
        cls,
        named_shapes: Iterable[tuple[str, Sequence[int]]],
        *,
        devices: Mapping[str, Any] | None = None,
        home: Any = None,
    ) -> ParamLayout:
        """A layout of consecutive blocks from ``(name, shape)`` pairs, in order.

        Parameters
        ----------
        named_shapes : iterable of (str, tuple of int)
            The parameters' names and shapes, in flat order.
        devices : mapping of str to device, optional
            Where each named parameter lives (``ParamEntry.device``); names left out (or
            ``devices=None``) are placed nowhere in particular.
        home : device, optional
            The device of the flat vectors (see :class:`ParamLayout`).
        """
        devices = {} if devices is None else devices
        entries, start = [], 0
        for name, shape in named_shapes:
            shape = tuple(int(s) for s in shape)
            size = math.prod(shape)
            entries.append(ParamEntry(name, shape, start, start + size, devices.get(name)))
            start += size
        return cls(entries, home=home)

    @property
    def size(self) -> int:
        return self.entries[-1].stop if self.entries else 0

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @property
    def devices(self) -> tuple[Any, ...]:
        """The distinct devices the entries name, in order of first appearance."""
        seen: dict[str, Any] = {}
        for entry, key in zip(self.entries, self._keys):
            if key is not None and key not in seen:
                seen[key] = entry.device
        return tuple(seen.values())

    @property
    def spans_devices(self) -> bool:
        """Whether the blocks live on more than one device, or on another than ``home``."""
        keys = {k for k in self._keys if k is not None}
        if self._home_key is not None and keys:
            keys.add(self._home_key)
        return len(keys) > 1

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def __getitem__(self, name: str) -> ParamEntry:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no parameter {name!r}; known: {self.names}") from None

    def _placed(self, block: Any, key: str | None, where: Any, have: str | None) -> Any:
        """``block`` (now on the device whose key is ``have``) on ``where``."""
        if key is None or key == have:
            return block
        return _to_device(block, where)

    def split(self, flat: Any) -> dict[str, Any]:
        """Split a flat native vector into ``{name: array of the parameter's shape}``, each
        block on its entry's device (where the entry names one)."""
        xp = array_namespace(flat)
        if flat.shape[0] != self.size:
            raise ValueError(f"expected a flat vector of length {self.size}, got {flat.shape[0]}")
        have = _device_key(device(flat)) if any(k is not None for k in self._keys) else None
        return {
            e.name: self._placed(xp.reshape(flat[e.start : e.stop], e.shape), key, e.device, have)
            for e, key in zip(self.entries, self._keys)
        }

    def join(self, parts: dict[str, Any]) -> Any:
        """Concatenate ``{name: array}`` back into one flat vector in layout order, on the
        home device (where the layout has one)."""
        missing = [n for n in self.names if n not in parts]
        if missing:
            raise KeyError(f"missing parameters: {missing}")
        first = parts[self.names[0]]
        xp = array_namespace(first)
        return xp.concat([xp.reshape(self._homed(parts[n]), (-1,)) for n in self.names])

    def join_releasing(self, blocks: list[Any]) -> Any:
        """:meth:`join` of a list of blocks (layout order) that releases each block as soon as
        it is copied into the result, for arrays that can be written in place (numpy, torch).

        A concatenation holds every block and the result at once: two vectors at the peak.
        Copied block by block, with ``blocks`` the only reference (it is emptied), the peak is
        the result plus the blocks not yet copied: about one vector. Blocks reach the home
        device as in :meth:`join`.
        """
        if len(blocks) != len(self.entries):
            raise ValueError(f"expected {len(self.entries)} blocks, got {len(blocks)}")
        xp = array_namespace(blocks[0])
        out = None
        for i, entry in enumerate(self.entries):
            part = xp.reshape(self._homed(blocks[i]), (-1,))
            blocks[i] = None
            if out is None:
                out = xp.empty((self.size,), dtype=part.dtype, device=device(part))
            out[entry.start : entry.stop] = part
            del part
        blocks.clear()
        return out

    def split_columns(self, block: Any) -> dict[str, Any]:
        """Split an ``(n, k)`` block of ``k`` flat vectors into ``{name: (k, *shape)}``, each
        on its entry's device: the batched form of :meth:`split` (``vmap`` over axis 0)."""
        xp = array_namespace(block)
        if block.shape[0] != self.size:
            raise ValueError(f"expected a block with {self.size} rows, got {block.shape[0]}")
        k = block.shape[1]
        have = _device_key(device(block)) if any(c is not None for c in self._keys) else None
        return {
            e.name: self._placed(
                xp.reshape(xp.permute_dims(block[e.start : e.stop, :], (1, 0)), (k, *e.shape)),
                key, e.device, have,
            )
            for e, key in zip(self.entries, self._keys)
        }

    def join_columns(self, parts: dict[str, Any]) -> Any:
        """Join ``{name: (k, *shape)}`` into an ``(n, k)`` block on the home device: the
        inverse of :meth:`split_columns`."""
        missing = [n for n in self.names if n not in parts]
        if missing:
            raise KeyError(f"missing parameters: {missing}")
        first = parts[self.names[0]]
        xp = array_namespace(first)
        k = first.shape[0]
        rows = xp.concat([xp.reshape(self._homed(parts[n]), (k, -1)) for n in self.names], axis=1)
        return xp.permute_dims(rows, (1, 0))

    def _homed(self, part: Any) -> Any:
        if self._home_key is None:
            return part
        return self._placed(part, self._home_key, self.home, _device_key(device(part)))

    def select(self, names: Sequence[str] | Callable[[str], bool]) -> list[ParamEntry]:
        """The entries named in ``names`` (a list, or a predicate on names), in layout order."""
        if callable(names):
            chosen = [e for e in self.entries if names(e.name)]
        else:
            wanted = set(names)
            unknown = wanted - set(self.names)
            if unknown:
                raise KeyError(f"unknown parameters {sorted(unknown)}; known: {self.names}")
            chosen = [e for e in self.entries if e.name in wanted]
        if not chosen:
            raise ValueError("the parameter selection is empty")
        return chosen

    def to_dict(self) -> list[dict[str, Any]]:
        """The entries as plain data; ``"device"`` only for entries that name one."""
        out = []
        for e in self.entries:
            row = {"name": e.name, "shape": list(e.shape), "start": e.start, "stop": e.stop}
            if e.device is not None:
                row["device"] = str(e.device)
            out.append(row)
        return out

    def __repr__(self) -> str:
        where = ""
        if self.spans_devices:
            where = f", devices={[str(d) for d in self.devices]}, home={self.home}"
        return f"ParamLayout({len(self)} tensors, size={self.size}{where})"
