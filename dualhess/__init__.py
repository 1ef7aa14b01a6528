"""dualhess: Hessian spectral analysis of neural networks in PyTorch and JAX/Flax.

The core is framework-neutral: algorithms are written once against :class:`Operator`
(``matvec``/``matmat``) and the Array API, and run on numpy, torch and jax vectors. The
framework backends (``torch_backend``, ``jax_backend``) are loaded lazily by
:mod:`dualhess.backends`, so ``import dualhess`` needs neither framework.

Examples
--------
>>> import numpy as np, dualhess
>>> op = dualhess.DenseOperator(np.diag([5.0, 2.0, 1.0, -3.0]))
>>> dualhess.eigsh(op, k=1, seed=0).values
array([5.])
"""

from __future__ import annotations

from ._alignment import Alignment
from ._crosscheck import CrosscheckReport, crosscheck
from ._demo import hf_problem
from ._density import density
from ._diagonal import diagonal
from ._eigsh import eigsh
from ._errors import (
    AsymmetricOperatorError,
    BackendUnavailableError,
    CheckpointError,
    CheckpointMismatchError,
    DualhessError,
    LossUnavailableError,
    NotConvergedWarning,
    PrecisionWarning,
    StaleOperatorError,
    UnsupportedOpError,
)
from ._lanczos import lanczos
from ._landscape import LossLandscape, QuadraticLoss, loss_landscape
from ._operator import (
    DenseOperator,
    ExactUnavailableError,
    Operator,
    OperatorError,
    ParamEntry,
    ParamLayout,
)
from ._overlap import GradientOverlap, gradient_overlap
from ._per_layer import PerLayerSpectra, per_layer_spectra
from ._power import power_iteration
from ._results import DiagonalEstimate, Eigen, SpectralDensity, TraceEstimate, Tridiagonal
from ._trace import trace
from .backends import available_backends, crosscheck_model, get_backend, hessian

__version__ = "0.2.0"

__all__ = [
    # the seam
    "Operator",
    "DenseOperator",
    "OperatorError",
    "ExactUnavailableError",
    "ParamLayout",
    "ParamEntry",
    "Alignment",
    # algorithms
    "lanczos",
    "eigsh",
    "power_iteration",
    "trace",
    "diagonal",
    "density",
    "per_layer_spectra",
    # analyses
    "loss_landscape",
    "gradient_overlap",
    "QuadraticLoss",
    # cross-framework
    "crosscheck",
    "crosscheck_model",
    "hessian",
    "hf_problem",
    "get_backend",
    "available_backends",
    # results
    "Tridiagonal",
    "Eigen",
    "TraceEstimate",
    "DiagonalEstimate",
    "SpectralDensity",
    "CrosscheckReport",
    "PerLayerSpectra",
    "LossLandscape",
    "GradientOverlap",
    "DualhessError",
    "LossUnavailableError",
    "BackendUnavailableError",
    "UnsupportedOpError",
    "CheckpointMismatchError",
    "CheckpointError",
    "StaleOperatorError",
    "AsymmetricOperatorError",
    "PrecisionWarning",
    "NotConvergedWarning",
]
