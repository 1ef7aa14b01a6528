"""Every exception dualhess raises on purpose, under one base class.

``except dualhess.DualhessError`` catches them all. Each class also keeps the built-in base it
had before the hierarchy existed (``ValueError``, ``NotImplementedError``, ``ImportError``), so
callers that catch those keep working.

Examples
--------
>>> import numpy as np, dualhess
>>> try:
...     dualhess.DenseOperator(np.ones((2, 3)))
... except dualhess.DualhessError as exc:
...     print(type(exc).__name__)
OperatorError
"""

from __future__ import annotations

__all__ = [
    "DualhessError",
    "OperatorError",
    "ExactUnavailableError",
    "LossUnavailableError",
    "CheckpointMismatchError",
    "CheckpointError",
    "StaleOperatorError",
    "AsymmetricOperatorError",
    "BackendUnavailableError",
    "UnsupportedOpError",
    "UserFileError",
    "NotConvergedWarning",
    "PrecisionWarning",
]


class DualhessError(Exception):
    """Base class of every error dualhess raises on purpose; the message says what to do."""


class OperatorError(DualhessError, ValueError):
    """Bad input to an operator (shape, dtype, device, data, loss) or bad output (NaN/Inf)."""


class ExactUnavailableError(DualhessError, NotImplementedError):
    """The operator cannot provide an exact diagonal / trace (use a stochastic method)."""


class LossUnavailableError(DualhessError, NotImplementedError):
    """The operator has no loss (e.g. a DenseOperator): no ``loss_at`` / ``gradient``."""


class CheckpointMismatchError(DualhessError, ValueError):
    """The checkpoint file belongs to another run (other settings or another operator)."""


class CheckpointError(DualhessError, ValueError):
    """A checkpoint file or path cannot be used (corrupt, truncated, empty, not writable); the
    message names the file and the fix."""


class StaleOperatorError(DualhessError, RuntimeError):
    """The model's parameters changed after the operator was built (an optimizer step, an
    in-place edit): its products would mix two sets of weights. Build a new operator."""


class AsymmetricOperatorError(DualhessError, ValueError):
    """The operator's products are not symmetric (``uᵀHv ≠ vᵀHu`` beyond rounding): it is not
    a Hessian, and a symmetric eigensolver's answer would be meaningless."""


class BackendUnavailableError(DualhessError, ImportError):
    """A backend was asked for but its framework is not installed."""


class UnsupportedOpError(DualhessError, NotImplementedError):
    """An operation of a PyTorch model that the JAX twin cannot reproduce.

    The message names the operation and where it occurs in the user's source.
    """


class UserFileError(DualhessError):
    """A user model file could not be used; the message names the file and the function."""


class NotConvergedWarning(RuntimeWarning):
    """An iterative method stopped at its budget before reaching its tolerance."""


class PrecisionWarning(RuntimeWarning):
    """The products are less precise than their dtype: e.g. a float64 model that computes
    parts in float32 (Hugging Face casts logits, RMSNorm and rotary tables), so results are
    accurate to that lower precision only."""
