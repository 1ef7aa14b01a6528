"""Stochastic trace estimation: Hutchinson, Hutch++ and XTrace.

All three methods only multiply the operator with blocks of random probe vectors through
:meth:`Operator.matmat` (the operator chunks the block by ``chunk_size``). Probes are
drawn in numpy float64 from ``seed`` and converted with :meth:`Operator.asarray`, so one
seed gives the same probes, and the same estimate, on numpy, torch and jax operators.
Small dense work (``k x k`` matrices) is done on the host in numpy float64.

References
----------
M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for
Laplacian smoothing splines", Comm. Statist. Simulation Comput. 18 (1989).
R. A. Meyer, C. Musco, C. Musco, D. P. Woodruff, "Hutch++: Optimal stochastic trace
estimation", SIAM Symposium on Simplicity in Algorithms (SOSA 2021).
E. N. Epperly, J. A. Tropp, R. J. Webber, "XTrace: Making the most of every sample in
stochastic trace estimation", SIAM J. Matrix Anal. Appl. 45(1) (2024).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._array import array_namespace, default_rng, dtype_eps, safe_column_norms, to_numpy
from ._docs import fill_doc
from ._operator import Operator
from ._precision import precision_of
from ._results import TraceEstimate
from ._util import check_operator, check_positive_int, progress_bar

__all__ = ["trace"]

TRACE_METHODS = ("hutchinson", "hutch++", "xtrace", "exact")
DISTRIBUTIONS = ("rademacher", "gaussian")

#: With ``target_stderr``, Hutchinson draws probes in blocks of this many columns and
#: checks the running standard error after each block.
STOPPING_BLOCK = 10


# ---------------------------------------------------------------------- shared helpers
def _check_distribution(distribution: Any, where: str) -> str:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"{where}: unknown distribution {distribution!r}; choose one of {DISTRIBUTIONS}"
        )
    return distribution


def _check_method(method: Any, methods: tuple[str, ...], where: str) -> str:
    if method not in methods:
        raise ValueError(f"{where}: unknown method {method!r}; choose one of {methods}")
    return method


def _draw_probes(
    rng: np.random.Generator, n: int, k: int, distribution: str = "rademacher"
) -> np.ndarray:
    """``k`` probe vectors of length ``n`` as the columns of a numpy float64 ``(n, k)`` array.

    Rademacher entries are +-1, Gaussian entries standard normal; both have
    ``E[w w^T] = I``.
    """
    if distribution == "rademacher":
        probes = 2.0 * rng.integers(0, 2, size=(k, n)).astype(np.float64) - 1.0
    else:
        probes = rng.standard_normal((k, n))
    return np.ascontiguousarray(probes.T)


def _host(x: Any) -> np.ndarray:
    return np.asarray(to_numpy(x), dtype=np.float64)


def _column_dots(A: Any, B: Any) -> np.ndarray:
    """``[a_j . b_j]_j`` for two native ``(n, k)`` arrays, as numpy float64."""
    xp = array_namespace(A)
    return _host(xp.sum(A * B, axis=0))


def _qr(Y: Any) -> tuple[Any, np.ndarray]:
    """Thin Householder QR of a native ``(n, k)`` array (``k <= n``): native Q, numpy R."""
    xp = array_namespace(Y)
    Q, R = xp.linalg.qr(Y)
    return Q, _host(R)


def _numerically_singular(R: np.ndarray, dtype: Any) -> bool:
    """True when the triangular ``R`` is singular to working precision."""
    eps = dtype_eps(dtype)  # the products behind R carry the operator dtype's rounding
    diag = np.abs(np.diag(R))
    top = float(diag.max(initial=0.0))
    return top == 0.0 or float(diag.min()) <= max(R.shape[0], 10) * eps * top


def _loo_directions(R: np.ndarray) -> np.ndarray:
    """Columns ``s_i`` of ``R^{-T}``, normalised: ``Q (I - s_i s_i^T) Q^T`` projects onto
    the range of ``Y`` with column ``i`` left out (Epperly, Tropp, Webber 2024, Sec. 2.1)."""
    from scipy.linalg import solve_triangular

    S = solve_triangular(R, np.eye(R.shape[0]), lower=False).T  # R^{-T}
    return S / safe_column_norms(S)[None, :]


def _stderr(samples: np.ndarray) -> float:
    """Standard error of the mean; ``inf`` when one sample leaves it unestimated."""
    if samples.size < 2:
        return math.inf
    scale = float(np.max(np.abs(samples)))
    # Samples near 1e-160 or 1e160 have squares out of range: scale them first. Ordinary
    # sizes (and zero or non-finite samples) take the plain formula.
    extreme = 0.0 < scale < 1e-150 or 1e150 < scale < math.inf
    if extreme:
        samples = samples / scale
    stderr = float(np.std(samples, ddof=1) / math.sqrt(samples.size))
    return scale * stderr if extreme else stderr


def _xtrace_stderr(
    estimates: np.ndarray, S: np.ndarray, H: np.ndarray, W: np.ndarray, V: np.ndarray
) -> float:
    """Standard error of the XTrace estimate ``mean(t_i)``, for correlated ``t_i``.

    The leave-one-out estimates ``t_i`` share probes, so they are positively correlated
    and ``std(t_i) / sqrt(k)`` is too small. Write ``e_i = t_i - tr(A)``, ``v = E e_i^2``
    and ``C = E e_i e_j`` (``i != j``; exchangeability makes both the same for all
    pairs). Then ``Var(mean t) = v / k + (k - 1) C / k``, while the sample variance
    ``s^2`` of the ``t_i`` has expectation ``v - C``: ``Var(mean t) = E[s^2] / k + C``.

    ``C`` has an unbiased estimate from leave-two-out estimates. ``t_i^(-j)`` is ``t_i``
    with probe ``j`` also left out of the basis: the basis of ``A Omega`` without
    columns ``i`` and ``j``, plus the Hutchinson sample of probe ``i`` on its
    complement. Given the probes other than ``i``, probe ``i`` is a fresh Hutchinson
    probe for both ``t_i`` and ``t_i^(-j)``, so ``E[e_i | w_l, l != i] = 0``, and the same
    for ``e_i^(-j) = t_i^(-j) - tr(A)``, which does not depend on ``w_j``. Hence the
    three cross terms in ``E[(e_i - e_i^(-j)) (e_j - e_j^(-i))]`` vanish and

        C = E[D_ij D_ji],  D_ij = t_i - t_i^(-j),

    observable without ``tr(A)``. The returned variance is
    ``s^2 / k + max(0, sum_{i != j} D_ij D_ji / (k (k - 1)))``: without the ``max`` it
    is exactly unbiased for ``Var(mean t)``. A negative covariance estimate (no evidence
    of the correlation; a few per cent of draws at ``k = 20``, more at smaller ``k``)
    falls back to the independent-sample formula, so the total is never negative and
    never below it. The error estimate of Epperly, Tropp & Webber (and their
    ``xtrace.m``) is the ``s / sqrt(k)`` term alone.

    In the coordinates of ``Q``, the basis of ``t_i`` is ``Q (I - s_i s_i^T) Q^T`` and
    that of ``t_i^(-j)`` is ``Q (I - s_i s_i^T - u u^T) Q^T`` with ``u`` the unit part
    of ``s_j`` orthogonal to ``s_i``. Expanding both estimates, with ``a = s_i . w_i``,
    ``b = u . w_i`` and ``v_i = Q^T A w_i - H (w_i - a s_i)`` (the columns of ``V``):

        D_ij = (1 - b^2) u^T H u - 2 b u . v_i,

    for all pairs at once from the ``k x k`` products ``S^T S``, ``S^T H S``, ``S^T W``
    and ``S^T V``: ``O(k^3)`` host work and no further products with the operator.
    """
    k = estimates.size
    independent = _stderr(estimates)
    c = S.T @ S  # c_ij = s_i . s_j, symmetric with unit diagonal
    G = S.T @ (H @ S)
    M = S.T @ W  # M[j, i] = s_j . w_i
    N = S.T @ V  # N[j, i] = s_j . v_i
    # Arrays indexed [j, i]: u_ij = (s_j - c_ij s_i) / sqrt(1 - c_ij^2).
    one_minus_c2 = 1.0 - c**2
    np.fill_diagonal(one_minus_c2, 1.0)
    one_minus_c2 = np.maximum(one_minus_c2, np.finfo(np.float64).tiny)
    g = np.diag(G)
    uHu = (g[:, None] - 2.0 * c * G + c**2 * g[None, :]) / one_minus_c2
    root = np.sqrt(one_minus_c2)
    b = (M - c * np.diag(M)[None, :]) / root
    uv = (N - c * np.diag(N)[None, :]) / root
    D = (1.0 - b**2) * uHu - 2.0 * b * uv
    np.fill_diagonal(D, 0.0)
    # Scale by the largest term first, so that squares of extreme sizes stay in range.
    scale = max(float(np.max(np.abs(D))), independent)
    if not (0.0 < scale < math.inf):
        return independent
    D = D / scale
    covariance = max(0.0, float(np.sum(D * D.T)) / (k * (k - 1)))
    return scale * math.sqrt((independent / scale) ** 2 + covariance)


# ---------------------------------------------------------------------- the estimators
def _hutchinson(
    op: Operator,
    num_matvecs: int,
    rng: np.random.Generator,
    distribution: str,
    target_stderr: float | None,
    bar: Any,
) -> tuple[float, float, int, np.ndarray]:
    block = num_matvecs if target_stderr is None else STOPPING_BLOCK
    samples: list[np.ndarray] = []
    spent = 0
    while spent < num_matvecs:
        k = min(block, num_matvecs - spent)
        Omega = op.asarray(_draw_probes(rng, op.n, k, distribution))
        samples.append(_column_dots(Omega, op.matmat(Omega)))
        spent += k
        bar.update(k)
        if target_stderr is not None and _stderr(np.concatenate(samples)) <= target_stderr:
            break
    all_samples = np.concatenate(samples)
    return float(np.mean(all_samples)), _stderr(all_samples), spent, all_samples


def _hutchpp(
    op: Operator, num_matvecs: int, rng: np.random.Generator, distribution: str, bar: Any
) -> tuple[float, float, int, np.ndarray]:
    n = op.n
    sketch = min(num_matvecs // 3, n)
    S = op.asarray(_draw_probes(rng, n, sketch, distribution))
    Q, _ = _qr(op.matmat(S))
    bar.update(sketch)
    xp = array_namespace(Q)
    if sketch == n:  # Q spans the whole space: the trace is tr(Q^T A Q), exactly.
        AQ = op.matmat(Q)
        bar.update(sketch)
        return float(np.sum(_column_dots(Q, AQ))), 0.0, 2 * sketch, np.zeros(0)
    num_probes = num_matvecs - 2 * sketch
    G = op.asarray(_draw_probes(rng, n, num_probes, distribution))
    G = G - Q @ (Q.T @ G)  # (I - Q Q^T) G
    products = op.matmat(xp.concat([Q, G], axis=1))  # one block: A Q and A (I - Q Q^T) G
    bar.update(sketch + num_probes)
    low_rank = float(np.sum(_column_dots(Q, products[:, :sketch])))
    samples = _column_dots(G, products[:, sketch:])  # g^T (I-QQ^T) A (I-QQ^T) g
    value = low_rank + float(np.mean(samples))
    return value, _stderr(samples), num_matvecs, samples


def _xtrace(
    op: Operator, num_matvecs: int, rng: np.random.Generator, distribution: str, bar: Any
) -> tuple[float, float, int, np.ndarray]:
    n = op.n
    k = min(num_matvecs // 2, n)
    Omega = op.asarray(_draw_probes(rng, n, k, distribution))
    Y = op.matmat(Omega)
    bar.update(k)
    Q, R = _qr(Y)
    Z = op.matmat(Q)
    bar.update(k)
    W = _host(Q.T @ Omega)  # k x k
    H = _host(Q.T @ Z)
    H = 0.5 * (H + H.T)
    T = _host(Z.T @ Omega)
    dOmY = _column_dots(Omega, Y)
    trH = float(np.trace(H))

    if k == n or _numerically_singular(R, op.dtype):
        # R singular means rank(A) < k and range(Y) = range(A); with k = n, Q spans the
        # space. Either way tr(Q^T A Q) = tr(A). The Hutchinson terms on the complement,
        # w^T P A P w = w^T y - 2 t.(Q^T w) + (Q^T w)^T H (Q^T w) with P = I - QQ^T, are
        # then zero up to rounding; they cost no products and serve as the error estimate.
        resid = dOmY - 2.0 * np.sum(W * T, axis=0) + np.sum(W * (H @ W), axis=0)
        value = trH + float(np.mean(resid))
        return value, _stderr(resid), 2 * k, trH + resid

    # Leave-one-out estimates, vectorised (Epperly, Tropp, Webber 2024, Sec. 2.1 and their
    # reference implementation xtrace.m): estimate i uses the basis of A Omega without
    # column i plus one Hutchinson sample from probe i on the complement.
    S = _loo_directions(R)
    HW = H @ W
    dSW = np.sum(S * W, axis=0)
    dSHS = np.sum(S * (H @ S), axis=0)
    dWR = np.sum(W * R, axis=0)
    dTW = np.sum(T * W, axis=0)
    dWHW = np.sum(W * HW, axis=0)
    dSRmHW = np.sum(S * (R - HW), axis=0)
    dTmHRS = np.sum((T - H.T @ W) * S, axis=0)
    estimates = trH - dSHS + dOmY - dWR - dTW + dWHW + dSW * dSRmHW + dSW**2 * dSHS + dTmHRS * dSW
    stderr = _xtrace_stderr(estimates, S, H, W, 0.5 * (T + R) - H @ (W - S * dSW))
    return float(np.mean(estimates)), stderr, 2 * k, estimates


@fill_doc
def trace(
    op: Any,
    *,
    method: str = "xtrace",
    num_matvecs: int = 100,
    seed: Any = None,
    target_stderr: float | None = None,
    distribution: str = "rademacher",
    progress: bool = False,
    checkpoint: Any = None,
    checkpoint_every: int | None = None,
) -> TraceEstimate:
    """Estimate the trace of a symmetric operator from products with random probes.

    Parameters
    ----------
    op : Operator or square 2-D array
        The symmetric operator (a plain array is wrapped in a :class:`DenseOperator`).
    method : {"xtrace", "hutch++", "hutchinson", "exact"}
        * ``"hutchinson"``: the mean of ``w^T A w`` over ``num_matvecs`` probes
          (Hutchinson 1989); ``stderr`` is the sample standard deviation over ``sqrt(m)``.
        * ``"hutch++"``: ``tr(Q^T A Q)`` on the range ``Q`` of ``A S`` plus Hutchinson on
          the complement (Meyer, Musco, Musco, Woodruff 2021). Budget: ``m // 3`` sketch
          products, as many for ``A Q``, and the rest (``m - 2 (m // 3)``) Hutchinson
          probes; ``stderr`` is the standard error of the Hutchinson part. Needs ``m >= 3``.
        * ``"xtrace"``: the exchangeable estimator of Epperly, Tropp & Webber (2024):
          ``m // 2`` probes, ``A Omega`` and ``A Q``; every probe serves both in the
          low-rank basis and, left out of it, as a Hutchinson sample. The value is the
          mean of the ``k = m // 2`` leave-one-out estimates ``t_i``. ``stderr`` estimates
          the standard deviation of that mean: ``sqrt(s^2 / k + C)``, with ``s^2`` the
          sample variance of the ``t_i`` and ``C`` an unbiased estimate of their
          covariance (see Notes). Needs ``m >= 4``.
        * ``"exact"``: ``op.exact_trace()``; raises
          :class:`~dualhess.ExactUnavailableError` when the operator has none.

        When a sketch would exceed ``n`` columns it is capped at ``n``; the basis then
        spans the whole space and the trace is exact (``stderr`` at rounding level).
    num_matvecs : int
        The budget ``m`` of operator products. ``num_matvecs`` in the result is what was
        actually spent, never more (an odd budget leaves one product unused by XTrace;
        ``target_stderr`` may stop Hutchinson early).
    seed : int, numpy.random.Generator or None
        Randomness for the probes (drawn in numpy float64); None is truly random.
    target_stderr : float, optional
        Hutchinson only: draw probes in blocks of :data:`STOPPING_BLOCK` and stop as soon
        as the running standard error is at most this.
    distribution : {"rademacher", "gaussian"}
        Probe entries: random signs or standard normal.
    progress : bool
        Show a progress bar over the products.
    %(checkpoint)s

    Returns
    -------
    TraceEstimate
        ``value`` and ``stderr`` (plain floats; ``stderr`` is ``inf`` when a single
        Hutchinson sample leaves it unestimated and 0 for ``"exact"``), ``num_matvecs``,
        ``method`` and ``samples`` (numpy): Hutchinson's quadratic forms ``w^T A w``;
        for Hutch++ the Hutchinson terms on the complement of ``Q`` (the value adds
        ``tr(Q^T A Q)`` to their mean); for XTrace the ``m // 2`` leave-one-out estimates.

    Notes
    -----
    Hutchinson's and Hutch++'s standard errors treat their samples as independent, which
    they are. XTrace's leave-one-out estimates ``t_i`` are exchangeable but positively
    correlated (they share probes), so ``Var(mean t_i) = Var(t_1) / k + (1 - 1/k) C``
    with ``C = Cov(t_i, t_j)``, while the sample variance ``s^2`` estimates
    ``Var(t_1) - C``: the independent-sample error ``s / sqrt(k)`` of Epperly, Tropp &
    Webber (and their ``xtrace.m``) misses ``C`` and comes out some 10-35 % too small.
    ``stderr`` adds ``C``, estimated without bias by the mean of ``D_ij D_ji`` over pairs
    ``i != j``, where ``D_ij = t_i - t_i^(-j)`` and ``t_i^(-j)`` is ``t_i`` with probe
    ``j`` also left out of the basis (all from the same products; ``O(k^3)`` host work).
    The estimate is unbiased because, given the other probes, probe ``i`` is a fresh
    Hutchinson probe for both ``t_i`` and ``t_i^(-j)``; a negative covariance estimate
    (occasional, mostly at small ``k``) is replaced by 0. So ``stderr^2`` estimates the
    mean squared error of the value; with few probes it is itself noisy, and
    ``+-2 stderr`` then covers the trace somewhat less often than a normal 95 % (about
    93-95 % at ``k = 20``, like a Student t interval). XTrace uses the probes
    as drawn (Rademacher or Gaussian); the paper's optional "improved" rescaling for
    spherical probes is not applied. For a sketch ``A Omega`` that is rank-deficient to
    working precision (``rank(A) < m // 2``), its range is the range of ``A`` and
    XTrace returns ``tr(Q^T A Q)``, which then is the trace.

    Examples
    --------
    >>> import numpy as np, dualhess
    >>> from dualhess import trace
    >>> op = dualhess.DenseOperator(np.diag(1.0 / np.arange(1.0, 201.0) ** 2))
    >>> est = trace(op, method="xtrace", num_matvecs=60, seed=0)
    >>> abs(est.value - float(np.sum(1.0 / np.arange(1.0, 201.0) ** 2))) < 1e-2
    True
    >>> est.num_matvecs
    60
    """
    if checkpoint is not None:
        from ._checkpoint import checkpointed

        op = check_operator(op, "trace")
        settings = {"method": method, "num_matvecs": num_matvecs, "seed": seed, "target_stderr": target_stderr, "distribution": distribution}
        with checkpointed(op, checkpoint, checkpoint_every, "trace", settings) as work:
            return trace(work, method=method, num_matvecs=num_matvecs, seed=seed, target_stderr=target_stderr, distribution=distribution, progress=progress)
    where = "trace"
    op = check_operator(op, where)
    method = _check_method(method, TRACE_METHODS, where)
    distribution = _check_distribution(distribution, where)
    if target_stderr is not None:
        if method != "hutchinson":
            raise ValueError(
                f"{where}: target_stderr stops Hutchinson early; it is not supported for "
                f"method={method!r}"
            )
        if (
            isinstance(target_stderr, bool)
            or not (isinstance(target_stderr, (int, float, np.floating)) and target_stderr > 0)
            or not math.isfinite(float(target_stderr))
        ):
            raise ValueError(
                f"{where}: target_stderr must be a positive finite number, got {target_stderr!r}"
            )
        target_stderr = float(target_stderr)

    if method == "exact":
        before = op.num_matvecs
        value = float(op.exact_trace())
        if not math.isfinite(value):
            raise FloatingPointError(f"{where}: the exact trace is not finite ({value})")
        return TraceEstimate(value, 0.0, op.num_matvecs - before, "exact", None, precision_of(op))

    m = check_positive_int(num_matvecs, "num_matvecs", where)
    minimum = {"hutchinson": 1, "hutch++": 3, "xtrace": 4}[method]
    if m < minimum:
        raise ValueError(
            f"{where}: method={method!r} needs num_matvecs >= {minimum}, got {m}"
            + (
                " (sketch, basis products and at least one Hutchinson probe)"
                if method == "hutch++"
                else " (two probes for a leave-one-out estimate, each used twice)"
                if method == "xtrace"
                else ""
            )
        )
    rng = default_rng(seed)
    bar = progress_bar(progress, m, f"trace ({method})", unit="products")
    try:
        if method == "hutchinson":
            value, stderr, spent, samples = _hutchinson(
                op, m, rng, distribution, target_stderr, bar
            )
        elif method == "hutch++":
            value, stderr, spent, samples = _hutchpp(op, m, rng, distribution, bar)
        else:
            value, stderr, spent, samples = _xtrace(op, m, rng, distribution, bar)
    finally:
        bar.close()
    if not math.isfinite(value):
        raise FloatingPointError(f"{where}: the estimate is not finite ({value})")
    return TraceEstimate(value, stderr, spent, method, samples, precision_of(op))
