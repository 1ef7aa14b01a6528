"""Small shared helpers: input validation, progress bars."""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from ._operator import Operator

__all__ = [
    "check_operator",
    "check_positive_int",
    "check_tolerance",
    "product_eps",
    "symmetry_tolerance",
    "check_symmetric_products",
    "refusal_tolerance",
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


def product_eps(op: Operator) -> float:
    """The unit roundoff of ``op``'s products: the 16-bit dtype's under a work-precision
    wrapper (looked up through checkpoint, host and block wrappers), else ``op.dtype``'s."""
    from ._array import dtype_eps
    from ._precision import WorkPrecisionOperator

    seen = 0
    node: Any = op
    while isinstance(node, Operator) and seen < 16:
        if isinstance(node, WorkPrecisionOperator):
            return float(node.product_eps)
        node = next((getattr(node, name) for name in ("inner", "parent", "base")
                     if isinstance(getattr(node, name, None), Operator)), None)
        seen += 1
    return float(dtype_eps(op.dtype))


#: sqrt of float32's unit roundoff: float64 operators are refused only above it, since a
#: float64 model may compute parts in float32 (Hugging Face casts logits to float32 in its
#: losses, Llama-family models RMSNorm and rotary tables), which leaves asymmetries near
#: 1e-9 to 1e-7: a less precise Hessian, not a wrong one (a PrecisionWarning says so).
FLOAT32_SYMMETRY_FLOOR = float(np.sqrt(2.0**-24))


def symmetry_tolerance(op: Operator, num_steps: int) -> float:
    """The largest ``max |v_i^T A v_j - v_j^T A v_i| / ||A||`` that rounding explains.

    ``sqrt(u)``, ``u`` the unit roundoff of the products (float64: 1.5e-8, float32: 3.5e-4,
    float16: 3.1e-2, bfloat16: 8.8e-2). Measured with full reorthogonalisation (eigsh, block
    eigsh, batched lanczos; dense indefinite, clustered and tiny-scaled spectra; torch
    autodiff Hessians of an MLP by both engines), symmetric operators stay below ``6 u``
    (bfloat16/float16 products below ``0.2 u``): at least 70 times under the bound, 10^7 times
    in float64. An operator that is not a Hessian (a non-symmetric matrix, a framework's wrong
    second derivative) shows 1e-3 to 1. ``num_steps`` is kept for the message.
    """
    del num_steps
    return float(np.sqrt(product_eps(op)))


def refusal_tolerance(op: Operator) -> float:
    """Above this relative asymmetry an operator is refused: ``sqrt(u)``, but never below
    ``sqrt`` of float32's roundoff (:data:`FLOAT32_SYMMETRY_FLOOR`, 2.4e-4); between
    :func:`symmetry_tolerance` and this, a :class:`~dualhess.PrecisionWarning`."""
    return max(symmetry_tolerance(op, 0), FLOAT32_SYMMETRY_FLOOR)


def check_symmetric_products(op: Operator, asymmetry: float, scale: float, num_steps: int,
                             where: str, *, warn: bool = True) -> float:
    """Raise :class:`~dualhess.AsymmetricOperatorError` when the Krylov coefficients show
    that ``op`` is not symmetric: ``asymmetry`` is ``max |v_i^T A v_j - v_j^T A v_i|`` over
    the basis, ``scale`` an estimate of ``||A||``. Above the rounding of the products'
    dtype but below :func:`refusal_tolerance` (a float64 model computing partly in float32),
    warn (``warn=True``) with a :class:`~dualhess.PrecisionWarning`. Returns the relative
    asymmetry (0 when it cannot be measured): no result is more accurate than it."""
    from ._errors import AsymmetricOperatorError, PrecisionWarning

    if not (scale > 0 and np.isfinite(asymmetry)):
        return 0.0
    relative = asymmetry / scale
    allowed = refusal_tolerance(op)
    if relative > allowed:
        raise AsymmetricOperatorError(
            f"{where}: the operator is not symmetric: its Krylov coefficients give "
            f"max |u^T A v - v^T A u| / ||A|| = {relative:.2e}, rounding of its products allows "
            f"{allowed:.1e} ({type(op).__name__}, {num_steps} steps). Its eigenvalues would be "
            "meaningless, so none are returned. Likely causes: a custom Operator whose "
            "_matvec/_matmat is not a symmetric map; DenseOperator(A, check_symmetric=False) "
            "of a non-symmetric A (pass (A + A.T) / 2); a framework's second derivative that "
            "is not symmetric (e.g. torch parametrizations.weight_norm under double backward: "
            "remove the parametrization); products that change between "
            "calls (parameters edited in place, randomness in the loss)"
        )
    if warn and relative > symmetry_tolerance(op, num_steps):
        import warnings

        warnings.warn(
            f"{where}: the products are symmetric only to {relative:.1e} relative (their "
            f"dtype's rounding allows {symmetry_tolerance(op, num_steps):.1e}): part of the "
            "model likely computes in lower precision (a float64 model with float32 casts: "
            "Hugging Face losses, RMSNorm, rotary tables), so results are accurate to about "
            f"{relative:.0e} of the largest eigenvalue, and no eigenpair is reported converged "
            "to a tolerance below that",
            PrecisionWarning,
            stacklevel=3,
        )
    return float(relative)


def check_finite_host(x: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(x)):
        raise FloatingPointError(f"{what} contains NaN or Inf; the operator is not finite")


#: Seconds between two redraws of a running bar when nothing else moves it.
TICK_SECONDS = 0.5


def progress_bar(
    progress: bool | str, total: int | None, desc: str, unit: str = "it", *, file: Any = None
) -> Any:
    """A tqdm bar of ``total`` ``unit`` (disabled when ``progress`` is False).

    ``progress`` may be a string: the bar's label instead of ``desc`` (so a caller such as
    ``density`` can name the stage a shared routine such as ``lanczos`` draws). The bar shows
    ``label: n/total unit |bar| elapsed`` and the postfix, not a rate, and is cleared when
    closed. Log lines printed while it runs should go through ``tqdm.write``.

    A person watching sees it move: every update is drawn (tqdm's adaptive skipping, which
    froze a bar whose first steps were fast and later ones slow, is off), and a background
    ticker redraws it every :data:`TICK_SECONDS` so the elapsed time moves during a step
    that takes long (one product of a large model).
    """
    from tqdm.auto import tqdm

    label = progress if isinstance(progress, str) else desc
    bar = tqdm(total=total, desc=label, disable=not progress, leave=False,
               **_width(file if file is not None else sys.stderr),
               unit=unit, miniters=1, mininterval=0.2, file=file,
               bar_format="{desc}: {n_fmt}/{total_fmt} " + unit + " |{bar}| {elapsed}{postfix}")
    if not bar.disable:
        _Ticker(bar).start()
    return bar


def _width(stream: Any) -> dict[str, Any]:
    """Follow the terminal's width, except on one that reports zero columns (a fresh
    pseudo-terminal, some CI and editor shells), where tqdm would draw nothing at all."""
    try:
        if os.get_terminal_size(stream.fileno()).columns == 0:
            return {"ncols": 100, "nrows": 24}
    except (AttributeError, OSError, ValueError):  # not a real terminal: tqdm decides
        pass
    return {"dynamic_ncols": True}


class _Ticker:
    """Redraws a tqdm bar every :data:`TICK_SECONDS` until the bar is closed."""

    def __init__(self, bar: Any) -> None:
        import threading

        self.bar = bar
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dualhess-progress", daemon=True)
        close = bar.close

        def close_and_stop() -> None:
            self.stop.set()
            if self.thread.is_alive() and self.thread is not threading.current_thread():
                self.thread.join()
            close()

        bar.close = close_and_stop

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(TICK_SECONDS):
            try:
                self.bar.refresh()  # takes the bar's (re-entrant) lock; close() joins first
            except Exception:  # a closed stream: the bar is going away
                return
