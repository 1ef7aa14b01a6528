"""dualhess: Hessian spectral analysis of neural networks in PyTorch and JAX/Flax.

The core is framework-neutral: algorithms are written once against :class:`Operator`
(``matvec``/``matmat``) and the Array API, and run on numpy, torch and jax vectors.

Examples
--------
>>> import numpy as np, dualhess
>>> op = dualhess.DenseOperator(np.diag([5.0, 2.0, 1.0, -3.0]))
>>> dualhess.eigsh(op, k=1, seed=0).values
array([5.])
"""

from __future__ import annotations

from .lanczos import lanczos
from .operator import (
    DenseOperator,
    ExactUnavailableError,
    Operator,
    OperatorError,
    ParamEntry,
    ParamLayout,
)
from .results import DiagonalEstimate, Eigen, SpectralDensity, TraceEstimate, Tridiagonal

__version__ = "0.1.0"

__all__ = [
    "Operator",
    "DenseOperator",
    "OperatorError",
    "ExactUnavailableError",
    "ParamLayout",
    "ParamEntry",
    "lanczos",
    "Tridiagonal",
    "Eigen",
    "TraceEstimate",
    "DiagonalEstimate",
    "SpectralDensity",
]
