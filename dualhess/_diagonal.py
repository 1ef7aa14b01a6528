"""Stochastic diagonal estimation: Hutchinson (Bekas et al.) and XDiag.

Probes are Rademacher vectors drawn in numpy float64 from ``seed`` and converted with
:meth:`Operator.asarray` (same seed, same estimate on numpy, torch and jax); the operator
is only applied to blocks of probes through :meth:`Operator.matmat`.

References
----------
C. Bekas, E. Kokiopoulou, Y. Saad, "An estimator for the diagonal of a matrix",
Appl. Numer. Math. 57 (2007).
E. N. Epperly, J. A. Tropp, R. J. Webber, "XTrace: Making the most of every sample in
stochastic trace estimation", SIAM J. Matrix Anal. Appl. 45(1) (2024), Sec. 4 (XDiag).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._array import array_namespace, default_rng, to_numpy
from ._operator import Operator
from ._results import DiagonalEstimate
from ._trace import _check_method, _draw_probes, _host, _loo_directions, _numerically_singular, _qr
from ._util import check_operator, check_positive_int, progress_bar

__all__ = ["diagonal"]

DIAGONAL_METHODS = ("xdiag", "hutchinson", "exact")


def _hutchinson(op: Operator, m: int, rng: np.random.Generator, bar: Any) -> tuple[Any, int]:
    # Bekas, Kokiopoulou, Saad (2007): sum_k w_k * A w_k / sum_k w_k * w_k (elementwise).
    Omega = op.asarray(_draw_probes(rng, op.n, m, "rademacher"))
    AOmega = op.matmat(Omega)
    bar.update(m)
    xp = array_namespace(Omega)
    return xp.sum(Omega * AOmega, axis=1) / xp.sum(Omega * Omega, axis=1), m


def _xdiag(op: Operator, m: int, rng: np.random.Generator, bar: Any) -> tuple[Any, int]:
    n = op.n
    k = min(m // 2, n)
    Omega = op.asarray(_draw_probes(rng, n, k, "rademacher"))  # entries +-1: w * w = 1
    Y = op.matmat(Omega)
    bar.update(k)
    Q, R = _qr(Y)
    Z = op.matmat(Q)  # A Q, so (Q^T A)^T = Z for symmetric A
    bar.update(k)
    xp = array_namespace(Q)
    T = _host(Z.T @ Omega)  # Q^T A Omega, k x k
    low_rank = xp.sum(Q * Z, axis=1)  # diag(Q Q^T A)
    if k == n or _numerically_singular(R, op.dtype):
        # range(Q) contains range(A) (rank(A) < k, or Q spans the space): diag(QQ^T A) is
        # exact, and the Hutchinson correction diag((I - QQ^T) A Omega Omega^T) / k costs
        # no products and is zero up to rounding.
        correction = xp.sum(Omega * (Y - Q @ op.asarray(T)), axis=1) / k
        return low_rank + correction, 2 * k
    # Epperly, Tropp, Webber (2024), XDiag: leave-one-out bases Q (I - s_i s_i^T) Q^T,
    # each with the Hutchinson-Bekas correction from the left-out probe, averaged.
    S = _loo_directions(R)
    dST = np.sum(S * T, axis=0)
    QS = Q @ op.asarray(S)
    ZS = Z @ op.asarray(S)
    QT = Q @ op.asarray(T)
    QSST = Q @ op.asarray(S * dST[None, :])
    rest = (
        -xp.sum(QS * ZS, axis=1)
        + xp.sum(Omega * Y, axis=1)
        - xp.sum(Omega * QT, axis=1)
        + xp.sum(Omega * QSST, axis=1)
    )
    return low_rank + rest / k, 2 * k


def diagonal(
    op: Any,
    *,
    method: str = "xdiag",
    num_matvecs: int = 100,
    seed: Any = None,
    progress: bool = False,
) -> DiagonalEstimate:
    """Estimate the diagonal of a symmetric operator from products with random probes.

    Parameters
    ----------
    op : Operator or square 2-D array
        The symmetric operator (a plain array is wrapped in a :class:`DenseOperator`).
    method : {"xdiag", "hutchinson", "exact"}
        * ``"hutchinson"``: ``sum_k w_k * A w_k / sum_k w_k * w_k`` over ``num_matvecs``
          Rademacher probes (Bekas, Kokiopoulou, Saad 2007).
        * ``"xdiag"``: the exchangeable diagonal estimator of Epperly, Tropp & Webber
          (2024): ``m // 2`` probes give ``A Omega`` and a basis ``Q``, ``m // 2`` more
          products give ``A Q``; the diagonal of the low-rank part is exact and the
          remainder is estimated from each probe left out of the basis in turn. Much more
          accurate than Hutchinson when the spectrum decays. Needs ``m >= 2``; a basis
          that would exceed ``n`` columns is capped at ``n`` (then the result is exact).
        * ``"exact"``: ``op.exact_diagonal()``; raises
          :class:`~dualhess.ExactUnavailableError` when the operator has none.
    num_matvecs : int
        The budget ``m`` of products; the result reports what was spent (never more; an
        odd budget leaves one product unused by XDiag).
    seed : int, numpy.random.Generator or None
        Randomness for the probes (numpy float64); None is truly random.
    progress : bool
        Show a progress bar over the products.

    Returns
    -------
    DiagonalEstimate
        ``values``: a native ``(n,)`` array on the operator's device.

    Examples
    --------
    >>> import numpy as np, dualhess
    >>> from dualhess import diagonal
    >>> rng = np.random.default_rng(0)
    >>> U, _ = np.linalg.qr(rng.standard_normal((100, 100)))
    >>> A = (U * 0.5 ** np.arange(100)) @ U.T
    >>> est = diagonal(A, method="xdiag", num_matvecs=80, seed=0)
    >>> bool(np.max(np.abs(est.values - np.diag(A))) < 1e-8)
    True
    """
    where = "diagonal"
    op = check_operator(op, where)
    method = _check_method(method, DIAGONAL_METHODS, where)
    if method == "exact":
        before = op.num_matvecs
        values = op.exact_diagonal()
        host = to_numpy(values)
        if tuple(host.shape) != (op.n,):
            raise ValueError(
                f"{where}: {type(op).__name__}.exact_diagonal() returned shape "
                f"{tuple(host.shape)}, expected ({op.n},)"
            )
        if not np.all(np.isfinite(host)):
            raise FloatingPointError(f"{where}: the exact diagonal contains NaN or Inf")
        return DiagonalEstimate(values, op.num_matvecs - before, "exact")

    m = check_positive_int(num_matvecs, "num_matvecs", where)
    minimum = {"hutchinson": 1, "xdiag": 2}[method]
    if m < minimum:
        raise ValueError(f"{where}: method={method!r} needs num_matvecs >= {minimum}, got {m}")
    rng = default_rng(seed)
    bar = progress_bar(progress, m, f"diagonal ({method})")
    try:
        if method == "hutchinson":
            values, spent = _hutchinson(op, m, rng, bar)
        else:
            values, spent = _xdiag(op, m, rng, bar)
    finally:
        bar.close()
    if not np.all(np.isfinite(to_numpy(values))):
        raise FloatingPointError(f"{where}: the estimate contains NaN or Inf")
    return DiagonalEstimate(values, spent, method)
