"""Small shared helpers: input validation, progress bars."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._operator import Operator

__all__ = [
    "check_operator",
    "check_positive_int",
    "check_tolerance",
    "progress_bar",
    "check_finite_host",
]


def check_operator(op: Any, where: str) -> Operator:
    """Accept an :class:`Operator`; wrap a plain 2-D array in a :class:`DenseOperator`; a
    16-bit operator is seen through float32 vectors (:mod:`dualhess._precision`)."""
    from ._precision import in_work_precision

    if isinstance(op, Operator):
        return in_work_precision(op)
    shape = getattr(op, "shape", None)
    if shape is not None and len(shape) == 2:
        from ._operator import DenseOperator

        return DenseOperator(op)
    raise TypeError(f"{where}: expected a dualhess.Operator or a square 2-D array, got {type(op).__name__}")


def check_positive_int(value: Any, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{where}: {name} must be positive, got {value}")
    return int(value)


def check_tolerance(value: Any, name: str, where: str, *, positive: bool = False) -> float:
    """A tolerance: a real, finite number ``>= 0`` (``> 0`` when ``positive``).

    ``None``, strings and arrays are refused with a message naming the argument, rather than
    the bare ``float()`` error (``tol=None`` does not mean "the default": omit it for that).
    """
    bound = "> 0" if positive else ">= 0"
    if value is None:
        raise TypeError(
            f"{where}: {name}=None is not a tolerance; pass a number {bound} (e.g. {name}=1e-6), "
            f"or leave {name} out for the default"
        )
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(
            f"{where}: {name} must be a real number {bound}, got {type(value).__name__} "
            f"{value!r}"
        )
    number = float(value)
    if not np.isfinite(number) or number < 0 or (positive and number == 0):
        what = "a positive number" if positive else f"a finite number {bound}"
        raise ValueError(f"{where}: {name} must be {what}, got {number}")
    return number


def check_finite_host(x: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(x)):
        raise FloatingPointError(f"{what} contains NaN or Inf; the operator is not finite")


def progress_bar(progress: bool | str, total: int | None, desc: str, unit: str = "it") -> Any:
    """A tqdm bar of ``total`` ``unit`` (disabled when ``progress`` is False).

    ``progress`` may be a string: the bar's label instead of ``desc`` (so a caller such as
    ``density`` can name the stage a shared routine such as ``lanczos`` draws). The bar shows
    ``label: n/total unit |bar| elapsed`` and the postfix, not a rate, and is cleared when
    closed. Log lines printed while it runs should go through ``tqdm.write``.
    """
    from tqdm.auto import tqdm

    label = progress if isinstance(progress, str) else desc
    return tqdm(total=total, desc=label, disable=not progress, leave=False, dynamic_ncols=True,
                unit=unit, bar_format="{desc}: {n_fmt}/{total_fmt} " + unit
                + " |{bar}| {elapsed}{postfix}")
