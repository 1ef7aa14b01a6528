"""Where Krylov vectors live: on the device, in host memory, or in a file on disk.

:func:`~dualhess.eigsh`, :func:`~dualhess.lanczos` and :func:`~dualhess.density` keep
their Lanczos vectors in a :class:`Basis` and touch them only through its few operations:
append a vector, orthogonalise a vector against the basis (classical Gram-Schmidt twice,
"twice is enough", or a second time only after cancellation), read a few vectors back for a product, and replace rows by linear
combinations of rows (a thick restart, or the Ritz vectors returned to the caller).
Operators never see the basis.

The vectors are the rows of an ``(capacity, n)`` array, so each vector is contiguous (one
row of memory, or one stretch of a file).

- ``"device"`` (:class:`DeviceBasis`): a native array where the operator's vectors live
  (numpy, torch on CPU/GPU, jax). The default and the fastest.
- ``"host"`` (:class:`HostBasis`): a numpy array in host memory. The vector being
  orthogonalised is copied to the host, orthogonalised there (numpy BLAS) and copied back:
  the device holds O(1) vectors of length ``n`` whatever the basis size.
- ``"disk"`` (:class:`DiskBasis`): a file in a temporary directory (or ``basis_dir``),
  removed when the work ends. Blocks of columns are read into one reusable buffer of
  64 MB and written back from it, so the resident memory of the process grows by that
  buffer, not by the basis; a vector handed to be orthogonalised is worked on in place
  when its owner gives it away.

Every mode does the same arithmetic in the same order (the host and disk modes in numpy,
the device mode in the vectors' framework), so the results agree to rounding. The host and
disk modes sum each pass's coefficients while they read the basis for the previous
pass's update: ``passes + 1`` reads of the basis, not ``2 passes``.

Examples
--------
>>> import numpy as np
>>> from dualhess._basis import make_basis
>>> basis = make_basis("host", capacity=3, like=np.zeros(4))
>>> basis.append(np.array([1.0, 0.0, 0.0, 0.0]))
>>> w, h = basis.orthogonalize(np.array([2.0, 1.0, 0.0, 0.0]))
>>> w, h
(array([0., 1., 0., 0.]), array([2.]))
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import numpy as np

from ._array import array_namespace, device, from_numpy, safe_norm, to_numpy
from ._docs import DOCS

__all__ = ["BASIS_MODES", "Basis", "DeviceBasis", "HostBasis", "DiskBasis", "make_basis",
           "check_basis"]

BASIS_MODES = ("device", "host", "disk")

DOCS["basis"] = """\
basis : {"device", "host", "disk"}
    Where the Lanczos vectors are kept (:mod:`dualhess._basis`). ``"device"`` (default):
    beside the operator's vectors, the fastest. ``"host"``: in host memory (numpy); each
    new vector is orthogonalised on the host, so the device holds O(1) vectors of length
    ``n`` whatever the basis size. ``"disk"``: in a file in a temporary directory (removed
    afterwards), read and written through one 64 MB buffer, so the process's resident
    memory grows by that buffer, not by the basis (the file's pages are the kernel's
    cache). The results agree with ``"device"`` to rounding (1e-12 in float64).
basis_dir : str or path, optional
    The directory of the ``"disk"`` basis file (default: the system's temporary
    directory)."""

#: Bytes of basis rows a host or disk basis works on at once (one block is at most this,
#: or one row when a row is larger).
_BLOCK_BYTES = 1 << 22

#: Below float64, coefficients of vectors longer than this are summed in chunks of this many
#: entries (see :func:`coefficients`): short enough that one BLAS running sum stays accurate
#: (float32: about 1e-6 relative on random data), long enough that the calls cost nothing.
_CHUNK = 1 << 13


def coefficients(V: Any, w: Any, xp: Any) -> Any:
    """``V @ w`` (rows of ``V`` against ``w``) in ``V``'s dtype, accurate for long vectors.

    A float32 BLAS matrix-vector product accumulates each row in one running sum: on 4e6
    entries it measured 2.7e-3 relative error on a vector from which most of its projection
    had just been removed, so Gram-Schmidt lost orthogonality, ``eigsh`` saw an asymmetry in an
    exactly symmetric operator and refused it (GPT-2 small: 1.2e8 entries). Below float64,
    long vectors are summed in chunks of ``_CHUNK`` entries (a BLAS product within a chunk,
    float64 across chunks). An elementwise product and pairwise sum per chunk was as accurate
    but made a temporary of every chunk and took 2.1 of the 9 s of a 10 x 60 density on
    97k parameters.
    """
    n = w.shape[0]
    if V.dtype == xp.float64 or n <= _CHUNK:
        return V @ w
    total = None
    for start in range(0, n, _CHUNK):
        # a BLAS product per chunk (no temporary of the chunk's size), float64 across chunks
        part = xp.astype(V[:, start:start + _CHUNK] @ w[start:start + _CHUNK], xp.float64)
        total = part if total is None else total + part
    return xp.astype(total, V.dtype)


def check_basis(basis: Any, basis_dir: Any, where: str) -> str:
    """Validate ``basis`` / ``basis_dir`` arguments; returns the mode."""
    if basis not in BASIS_MODES:
        raise ValueError(f"{where}: basis must be one of {BASIS_MODES}, got {basis!r}")
    if basis_dir is not None:
        if basis != "disk":
            raise ValueError(f"{where}: basis_dir is the folder of basis='disk'; got basis={basis!r}")
        if not os.path.isdir(basis_dir):
            raise ValueError(f"{where}: basis_dir={str(basis_dir)!r} is not an existing directory")
    return basis


class Basis:
    """Rows ``0 .. size-1`` of a ``(capacity, n)`` array of orthonormal vectors.

    ``like`` is a native vector of the operator: new vectors and vectors read back have its
    namespace, dtype and device.
    """

    def __init__(self, capacity: int, like: Any, fixed_shapes: bool = False) -> None:
        self.capacity = int(capacity)
        self.n = int(like.shape[0])
        # only its kind (namespace, dtype, device): the vector itself, often the first one
        # appended, would stay alive as long as the basis (475 MB on GPT-2 small)
        self.like = _template(like)
        self.xp = array_namespace(like)
        self.fixed_shapes = fixed_shapes
        self.size = 0

    # -- what every mode provides ---------------------------------------------------------
    def append(self, v: Any, divisor: float | None = None) -> None:
        """Store the native vector ``v`` (``v / divisor`` when given) as row ``size``.

        With ``divisor`` a host or disk basis divides block by block as it writes, so the
        normalised vector never exists as a whole beside ``v``.
        """
        if self.size == self.capacity:
            self._grow(max(4, self.capacity // 4))
        self._set_row(self.size, v, divisor)
        self.size += 1

    def orthogonalize(self, w: Any, passes: int = 2, *, overwrite: bool = False,
                      eta: float | None = None) -> tuple[Any, np.ndarray]:
        """``w`` minus its projection on the basis, ``passes`` times (classical Gram-Schmidt,
        twice is enough); returns the new ``w`` and the summed coefficients (numpy).

        ``overwrite=True``: ``w`` is the caller's to lose (a product it owns); a host or
        disk basis then orthogonalises a CPU vector in place instead of copying it.
        ``eta``: a later pass runs only while a pass shrank ``w`` below ``eta`` times its
        norm (Daniel, Gragg, Kaufman and Stewart, 1976: with ``eta = 1/sqrt(2)``, a pass
        without that much cancellation leaves ``w`` orthogonal to working precision).
        """
        raise NotImplementedError

    def rows(self, index: Any) -> Any:
        """Rows ``index`` as the columns of a native ``(n, len(index))`` array."""
        raise NotImplementedError

    def row(self, j: int) -> Any:
        """Row ``j`` as a native vector."""
        return self.rows([j])[:, 0]

    def combine_rows(self, source: np.ndarray, M: np.ndarray, target: np.ndarray) -> None:
        """Rows ``target`` <- ``M^T`` rows ``source``, in place (all sources read first)."""
        raise NotImplementedError

    def combination(self, M: np.ndarray) -> Any:
        """``V[:size]^T M`` as a native ``(n, M.shape[1])`` array (the basis is unchanged)."""
        raise NotImplementedError

    def truncate(self, size: int) -> None:
        self.size = int(size)

    def close(self) -> None:
        """Release the storage (a disk basis removes its file)."""

    def __enter__(self) -> Basis:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- storage ----------------------------------------------------------------------------
    def _set_row(self, i: int, v: Any, divisor: float | None = None) -> None:
        raise NotImplementedError

    def _grow(self, extra: int) -> None:
        raise NotImplementedError


class DeviceBasis(Basis):
    """The basis as a native array beside the operator's vectors (today's behaviour)."""

    def __init__(self, capacity: int, like: Any, fixed_shapes: bool = False) -> None:
        super().__init__(capacity, like, fixed_shapes)
        xp = self.xp
        # jax (fixed shapes): the whole basis takes part in every step, zero beyond size,
        # so that eager jax compiles once per shape. numpy/torch touch only rows < size:
        # no need to write zeros (torch.zeros would write capacity x n numbers).
        make = xp.zeros if fixed_shapes else xp.empty
        self.V = make((self.capacity, self.n), dtype=like.dtype, device=device(like))

    def _live(self) -> Any:
        return self.V if self.fixed_shapes else self.V[: self.size]

    def _set_row(self, i: int, v: Any, divisor: float | None = None) -> None:
        if divisor is not None:
            v = v / divisor
        if self.fixed_shapes:
            import array_api_extra as xpx

            self.V = xpx.at(self.V)[i, :].set(v)
        else:  # numpy/torch: in place (the basis is this object's own array)
            self.V[i, :] = v

    def _grow(self, extra: int) -> None:
        xp = self.xp
        zeros = xp.zeros((extra, self.n), dtype=self.V.dtype, device=device(self.V))
        self.V = xp.concat([self.V, zeros], axis=0)
        self.capacity += extra

    def orthogonalize(self, w: Any, passes: int = 2, *, overwrite: bool = False,
                      eta: float | None = None) -> tuple[Any, np.ndarray]:
        if self.size == 0:
            return w, np.zeros(0)
        V = self._live()
        total = np.zeros(V.shape[0])
        long_vectors = not self.fixed_shapes  # jax: one compiled shape, V @ w
        norm = safe_norm(w, self.xp) if eta is not None else 0.0
        for done in range(1, passes + 1):
            h = coefficients(V, w, self.xp) if long_vectors else V @ w
            w = w - h @ V
            total += to_numpy(h).astype(np.float64)
            if eta is not None and done < passes:
                norm, before = safe_norm(w, self.xp), norm
                if norm >= eta * before:
                    break  # no cancellation: one pass was enough (DGKS)
        return w, total[: self.size]

    def rows(self, index: Any) -> Any:
        xp = self.xp
        index = np.asarray(index, dtype=np.int64)
        if len(index) == 1:
            return xp.reshape(self.V[int(index[0]), :], (-1, 1))
        return xp.permute_dims(xp.take(self.V, xp.asarray(index, device=device(self.V)), axis=0),
                               (1, 0))

    def row(self, j: int) -> Any:
        return self.V[j, :]

    def combine_rows(self, source: np.ndarray, M: np.ndarray, target: np.ndarray) -> None:
        source = np.asarray(source, dtype=np.int64)
        target = np.asarray(target, dtype=np.int64)
        if len(source) == 0 or len(target) == 0:
            return
        if self.fixed_shapes:  # jax: a new array either way, on fixed shapes
            full = np.eye(self.capacity)
            full[:, target] = 0.0
            full[np.ix_(source, target)] = M
            self.V = self._cast(full.T) @ self.V
            return
        Mt = self._cast(M.T)
        src, tgt = self._index(source), self._index(target)
        # In column blocks of about one vector of temporary memory: never a second copy
        # of the basis (a restart at n = 1e6 would otherwise allocate the whole basis).
        width = max(min(self.n, 4096), self.n // len(source))
        for start in range(0, self.n, width):
            stop = min(self.n, start + width)
            self.V[tgt, start:stop] = Mt @ self.V[src, start:stop]

    def truncate(self, size: int) -> None:
        if self.fixed_shapes and size < self.capacity:  # rows beyond size must read as zero
            keep = np.arange(self.capacity) < size
            self.V = self.V * self._cast(keep.astype(np.float64))[:, None]
        self.size = int(size)

    def _index(self, index: np.ndarray) -> Any:
        if isinstance(self.V, np.ndarray):
            return index
        return self.xp.asarray(index, device=device(self.V))

    def combination(self, M: np.ndarray) -> Any:
        xp = self.xp
        V = self.V[: M.shape[0]] if not self.fixed_shapes else self.V
        if self.fixed_shapes and M.shape[0] < self.capacity:
            M = np.vstack([M, np.zeros((self.capacity - M.shape[0], M.shape[1]))])
        return xp.permute_dims(V, (1, 0)) @ self._cast(M)

    def _cast(self, M: np.ndarray) -> Any:
        return from_numpy(np.ascontiguousarray(M), self.like)


def _is_torch(x: Any) -> bool:
    return hasattr(x, "detach")


class HostBasis(Basis):
    """The basis in host memory (numpy); vectors cross to the host to be orthogonalised.

    The arithmetic works on blocks of columns of all live rows (``_BLOCK_BYTES`` at a time),
    so a disk basis (below) reads and writes exactly these blocks and never holds more.
    """

    #: bytes of basis a block holds (a disk basis reads larger blocks: fewer system calls)
    block_bytes = _BLOCK_BYTES

    def __init__(self, capacity: int, like: Any, fixed_shapes: bool = False) -> None:
        super().__init__(capacity, like, fixed_shapes)
        self.host_dtype = _host_dtype(like)
        self._allocate()

    # storage hooks (a disk basis keeps a file instead)
    def _allocate(self) -> None:
        self.V = np.empty((self.capacity, self.n), dtype=self.host_dtype)

    def _read(self, start: int, stop: int, columns: slice) -> np.ndarray:
        """Rows ``start:stop`` at ``columns``; the caller may change it and ``_write`` it back."""
        return self.V[start:stop, columns]

    def _write(self, start: int, block: np.ndarray, columns: slice) -> None:
        self.V[start : start + block.shape[0], columns] = block

    def _grow(self, extra: int) -> None:
        V = np.empty((self.capacity + extra, self.n), dtype=self.host_dtype)
        V[: self.capacity] = self.V
        self.V = V
        self.capacity += extra

    # the shared arithmetic
    def _column_blocks(self, rows: int) -> list[slice]:
        """Column blocks of at most ``block_bytes`` over ``rows`` rows, whole multiples of
        ``_CHUNK`` (so that float32 coefficients sum the same chunks whatever the block)."""
        width = max(1, self.block_bytes // max(1, rows * self.host_dtype.itemsize))
        if width >= _CHUNK:
            width -= width % _CHUNK
        width = min(self.n, width)
        return [slice(c, min(self.n, c + width)) for c in range(0, self.n, width)]

    def _host_vector(self, w: Any, overwrite: bool) -> np.ndarray:
        x = to_numpy(w)
        if (overwrite and x.dtype == self.host_dtype and x.flags.writeable
                and x.flags.c_contiguous):
            return x  # the caller's own vector (a CPU product): no second one
        return np.array(x, dtype=self.host_dtype)

    def _set_row(self, i: int, v: Any, divisor: float | None = None) -> None:
        x = to_numpy(v)
        for columns in self._column_blocks(1):
            part = x[columns].astype(self.host_dtype, copy=divisor is not None)
            if divisor is not None:
                part /= self.host_dtype.type(divisor)
            self._write(i, part.reshape(1, -1), columns)

    def orthogonalize(self, w: Any, passes: int = 2, *, overwrite: bool = False,
                      eta: float | None = None) -> tuple[Any, np.ndarray]:
        if self.size == 0:
            return w, np.zeros(0)
        x = self._host_vector(w, overwrite)  # one vector on the host
        size = self.size
        blocks = self._column_blocks(size)
        total = np.zeros(size)
        # The coefficients of each pass are summed while the block is read for the previous
        # pass's update (x is final on a block once it is updated): passes + 1 reads of the
        # basis, not 2 * passes.
        h = np.zeros(size)
        norm_before = 0.0
        for columns in blocks:
            V = self._read(0, size, columns)
            h += _chunk_sums(V, x[columns])
            norm_before += _squared_norm(x[columns])
        for done in range(1, passes + 1):
            last = done == passes
            hc = h.astype(self.host_dtype)
            total += h
            h = np.zeros(size)
            norm_after = 0.0
            for columns in blocks:
                V = self._read(0, size, columns)
                x[columns] -= hc @ V
                if not last:
                    h += _chunk_sums(V, x[columns])
                    norm_after += _squared_norm(x[columns])
            if not last and eta is not None and norm_after >= eta**2 * norm_before:
                break  # no cancellation: one pass was enough (DGKS)
            norm_before = norm_after
        return from_numpy(x, self.like), total

    def rows(self, index: Any) -> Any:
        index = np.asarray(index, dtype=np.int64)
        out = np.empty((self.n, len(index)), dtype=self.host_dtype)
        for position, j in enumerate(index):
            for columns in self._column_blocks(1):
                out[columns, position] = self._read(int(j), int(j) + 1, columns)[0]
        return from_numpy(out, self.like)

    def combine_rows(self, source: np.ndarray, M: np.ndarray, target: np.ndarray) -> None:
        source, target = np.asarray(source, dtype=np.int64), np.asarray(target, dtype=np.int64)
        if len(source) == 0 or len(target) == 0:
            return
        low, high = int(min(source.min(), target.min())), int(max(source.max(), target.max())) + 1
        Mt = M.T.astype(self.host_dtype)
        for columns in self._column_blocks(high - low):
            block = self._read(low, high, columns)  # rows low..high, these columns
            block[target - low] = Mt @ block[source - low]
            self._write(low, block, columns)

    def combination(self, M: np.ndarray) -> Any:
        out = np.empty((self.n, M.shape[1]), dtype=self.host_dtype)
        Mh = M.astype(self.host_dtype)
        rows = M.shape[0]
        for columns in self._column_blocks(rows):
            out[columns] = self._read(0, rows, columns).T @ Mh
        return from_numpy(out, self.like)


class DiskBasis(HostBasis):
    """The basis in a file, read and written a block of columns at a time, removed at close.

    Each block is read into one reusable buffer (``block_bytes``) with plain file reads, so
    the process's resident memory holds that buffer, never the basis: the file's pages are
    the kernel's page cache, which it reclaims as it needs. (A memory map counted every
    page touched in the resident set until it was unmapped: a row of GPT-2 small's basis
    is 475 MB.)
    """

    block_bytes = 16 * _BLOCK_BYTES

    def __init__(self, capacity: int, like: Any, fixed_shapes: bool = False,
                 directory: Any = None) -> None:
        self._folder = tempfile.mkdtemp(prefix="dualhess-basis-", dir=directory)
        self.path = os.path.join(self._folder, "basis.f")
        self._file: Any = None
        self._buffer: np.ndarray | None = None
        super().__init__(capacity, like, fixed_shapes)

    def _allocate(self) -> None:
        self._file = open(self.path, "w+b", buffering=0)  # noqa: SIM115 (closed in close())
        self._file.truncate(self.capacity * self.n * self.host_dtype.itemsize)  # sparse

    def _offset(self, row: int, columns: slice) -> int:
        return (row * self.n + columns.start) * self.host_dtype.itemsize

    def _read(self, start: int, stop: int, columns: slice) -> np.ndarray:
        rows, width = stop - start, columns.stop - columns.start
        if self._buffer is None or self._buffer.size < rows * width:
            self._buffer = np.empty(max(rows * width, self.block_bytes // self.host_dtype.itemsize),
                                    dtype=self.host_dtype)
        block = self._buffer[: rows * width].reshape(rows, width)
        for r in range(rows):
            self._file.seek(self._offset(start + r, columns))
            view = memoryview(block[r]).cast("B")
            got = 0
            while got < len(view):
                count = self._file.readinto(view[got:])
                if not count:
                    raise OSError(f"dualhess: the disk basis {self.path} is shorter than expected")
                got += count
        return block

    def _write(self, start: int, block: np.ndarray, columns: slice) -> None:
        for r in range(block.shape[0]):
            self._file.seek(self._offset(start + r, columns))
            view = memoryview(np.ascontiguousarray(block[r])).cast("B")
            done = 0
            while done < len(view):
                done += self._file.write(view[done:])

    def _grow(self, extra: int) -> None:
        self._file.truncate((self.capacity + extra) * self.n * self.host_dtype.itemsize)
        self.capacity += extra

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        self._buffer = None
        shutil.rmtree(self._folder, ignore_errors=True)

    def __del__(self) -> None:  # a basis dropped without close still removes its file
        file = getattr(self, "_file", None)
        if file is not None and not file.closed:
            file.close()
        folder = getattr(self, "_folder", None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _chunk_sums(V: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``V @ x`` in float64: a BLAS product per ``_CHUNK`` columns below float64, summed in
    float64 across chunks (see :func:`coefficients`)."""
    if V.dtype == np.float64:
        return V @ x
    total = np.zeros(V.shape[0])
    for c in range(0, x.shape[0], _CHUNK):
        total += V[:, c : c + _CHUNK] @ x[c : c + _CHUNK]
    return total


def _squared_norm(x: np.ndarray) -> float:
    """``x . x`` in float64 (float32: per ``_CHUNK`` entries, summed in float64)."""
    if x.dtype == np.float64:
        return float(np.dot(x, x))
    return sum(float(np.dot(x[c : c + _CHUNK], x[c : c + _CHUNK]))
               for c in range(0, x.shape[0], _CHUNK))


def _template(like: Any) -> Any:
    """An empty array of ``like``'s namespace, dtype and device, not a view of it (a view
    keeps its base's memory alive); ``like`` itself where no such array can be made (an
    array spread over several devices)."""
    if isinstance(like, np.ndarray):
        return np.empty(0, dtype=like.dtype)
    try:
        return array_namespace(like).empty((0,), dtype=like.dtype, device=device(like))
    except Exception:  # noqa: BLE001 - sharded or exotic arrays: keep the vector
        return like


def _host_dtype(like: Any) -> np.dtype:
    try:
        dtype = np.dtype(to_numpy(like[:0]).dtype)
    except TypeError:
        dtype = np.dtype(np.float32)
    return dtype if dtype in (np.float64, np.float32) else np.dtype(np.float32)


def make_basis(mode: str, capacity: int, like: Any, fixed_shapes: bool = False,
               directory: Any = None) -> Basis:
    """A basis of ``capacity`` vectors like the native vector ``like``, kept as ``mode``."""
    if mode == "device":
        return DeviceBasis(capacity, like, fixed_shapes)
    if mode == "host":
        return HostBasis(capacity, like, fixed_shapes)
    if mode == "disk":
        return DiskBasis(capacity, like, fixed_shapes, directory)
    raise ValueError(f"basis must be one of {BASIS_MODES}, got {mode!r}")
