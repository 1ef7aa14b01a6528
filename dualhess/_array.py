"""Array-API helpers shared by the algorithms.

The algorithms in :mod:`dualhess` never import a framework. They take the namespace of
the vectors they are given (``array_namespace``) and move small results to numpy float64
for dense work on the host. This module is the only place that knows how to turn a
native array into numpy and back.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device, is_array_api_obj

__all__ = [
    "array_namespace",
    "device",
    "is_array_api_obj",
    "to_numpy",
    "from_numpy",
    "default_rng",
    "is_float64",
    "dtype_name",
    "on_host",
]


def to_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a numpy array on the host (copying from a GPU when needed)."""
    if isinstance(x, np.ndarray):
        return x
    detach = getattr(x, "detach", None)
    if detach is not None:  # torch: leave autograd, leave the device
        return detach().cpu().numpy()
    return np.asarray(x)


def from_numpy(x: np.ndarray, like: Any) -> Any:
    """Convert a numpy array to the namespace, dtype and device of the array ``like``."""
    if isinstance(like, np.ndarray):
        return np.asarray(x, dtype=like.dtype)
    xp = array_namespace(like)
    try:  # jax (and numpy-typed) dtypes: cast on the host, a memcpy, not a device op
        host_dtype = np.dtype(like.dtype)
    except TypeError:  # torch dtypes: torch casts while it copies
        host_dtype = None
    if host_dtype is not None and host_dtype.kind in "fc" and x.dtype != host_dtype:
        # measured: jax converted a float64 block to float32 with a dispatched XLA op,
        # ~4 ms per Krylov step at n = 176,402 on a loaded CPU
        x = np.asarray(x, dtype=host_dtype)
    return xp.asarray(np.ascontiguousarray(x), dtype=like.dtype, device=device(like))


def default_rng(seed: Any) -> np.random.Generator:
    """Turn ``seed`` (an int, a ``numpy.random.Generator`` or None) into a Generator.

    ``None`` is truly random (fresh OS entropy); a Generator is used as it is, so a caller
    can thread one generator through several calls.
    """
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed < 0:
        raise ValueError(
            f"seed must be a non-negative int (numpy seeds are entropy, never negative), a "
            f"numpy.random.Generator or None, got {seed}; pass e.g. seed={abs(int(seed))}"
        )
    if seed is None or isinstance(seed, (int, np.integer)):
        return np.random.default_rng(seed)
    raise TypeError(
        f"seed must be an int, a numpy.random.Generator or None, got {type(seed).__name__}"
    )


def dtype_name(dtype: Any) -> str:
    """A short, framework-neutral name for a dtype: 'float64', 'float32', ..."""
    name = str(dtype)
    for prefix in ("torch.", "dtype(", "<class 'numpy.", "'"):
        name = name.replace(prefix, "")
    return name.strip("')>")


#: Entries drawn at a time by :func:`normal_vector` (8 MB of float64).
_DRAW_CHUNK = 1 << 20


def normal_vector(rng: np.random.Generator, n: int, dtype: Any, asarray: Any) -> Any:
    """``asarray(rng.standard_normal(n))`` without a float64 copy of the whole vector.

    For a float32 ``dtype`` the numbers are drawn in chunks (the same stream: a Generator
    gives the same values in chunks as at once) into a float32 array, which ``asarray`` then
    takes as it is: at GPT-2 small's 1.2e8 entries, one float32 vector (475 MB) instead of a
    float64 one beside its float32 copy (1.4 GB). Every other dtype draws at once, as before
    (a 16-bit dtype rounds from float64 directly).
    """
    if dtype_name(dtype) != "float32" or n <= _DRAW_CHUNK:
        return asarray(rng.standard_normal(n))
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, _DRAW_CHUNK):
        out[start : start + _DRAW_CHUNK] = rng.standard_normal(min(_DRAW_CHUNK, n - start))
    return asarray(out)


#: Machine epsilon (the spacing of floats at 1) by dtype name, bfloat16 and float16 included.
_EPS = {
    "float64": 2.0**-52,
    "float32": 2.0**-23,
    "float16": 2.0**-10,
    "bfloat16": 2.0**-7,
}


def dtype_eps(dtype: Any) -> float:
    """Machine epsilon of any framework's floating dtype (numpy, torch, jax; bfloat16 too).

    Integer and unknown dtypes get float64's: their arithmetic happens in float64 on the host.

    Examples
    --------
    >>> from dualhess._array import dtype_eps
    >>> dtype_eps("float32") == 2.0**-23, dtype_eps("bfloat16")
    (True, 0.0078125)
    """
    name = dtype_name(dtype)
    aliases = {"double": "float64", "float": "float32", "half": "float16"}
    return _EPS.get(aliases.get(name, name), _EPS["float64"])


def is_float64(dtype: Any) -> bool:
    """True when ``dtype`` is a 64-bit float in any framework."""
    return dtype_name(dtype) in ("float64", "double")


def _norm_limits(dtype: Any) -> tuple[float, float]:
    """Norms strictly between these are computed safely by a plain ``vector_norm``.

    Outside them some squares may leave the representable range (below ``sqrt(tiny)`` or
    above ``sqrt(max)``), with a factor 1e6 of margin for up to ~1e12 entries.
    """
    name = dtype_name(dtype)
    info = np.finfo(np.float32 if ("32" in name or "16" in name) else np.float64)
    return float(np.sqrt(info.tiny)) * 1e6, float(np.sqrt(info.max)) / 1e6


def safe_vector_norm(x: Any, xp: Any, axis: int | None = None) -> Any:
    """``xp.linalg.vector_norm(x, axis=axis)`` without underflow or overflow in the squares.

    A plain 2-norm squares the entries: for float64 entries near 1e-160 (float32: 1e-20) the
    squares leave the representable range and the norm comes out 0 (or inf near 1e160).
    Where a norm falls outside the safe range, the vector (or each column) is scaled by its
    largest entry first. Ordinary values take the plain path (one reduction).

    >>> import numpy as np
    >>> float(safe_vector_norm(np.array([3e-200, 4e-200]), np))
    5e-200
    """
    with np.errstate(over="ignore", under="ignore"):  # numpy: handled below
        norm = _plain_norm(x, xp, axis)
    low, high = _norm_limits(x.dtype)
    host = to_numpy(norm)
    if np.all((host > low) & (host < high)):
        return norm
    largest = xp.max(xp.abs(x), axis=axis, keepdims=True)
    safe = xp.where(largest > 0, largest, xp.ones_like(largest))
    return _plain_norm(x / safe, xp, axis) * xp.reshape(largest, norm.shape)


#: Below float64, vectors longer than this are normed by a summed reduction (see _plain_norm).
LONG_VECTOR = 1 << 16


def _plain_norm(x: Any, xp: Any, axis: int | None) -> Any:
    """The 2-norm. torch's ``vector_norm`` on the CPU accumulates float32 in one running sum:
    on a GPT-2-small-sized vector (1.2e8 entries) it measured 1e-5 to 6e-2 relative error,
    which made ``eigsh`` see an asymmetry of 2e-3 in an exactly symmetric operator and refuse
    it. ``sqrt(sum(x * x))`` goes through the library's pairwise (cascade) summation: 1.5e-8
    there. Float64 and short vectors keep ``vector_norm`` (one pass, no temporary)."""
    size = x.shape[axis] if axis is not None else math.prod(x.shape)
    if x.dtype == xp.float64 or size <= LONG_VECTOR:
        return xp.linalg.vector_norm(x, axis=axis)
    if axis is None and x.ndim == 1 and size > _NO_TEMPORARY:
        # by slices: no temporary of the vector's size beside it (GPT-2 small: 475 MB more
        # at the peak of an eigsh step on a host or disk basis), float64 across slices
        total = 0.0
        for start in range(0, size, LONG_VECTOR):
            part = x[start : start + LONG_VECTOR]
            total += float(xp.sum(part * part))
        return xp.sqrt(xp.asarray(total, dtype=x.dtype, device=device(x)))
    return xp.sqrt(xp.sum(x * x, axis=axis))


#: Longer vectors are normed by slices (see _plain_norm).
_NO_TEMPORARY = 1 << 22


def safe_norm(x: Any, xp: Any) -> float:
    """:func:`safe_vector_norm` of a vector, as a Python float."""
    return float(safe_vector_norm(x, xp))


def safe_column_norms(R: np.ndarray) -> np.ndarray:
    """Column 2-norms of a host float64 matrix (see :func:`safe_vector_norm`)."""
    return np.asarray(safe_vector_norm(np.asarray(R, dtype=np.float64), np, axis=0))


def places_itself(x: Any) -> bool:
    """Whether the array library moves (or shards) arrays between devices by itself, so an
    input on another device than the operator's is not an error (JAX); torch is strict."""
    import array_api_compat

    return bool(array_api_compat.is_jax_array(x))


def compiles_per_shape(x: Any) -> bool:
    """Whether eager operations on arrays like ``x`` compile once per distinct shape.

    True for JAX arrays (immutable; every new shape of an eager operation is a new XLA
    computation), False for numpy and torch. Krylov methods then keep their shapes fixed or
    run their bookkeeping on the host. This is the array layer's one statement about a
    library; operators expose it as :attr:`dualhess.Operator.fixed_shapes`.
    """
    import array_api_compat

    return bool(array_api_compat.is_jax_array(x))


def on_host(x: Any) -> bool:
    """Whether an array's memory is the host's: numpy, torch on ``"cpu"``, jax on CPU devices.

    A capability of where the data is, not of a library: for such arrays a copy to numpy
    costs a memcpy, so Krylov bookkeeping can run in numpy beside the products.

    >>> import numpy as np
    >>> on_host(np.zeros(3))
    True
    """
    if isinstance(x, np.ndarray):
        return True
    devices = getattr(x, "devices", None)
    if callable(devices):  # jax: every device of a (possibly sharded) array
        try:
            return all(getattr(d, "platform", "") == "cpu" for d in devices())
        except Exception:  # pragma: no cover - exotic arrays
            return False
    try:
        dev = device(x)
    except Exception:  # pragma: no cover
        return False
    return str(getattr(dev, "type", dev)) == "cpu"
