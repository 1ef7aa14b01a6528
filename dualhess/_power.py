"""Deflated power iteration, the top-k eigensolver of PyHessian.

Kept for parity with PyHessian's numbers and for research comparisons; :func:`dualhess.eigsh`
needs far fewer products for the same accuracy.

References
----------
Z. Yao, A. Gholami, K. Keutzer, M. W. Mahoney, "PyHessian: Neural networks through the lens
of the Hessian", IEEE BigData (2020), arXiv:1912.07145.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from ._array import array_namespace, default_rng, safe_norm
from ._eigsh import NotConvergedWarning
from ._operator import Operator, OperatorError
from ._precision import WorkPrecisionOperator, precision_of
from ._results import Eigen
from ._util import check_operator, check_positive_int, check_tolerance, progress_bar

__all__ = ["power_iteration"]


def power_iteration(
    op: Operator,
    k: int = 1,
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: Any = None,
    progress: bool = False,
) -> Eigen:
    """The ``k`` eigenvalues of largest magnitude by deflated power iteration (PyHessian).

    For each eigenvalue in turn: start from a Gaussian vector, and repeat
    ``v <- orthonormalise(v against the vectors found); w = H v; lambda = v . w;
    v <- w / ||w||`` until the relative change of ``lambda`` is below ``tol``
    (``|lambda_new - lambda_old| <= tol * max(|lambda_new|, |lambda_old|)``) or ``max_iter``
    products. PyHessian's test, ``|lambda_new - lambda_old| / (|lambda_old| + 1e-6) < tol``,
    is not scale-free: on a Hessian whose eigenvalues are far below 1e-6 it stops after two
    products. This one gives the same iterates whatever the scale of the operator.

    Parameters
    ----------
    op : Operator
        A symmetric operator (a plain 2-D array is wrapped in a DenseOperator).
    k : int
        Number of eigenpairs, ``0 < k <= n``.
    max_iter : int
        Most products per eigenpair.
    tol : float
        Relative-change stopping tolerance (> 0).
    seed : int, numpy.random.Generator or None
        Randomness for the start vectors (numpy float64, identical across frameworks).
    progress : bool
        Show a progress bar.

    Returns
    -------
    Eigen
        ``values`` in discovery order (largest magnitude first, with their sign);
        ``vectors`` the native ``(n, k)`` unit vectors; ``residuals`` ``||H v - lambda v||``
        of each returned pair, exact (from the last product, no extra cost);
        ``converged`` whether the relative-change test stopped the iteration before
        ``max_iter``; ``which='LM'``.

    Notes
    -----
    Power iteration converges at the rate ``|lambda_{i+1} / lambda_i|`` and cannot separate
    ``lambda`` from ``-lambda``; the relative-change test stops it early on slowly converging
    problems, so ``residuals`` are the honest measure of accuracy. Unlike PyHessian, which
    returns the previous estimate with the next vector, each returned value is the Rayleigh
    quotient of the returned vector (the two differ by less than ``tol`` relatively).

    Examples
    --------
    >>> import numpy as np
    >>> from dualhess import DenseOperator
    >>> from dualhess import power_iteration
    >>> op = DenseOperator(np.diag([1.0, -8.0, 2.0, 0.5]))
    >>> res = power_iteration(op, k=2, tol=1e-10, max_iter=500, seed=0)
    >>> np.round(res.values, 6)
    array([-8.,  2.])
    """
    op = check_operator(op, "power_iteration")
    n = op.n
    k = check_positive_int(k, "k", "power_iteration")
    if k > n:
        raise ValueError(f"power_iteration: k must be <= n (got k={k}, n={n})")
    max_iter = check_positive_int(max_iter, "max_iter", "power_iteration")
    tol = check_tolerance(tol, "tol", "power_iteration", positive=True)
    rng = default_rng(seed)
    start_count = op.num_matvecs
    # 16-bit products: a relative change below their unit roundoff is rounding noise, so
    # the iteration stops there, and claims convergence only for a tol it can resolve.
    low = isinstance(op, WorkPrecisionOperator)
    stop_tol = max(tol, op.product_eps / 2) if low else tol
    resolvable = stop_tol == tol

    found: list[Any] = []
    values = np.zeros(k)
    residuals = np.zeros(k)
    converged = np.zeros(k, dtype=bool)
    bar = progress_bar(progress, k * max_iter, "power_iteration")
    try:
        for i in range(k):
            v = op.asarray(rng.standard_normal(n))
            xp = array_namespace(v)
            basis = xp.stack(found, axis=1) if found else None
            previous: float | None = None
            for _ in range(max_iter):
                if basis is not None:  # deflation: twice, for orthogonality to rounding
                    for _ in range(2):
                        v = v - basis @ (basis.T @ v)
                v = v / safe_norm(v, xp)
                w = op.matvec(v)
                bar.update(1)
                value = float(xp.sum(v * w))
                if not math.isfinite(value):
                    raise OperatorError(
                        "power_iteration: the operator produced NaN or Inf; check the "
                        "parameters, the data and the loss for non-finite values"
                    )
                values[i] = value
                residuals[i] = safe_norm(w - value * v, xp)
                vector = v
                if previous is not None and abs(previous - value) <= stop_tol * max(
                    abs(previous), abs(value)
                ):
                    converged[i] = resolvable
                    break
                previous = value
                norm = safe_norm(w, xp)
                if norm == 0.0:  # v lies in the null space: an exact eigenpair (0, v)
                    converged[i] = True
                    break
                v = w / norm
            found.append(vector)
    finally:
        bar.close()

    if not np.all(converged):
        warnings.warn(
            f"power_iteration: {int(np.sum(~converged))} of {k} eigenvalues did not reach "
            f"tol={tol:g} within max_iter={max_iter}; raise max_iter"
            + (
                f" (with {op.product_dtype} products a relative change below "
                f"{op.product_eps / 2:.1e} is rounding: loosen tol or compute in float32)"
                if low and not resolvable
                else ""
            ),
            NotConvergedWarning,
            stacklevel=2,
        )
    xp = array_namespace(found[0])
    return Eigen(
        values=values,
        vectors=xp.stack(found, axis=1),
        residuals=residuals,
        converged=converged,
        num_matvecs=op.num_matvecs - start_count,
        which="LM",
        tol=tol,
        precision=precision_of(op),
    )

