"""Working precision: products in the operator's dtype, Krylov arithmetic in float32 or better.

A model kept in bfloat16 or float16 has a Hessian operator of that dtype: its products are
computed (and rounded) in 16 bits, and that is the accuracy they carry. The algorithms'
own arithmetic - the Krylov basis, its orthogonalisation, the Lanczos coefficients, trace
sums - must not be rounded to 16 bits on top: orthogonality to 2^-8 is no orthogonality,
and numpy has no bfloat16 for the host-side work at all. So every algorithm runs a 16-bit
operator through :class:`WorkPrecisionOperator`, which takes and returns float32 vectors
(same namespace and device) and rounds only the product's input and output to the
operator's dtype. Results say what they carry (``precision``, :func:`precision_of`).

Unit roundoff ``u`` (half the machine epsilon): bfloat16 2^-8 = 3.9e-3, float16 2^-11 =
4.9e-4, float32 2^-24 = 6.0e-8 (N. J. Higham, *Accuracy and Stability of Numerical
Algorithms*, 2nd ed., SIAM 2002, ch. 2).

Examples
--------
>>> is_low_precision("bfloat16"), is_low_precision("float32")
(True, False)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._array import array_namespace, device, dtype_eps, dtype_name, to_numpy
from ._operator import Operator

__all__ = [
    "WorkPrecisionOperator",
    "in_work_precision",
    "is_low_precision",
    "precision_of",
    "recomputed_residuals",
]

#: The 16-bit float dtypes (by name) whose products the algorithms take in float32 arithmetic.
LOW_PRECISION = ("bfloat16", "float16", "half")


def is_low_precision(dtype: Any) -> bool:
    """True for 16-bit floats (bfloat16, float16): Krylov work must not run in them."""
    return dtype_name(dtype) in LOW_PRECISION


class WorkPrecisionOperator(Operator):
    """A 16-bit operator seen through float32 vectors (same framework and device).

    Each product rounds its input to the operator's dtype, calls the operator (whose
    counter counts it) and returns the result in float32, so every reduction and Krylov
    coefficient of an algorithm is float32 while the products carry 16-bit accuracy.

    Attributes
    ----------
    base : Operator
        The wrapped operator.
    product_dtype : str
        The dtype its products are computed in (e.g. ``"bfloat16"``).
    product_eps : float
        Machine epsilon of ``product_dtype``: the relative accuracy floor of a product.
    """

    def __init__(self, base: Operator) -> None:
        xp = base.xp
        like = xp.zeros(0, dtype=xp.float32, device=device(base._like))
        super().__init__(base.shape, like=like, check_finite=False)
        self.base = base
        self.layout = base.layout
        self.product_dtype = dtype_name(base.dtype)
        self.product_eps = dtype_eps(base.dtype)

    def _cast(self, x: Any, dtype: Any) -> Any:
        return array_namespace(x).astype(x, dtype)

    def _matvec(self, v: Any) -> Any:
        return self._cast(self.base.matvec(self._cast(v, self.base.dtype)), self.dtype)

    def _matmat(self, V: Any) -> Any:
        return self._cast(self.base.matmat(self._cast(V, self.base.dtype)), self.dtype)

    @property
    def fixed_shapes(self) -> bool:
        return self.base.fixed_shapes

    def exact_diagonal(self) -> Any:
        return self._cast(self.base.exact_diagonal(), self.dtype)

    def exact_trace(self) -> float:
        return self.base.exact_trace()

    def __repr__(self) -> str:
        return f"WorkPrecisionOperator({self.base!r}, float32 arithmetic)"


def in_work_precision(op: Operator) -> Operator:
    """``op`` itself, or a :class:`WorkPrecisionOperator` around it when it is 16-bit."""
    if isinstance(op, WorkPrecisionOperator) or not is_low_precision(op.dtype):
        return op
    return WorkPrecisionOperator(op)


def precision_of(op: Operator) -> str:
    """What a result computed on ``op`` carries: ``"float64"``, ``"float32"``, or e.g.
    ``"bfloat16 products, float32 arithmetic"``."""
    if isinstance(op, WorkPrecisionOperator):
        return f"{op.product_dtype} products, {dtype_name(op.dtype)} arithmetic"
    return dtype_name(op.dtype)


def recomputed_residuals(op: Operator, vectors: Any, values: np.ndarray) -> np.ndarray:
    """``||A y_i - theta_i y_i||`` with fresh products (one ``matmat``), in float64 on the host.

    For 16-bit products the Krylov relation holds only for the rounded products it was
    built from; a fresh product of each returned vector shows the residual the operator's
    arithmetic really supports (its rounding included).
    """
    AY = np.asarray(to_numpy(op.matmat(vectors)), dtype=np.float64)
    Y = np.asarray(to_numpy(vectors), dtype=np.float64)
    return np.linalg.norm(AY - Y * np.asarray(values, dtype=np.float64), axis=0)
