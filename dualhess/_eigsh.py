"""Extreme eigenpairs of a symmetric operator by thick-restart Lanczos.

The basis is bounded (``max_basis`` expanded vectors). At a restart the wanted Ritz
vectors and their neighbours are kept ("thick restart") together with the residual
direction, so the method keeps the convergence history of the discarded Krylov space
(Wu & Simon 2000; the bookkeeping is Stewart's Krylov decomposition, 2001). Every new
vector is reorthogonalised twice against the whole basis, and the small Rayleigh-Ritz
problems are solved in numpy float64 on the host.

A Krylov space grown from one vector holds a single copy of each repeated eigenvalue.
Once the wanted pairs have converged, eigsh therefore grows a short Lanczos chain from a
fresh random vector orthogonal to the basis; if that chain turns up a wanted Ritz value
the basis had missed (another copy of a repeated eigenvalue, or an eigenvalue whose
eigenvector the start vector barely touched), the iteration goes on and checks again.

References
----------
K. Wu and H. Simon, "Thick-restart Lanczos method for large symmetric eigenvalue
problems", SIAM J. Matrix Anal. Appl. 22(2), 602-616 (2000).
G. W. Stewart, "A Krylov-Schur algorithm for large eigenproblems", SIAM J. Matrix Anal.
Appl. 23(3), 601-614 (2001).
R. B. Lehoucq, D. C. Sorensen, C. Yang, *ARPACK Users' Guide*, SIAM (1998) (the
``which`` conventions).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from ._array import (
    array_namespace,
    default_rng,
    dtype_eps,
    normal_vector,
    on_host,
    safe_column_norms,
    safe_norm,
    to_numpy,
)
from ._basis import Basis, check_basis, make_basis
from ._docs import fill_doc
from ._errors import NotConvergedWarning
from ._operator import Operator, OperatorError
from ._precision import WorkPrecisionOperator, precision_of, recomputed_residuals
from ._results import Eigen
from ._util import check_operator, check_symmetric_products, check_tolerance, progress_bar
from ._wrappers import HostOperator

__all__ = ["eigsh", "NotConvergedWarning"]

_WHICH = ("LA", "SA", "LM", "BE")
_CRITERIA = ("residual", "eigenvalue")

#: Lanczos steps spent on a fresh random vector to look for missed eigenvalues.
_CHECK_STEPS = 4



def _select(theta: np.ndarray, count: int, which: str) -> np.ndarray:
    """Indices of the ``count`` wanted values of ``theta``, in the documented output order."""
    count = min(count, len(theta))
    if which == "LA":
        return np.argsort(-theta, kind="stable")[:count]
    if which == "SA":
        return np.argsort(theta, kind="stable")[:count]
    if which == "LM":
        return np.argsort(-np.abs(theta), kind="stable")[:count]
    # BE: half from each end, one more from the high end when count is odd (ARPACK).
    order = np.argsort(theta, kind="stable")
    high = count - count // 2
    low = count // 2
    idx = np.concatenate([order[:low], order[len(order) - high :]])
    return idx[np.argsort(theta[idx], kind="stable")]


def _eps(op: Operator) -> float:
    return dtype_eps(op.dtype)


def _start_columns(op: Operator, v0: Any, block: int) -> list[Any]:
    """The columns of a start block ``v0`` as native vectors of ``op``, checked."""
    if v0 is None:
        return []
    x = op.asarray(v0) if isinstance(v0, (np.ndarray, list, tuple)) else v0
    if x.dtype != op.dtype:
        x = op.asarray(to_numpy(x))
    shape = tuple(x.shape)
    if len(shape) == 1:
        x = array_namespace(x).reshape(x, (-1, 1))
        shape = tuple(x.shape)
    if len(shape) != 2 or shape[0] != op.n:
        raise ValueError(f"eigsh: v0 must have shape ({op.n},) or ({op.n}, j), got {tuple(shape)}")
    if shape[1] > block:
        raise ValueError(
            f"eigsh: v0 has {shape[1]} columns but block_size={block}; pass at most "
            "block_size start vectors"
        )
    host = np.asarray(to_numpy(x), dtype=np.float64)
    if not np.all(np.isfinite(host)) or not np.all(np.any(host != 0, axis=0)):
        raise ValueError("eigsh: v0 has a zero or non-finite column; pass a finite, nonzero start")
    return [x[:, j] for j in range(shape[1])]


class _Krylov:
    """A Krylov decomposition ``A V[:, E] = V G[:, E]`` with an orthonormal basis ``V``.

    ``E`` are the expanded columns (``A`` has been applied to them); the others are
    unexpanded directions (the residual of the Lanczos relation, or fresh random vectors).
    ``G[i, j] = v_i^T A v_j`` for expanded ``j``; the rows of unexpanded ``i`` are the
    couplings that make up the residuals of the Ritz pairs.
    """

    def __init__(self, op: Operator, rng: np.random.Generator, eps: float, capacity: int,
                 basis: str = "device", basis_dir: Any = None) -> None:
        self.op = op
        self.rng = rng
        self.eps = eps
        # The basis is allocated with ``capacity`` rows so that every step runs on the same
        # array shapes (jax compiles once per shape) and nothing is copied as it grows.
        self.capacity = min(capacity, op.n)
        self.mode = basis
        self.basis_dir = basis_dir
        self.V: Basis | None = None
        self.xp: Any = None
        self.G = np.zeros((0, 0))
        self.expanded = np.zeros(0, dtype=bool)
        self.scale = 0.0
        # max |v_i^T A v_j - v_j^T A v_i| over expanded pairs: both coefficients are in G
        # (the later product's projection and the earlier product's coupling), so a
        # non-symmetric operator is measured without a single extra product.
        self.asymmetry = 0.0

    @property
    def size(self) -> int:
        return self.G.shape[0]

    @property
    def num_expanded(self) -> int:
        return int(self.expanded.sum())

    def close(self) -> None:
        if self.V is not None:
            self.V.close()

    def _orthogonalize(self, w: Any, overwrite: bool = False) -> tuple[Any, np.ndarray]:
        """Classical Gram-Schmidt twice ("twice is enough") against the whole basis."""
        if self.V is None:
            return w, np.zeros(0)
        return self.V.orthogonalize(w, overwrite=overwrite)

    def _append(self, v: Any, divisor: float | None = None) -> None:
        if self.V is None:
            self.V = make_basis(self.mode, self.capacity, v, self.op.fixed_shapes,
                                self.basis_dir)
        # rare growth: each search for missed eigenvalues adds one
        self.V.append(v, divisor)
        size = self.size + 1
        G = np.zeros((size, size))
        G[: size - 1, : size - 1] = self.G
        self.G = G
        self.expanded = np.append(self.expanded, False)

    def add_vector(self, z: Any, owned: bool = False) -> bool:
        """Append ``z`` orthonormalised against the basis; False when it adds no direction
        (the space is full, or ``z`` lies in the span of the basis to rounding).

        ``owned``: ``z`` is this object's own (a random direction), so a host or disk basis
        orthogonalises it in place; the direction is divided by its norm as it is stored.
        At most one vector besides ``z`` exists meanwhile (GPT-2 small: a check for missed
        eigenvalues held three, 1.4 GB).
        """
        if self.size >= self.op.n:
            return False
        if self.xp is None:
            self.xp = array_namespace(z)
        z0 = safe_norm(z, self.xp)
        z, _ = self._orthogonalize(z, overwrite=owned)
        norm = safe_norm(z, self.xp)
        if not (norm > 1e-3 * math.sqrt(self.eps) * z0 or (self.size == 0 and norm > 0)):
            return False
        if self.size:
            # A second orthogonalisation keeps a small remainder orthogonal (the vector is
            # this object's own now: in place).
            z, _ = self._orthogonalize(z, overwrite=True)
            norm = safe_norm(z, self.xp)
        self._append(z, divisor=norm)
        return True

    def add_random(self) -> bool:
        """Append a random unit vector orthogonal to the basis; False when the space is full."""
        if self.size >= self.op.n:
            return False
        op = self.op
        return any(
            self.add_vector(normal_vector(self.rng, op.n, op.dtype, op.asarray), owned=True)
            for _ in range(3)
        )

    def mix_unexpanded(self) -> None:
        """Rotate the unexpanded directions by a random orthogonal matrix.

        The last unexpanded column becomes a random mix of all of them, so a Lanczos chain
        grown from it explores every direction the basis has not expanded yet.
        """
        U = np.flatnonzero(~self.expanded)
        if len(U) < 2:
            return
        rotation, _ = np.linalg.qr(self.rng.standard_normal((len(U), len(U))))
        self.V.combine_rows(U, rotation, U)  # only the unexpanded rows move
        self.G[U, :] = rotation.T @ self.G[U, :]

    def expand(self, j: int) -> None:
        """Apply the operator to column ``j`` and append the new orthonormal direction."""
        self._absorb(j, self.op.matvec(self.V.row(j)))

    def expand_block(self, columns: np.ndarray) -> None:
        """Apply the operator to several columns in one ``matmat`` call (block Krylov).

        Each product is then orthogonalised against the basis as it stands, including the
        directions appended for the columns before it, so ``A V[:, E] = V G[:, E]`` stays
        exact: the same decomposition as one column at a time, with the products batched.
        """
        if len(columns) == 1:
            self.expand(int(columns[0]))
            return
        index = np.asarray(columns, dtype=np.int64)
        W = self.op.matmat(self.V.rows(index))
        for position, j in enumerate(index):
            self._absorb(int(j), W[:, position])

    def _absorb(self, j: int, w: Any) -> None:
        """Record ``w = A V[:, j]``: its coefficients in ``G`` and its new direction."""
        op, xp = self.op, self.xp
        size_before = self.size
        norm_in = safe_norm(w, xp)
        # a product the operator gave away is orthogonalised in place (host and disk bases)
        w, h = self._orthogonalize(w, overwrite=op.owns_outputs)
        beta = safe_norm(w, xp)
        if not (np.all(np.isfinite(h)) and math.isfinite(beta) and math.isfinite(norm_in)):
            raise OperatorError(
                f"eigsh: the operator produced NaN or Inf ({type(op).__name__}); check the "
                "parameters, the data and the loss for non-finite values"
            )
        self.scale = max(self.scale, float(np.max(np.abs(h), initial=0.0)), norm_in)
        earlier = np.flatnonzero(self.expanded[:size_before])
        if len(earlier):
            gap = np.abs(h[earlier] - self.G[j, earlier])
            self.asymmetry = max(self.asymmetry, float(np.max(gap)))
        self.expanded[j] = True
        # Invariant subspace (breakdown): the new direction is rounding noise. Drop it and
        # continue from a random vector orthogonal to the basis, uncoupled (G entry 0).
        if beta > 100 * self.eps * max(norm_in, self.scale):
            self._append(w, divisor=beta)  # w / beta, divided as it is stored
            self.G[size_before, j] = beta
        else:
            self.add_random()
        self.G[:size_before, j] = h

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values, coefficient vectors (in expanded-column space) and residual norms."""
        E = np.flatnonzero(self.expanded)
        B = self.G[np.ix_(E, E)]
        theta, Y = np.linalg.eigh((B + B.T) / 2)
        # Residual coefficients of A V_E y - theta V_E y in the basis V (exact relation).
        R = self.G[:, E] @ Y
        R[E, :] -= Y * theta
        return theta, Y, safe_column_norms(R)

    def restart(self, keep: np.ndarray, Y: np.ndarray, theta: np.ndarray) -> None:
        """Keep the Ritz vectors ``V_E Y[:, keep]`` and every unexpanded direction.

        In place: the kept Ritz vectors overwrite the first rows of the basis and the
        unexpanded directions move down behind them (no second copy of the basis).
        """
        E = np.flatnonzero(self.expanded)
        U = np.flatnonzero(~self.expanded)
        kept, p = len(keep), len(U)
        M = np.zeros((self.size, kept + p))
        M[E, :kept] = Y[:, keep]
        M[U, np.arange(kept, kept + p)] = 1.0
        self.V.combine_rows(np.arange(self.size), M, np.arange(kept + p))
        self.V.truncate(kept + p)
        G = np.zeros((kept + p, kept + p))
        G[:kept, :kept] = np.diag(theta[keep])
        G[kept:, :kept] = self.G[np.ix_(U, E)] @ Y[:, keep]
        self.G = G
        self.expanded = np.arange(kept + p) < kept

    def vectors(self, Y: np.ndarray) -> Any:
        E = np.flatnonzero(self.expanded)
        M = np.zeros((self.size, Y.shape[1]))
        M[E, :] = Y
        return self.V.combination(M)


def _show_progress(bar: Any, bounds: np.ndarray, tol: float, scale: float, spent: int) -> None:
    """Converged pairs, the worst relative error (residual or error bound, as ``tol``
    measures it) and the products so far, on the bar."""
    if bar.disable:
        return
    relative = bounds / max(scale, np.finfo(np.float64).tiny)
    bar.n = int(np.sum(relative <= tol))
    bar.set_postfix_str(f"worst error {float(np.max(relative)):.1e} (tol {tol:.0e}), "
                        f"{spent} products", refresh=False)
    bar.update(0)


def error_bounds(theta: np.ndarray, residuals: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Bounds on ``|lambda - theta_i|`` for the Ritz pairs ``wanted``, from the residuals.

    For a symmetric operator, a unit vector with Rayleigh quotient ``theta`` and residual
    norm ``r`` has an eigenvalue ``lambda`` with ``|lambda - theta| <= r`` (Weyl / Krylov-
    Bogolyubov), and ``|lambda - theta| <= r^2 / gap`` when ``gap`` is the distance from
    ``theta`` to the rest of the spectrum (Kato-Temple; Parlett, *The Symmetric Eigenvalue
    Problem*, Thm 11.7.1; Saad, *Numerical Methods for Large Eigenvalue Problems*, 2nd ed.,
    Thm 3.9). The rest of the spectrum is estimated from the other Ritz values: each
    ``theta_j`` has an eigenvalue within ``r_j``, so ``gap_i = min_j |theta_i - theta_j| -
    r_j`` over ``j != i``. Where that gap is not positive, the bound is ``r``.
    """
    bounds = residuals[wanted].astype(np.float64).copy()
    if len(theta) < 2:
        return bounds
    for position, i in enumerate(wanted):
        others = np.arange(len(theta)) != i
        gap = float(np.min(np.abs(theta[others] - theta[i]) - residuals[others]))
        if gap > 0:
            # r * (r / gap), not r**2 / gap: no overflow for operators scaled near 1e200
            bounds[position] = min(bounds[position], residuals[i] * (residuals[i] / gap))
    return bounds


class _Rule:
    """When a Ritz pair has converged, relative to the largest Ritz value in magnitude:
    ``criterion="eigenvalue"``: its eigenvalue error bound within ``tol``;
    ``criterion="residual"``: its residual within ``tol``; and, when given, its residual
    within ``residual_tol``."""

    def __init__(self, tol: float, residual_tol: float | None, criterion: str) -> None:
        self.tol = tol
        self.residual_tol = residual_tol
        self.criterion = criterion

    def error(self, bounds: np.ndarray, residuals: np.ndarray) -> np.ndarray:
        """What ``tol`` is compared with."""
        return bounds if self.criterion == "eigenvalue" else residuals

    def converged(self, bounds: np.ndarray, residuals: np.ndarray, scale: float) -> np.ndarray:
        ok = self.error(bounds, residuals) <= self.tol * scale
        if self.residual_tol is not None:
            ok &= residuals <= self.residual_tol * scale
        return ok

    def floor(self, minimum: float) -> _Rule:
        """The same rule with both tolerances raised to at least ``minimum``."""
        residual = None if self.residual_tol is None else max(self.residual_tol, minimum)
        return _Rule(max(self.tol, minimum), residual, self.criterion)


class _ThickRestart:
    """One eigsh run as named steps: assess, check for missed eigenvalues, restart, expand."""

    def __init__(self, kry: _Krylov, k: int, which: str, rule: _Rule, m: int, b: int,
                 budget: int, native: Operator, bar: Any) -> None:
        self.kry, self.k, self.which, self.rule = kry, k, which, rule
        self.m, self.b, self.budget, self.native, self.bar = m, b, budget, native, bar
        self.keep_count = min(k + (m - k) // 2, m - b)
        self.start_count = kry.op.num_matvecs
        self.checking = False  # a check for missed eigenvalues is under way
        self.check_steps = 0
        self.snapshot: np.ndarray | None = None
        self.exhausted = False

    @property
    def spent(self) -> int:
        return self.kry.op.num_matvecs - self.start_count

    def assess(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
        """Ritz values, coefficient vectors, residuals, the wanted indices and their error
        bounds, and the scale (largest Ritz value in magnitude)."""
        theta, Y, res = self.kry.ritz()
        scale = float(np.max(np.abs(theta), initial=0.0))
        wanted = _select(theta, self.k, self.which)
        bounds = error_bounds(theta, res, wanted)
        return theta, Y, res, wanted, bounds, scale

    def converged_now(self) -> bool:
        """True once the wanted pairs have converged and the check (below) found nothing."""
        kry = self.kry
        if kry.num_expanded < self.k:
            return False
        check_symmetric_products(self.native, kry.asymmetry, kry.scale, self.spent, "eigsh",
                                 warn=False)
        theta, _, res, wanted, bounds, scale = self.assess()
        _show_progress(self.bar, self.rule.error(bounds, res[wanted]), self.rule.tol, scale,
                       self.spent)
        if not np.all(self.rule.converged(bounds, res[wanted], scale)):
            return False
        return self.check_for_missed(np.sort(theta[wanted]), scale)

    def check_for_missed(self, values: np.ndarray, scale: float) -> bool:
        """A Krylov space grown from one vector holds one copy of a repeated eigenvalue:
        once the wanted pairs have converged, grow a short chain from a fresh random
        direction (mixed into the unexpanded ones) and stop only if the wanted values did
        not move by more than the tolerance. True when the run may stop."""
        kry = self.kry
        complete = kry.size >= kry.op.n
        if self.checking and self.check_steps >= _CHECK_STEPS:
            self.checking = False
            unchanged = self.snapshot is not None and bool(
                np.all(np.abs(values - self.snapshot) <= 2 * self.rule.tol * scale)
            )
            # When the basis spans the whole space, the directions not yet expanded may
            # still hold wanted eigenvectors: expand them all.
            if unchanged and (not complete or kry.num_expanded == kry.size):
                return True
        if self.checking:
            return False
        self.snapshot = values
        if kry.add_random():
            kry.mix_unexpanded()  # look for missed eigenvalues from a fresh direction
        elif kry.num_expanded == kry.size:
            return True  # complete and expanded: the Ritz pairs are exact
        self.checking = True  # (when complete: expand what is left)
        self.check_steps = 0
        return False

    def restart_if_full(self) -> None:
        """Thick restart when the next block would not fit (b = 1: when ``m`` are expanded)."""
        kry = self.kry
        if kry.num_expanded + min(self.b, max(int(np.sum(~kry.expanded)), 1)) > self.m:
            theta, Y, res = kry.ritz()
            kry.restart(_select(theta, self.keep_count, self.which), Y, theta)

    def expand(self) -> bool:
        """Apply the operator to the next block of unexpanded directions; False when the
        basis is complete and expanded (nothing is left to do)."""
        kry = self.kry
        unexpanded = np.flatnonzero(~kry.expanded)
        if len(unexpanded) == 0:
            if not kry.add_random():
                return False  # complete basis: the Ritz pairs are exact to rounding
            unexpanded = np.flatnonzero(~kry.expanded)
        if self.checking and self.check_steps < _CHECK_STEPS:
            columns = unexpanded[-self.b :]  # grow the check chain (last in, first out)
            self.check_steps += 1
        else:
            columns = unexpanded[: self.b]  # first in, first out
        kry.expand_block(columns[: max(1, self.budget - self.spent)])
        return True

    def run(self) -> None:
        while not self.converged_now():
            if self.spent >= self.budget:
                self.exhausted = True
                return
            self.restart_if_full()
            if not self.expand():
                return


@fill_doc
def eigsh(
    op: Operator,
    k: int = 6,
    *,
    which: str = "LA",
    tol: float = 1e-6,
    max_matvecs: int | None = None,
    max_basis: int | None = None,
    seed: Any = None,
    return_vectors: bool = True,
    progress: bool = False,
    checkpoint: Any = None,
    checkpoint_every: int | None = None,
    block_size: int = 1,
    v0: Any = None,
    residual_tol: float | None = None,
    criterion: str = "eigenvalue",
    basis: str = "device",
    basis_dir: Any = None,
) -> Eigen:
    """Find ``k`` extreme eigenpairs of a symmetric operator (thick-restart Lanczos).

    Parameters
    ----------
    op : Operator
        A symmetric ``n x n`` operator (a plain 2-D array is wrapped in a
        :class:`~dualhess.DenseOperator`).
    k : int
        Number of eigenpairs, ``0 < k < n``.
    which : {'LA', 'SA', 'LM', 'BE'}
        ``'LA'`` largest algebraic, ``'SA'`` smallest algebraic, ``'LM'`` largest in
        magnitude, ``'BE'`` both ends: ``k // 2`` from the low end and the rest (one more
        when ``k`` is odd) from the high end, as in ARPACK.
    tol : float
        The accuracy asked for, relative to ``max|theta|`` (the largest Ritz value in
        magnitude, an estimate of ``||H||``). With ``criterion="eigenvalue"`` (default) a
        pair has converged when a bound on its eigenvalue error ``|lambda - theta|`` is at
        most ``tol * max|theta|``: ``r^2 / gap`` (Kato-Temple) where the gap to the rest of
        the spectrum is known from the other Ritz values, the residual norm ``r`` otherwise
        (see :func:`error_bounds`). With ``criterion="residual"``: when the residual
        ``||H v - lambda v|| <= tol * max|theta|``. A residual ``r`` gives an eigenvalue
        error near ``r^2 / gap``, so the residual test spends products on digits the
        eigenvalues do not need (``tol=1e-3`` delivered errors near 1e-5); what it buys is
        accurate eigenvectors (angle ``~ r / gap``): pass ``residual_tol`` (or
        ``criterion="residual"``) when the vectors matter.
        ``tol`` is raised to ten times the machine epsilon of the operator's dtype. A
        bfloat16/float16 operator runs its Krylov work in float32 and stops once the residuals
        reach the unit roundoff of its products; its ``residuals`` are then recomputed with
        ``k`` fresh products and ``converged`` is judged on them against ``tol`` itself, so a
        ``tol`` below what 16-bit products support is reported as not converged.
    criterion : {"eigenvalue", "residual"}
        What ``tol`` bounds (above): ``"eigenvalue"`` (default), the error of the
        eigenvalues in the user's terms and the fewest products; ``"residual"``, the
        residual norm (scipy/ARPACK's meaning; the default before 0.2.0).
    residual_tol : float, optional
        A pair has converged only when also ``||H v - lambda v|| <= residual_tol *
        max|theta|``: accurate eigenvectors (angle to the eigenvector ``<~ residual_tol *
        max|theta| / gap``) on top of the eigenvalue bound.
    max_matvecs : int, optional
        Budget of operator products (default ``100 * max_basis``). When it runs out the
        current pairs are returned with ``converged`` False where they have not converged,
        and a :class:`NotConvergedWarning` is issued.
    max_basis : int, optional
        Largest number of Lanczos vectors kept (ARPACK's ``ncv``); default
        ``min(n, max(2 k + 1, 20))``, plus ``6 block_size`` when ``block_size > 1``. Must be
        at least ``k + block_size``.
    seed : int, numpy.random.Generator or None
        Randomness for the start vector (drawn in numpy float64, so numpy, torch and jax see
        the same vector).
    v0 : array, shape (n,) or (n, j), optional
        Start vector(s), as in :func:`scipy.sparse.linalg.eigsh`: a warm start, e.g. the
        previous top eigenvector while the operator changes slowly (a native array of the
        operator's framework, or numpy). The Krylov basis starts from these directions; the
        rest of a block, and every later random direction, come from ``seed``.
    return_vectors : bool
        Return the eigenvectors (default True).
    progress : bool
        Show a progress bar: converged pairs of ``k``, the worst relative residual and the
        products spent.
    %(checkpoint)s
    block_size : int
        Columns expanded per step, in one ``op.matmat`` call (block Krylov). 1 (default) is
        plain Lanczos, the fewest products. Where a batch of ``b`` products costs much less
        than ``b`` single ones (vmapped or batched products on a GPU), ``block_size = b``
        trades a few more products for ``b`` times fewer operator calls; with ``b`` at least
        the multiplicity it also finds repeated eigenvalues in one pass. The default
        ``max_basis`` grows by ``6 b`` vectors (memory: ``max_basis + b + 3`` vectors of
        length ``n``). Measured on 2000 x 2000 matrices (k = 10, tol 1e-8): ``b = 8`` took
        12-14 operator calls where ``b = 1`` took 28-36 (96-112 products against 28-36),
        and 187 calls against 615 on a spectrum with a 5-fold and a dense cluster. On a
        CPU a batch of products is not much cheaper per column, so ``b = 1`` is fastest
        there (digits CNN, top-5: 1.0 s at ``b = 1``, 4.2 s at ``b = 4``).
    %(basis)s

    Returns
    -------
    Eigen
        ``values`` in this order: ``'LA'`` descending, ``'SA'`` ascending, ``'LM'`` by
        ``|lambda|`` descending, ``'BE'`` ascending; ``vectors`` a native ``(n, k)`` array on
        the operator's device (None unless ``return_vectors``); ``residuals``
        ``||H v - lambda v||`` from the Krylov relation (equal to recomputed ones up to
        rounding); ``converged``; ``num_matvecs`` spent.

    Raises
    ------
    ValueError
        For ``k <= 0``, ``k >= n``, an unknown ``which``, a negative ``tol`` or a bad
        ``max_basis``.
    OperatorError
        When the operator produces NaN or Inf.

    Notes
    -----
    The error bound of ``criterion="eigenvalue"`` assumes a symmetric operator and that
    the Ritz values see the spectrum near the wanted pairs (no eigenvalue hides between
    them unseen); the check for missed eigenvalues guards the second. Each new Lanczos
    vector is orthogonalised twice against the whole basis, so there are
    no spurious copies of converged eigenvalues. At a restart the ``k + (max_basis - k) // 2``
    best Ritz vectors are kept. Breakdown (an invariant subspace) continues from a random
    vector orthogonal to the basis. After convergence a few Lanczos steps from a fresh
    random vector look for eigenvalues the basis missed (copies of repeated eigenvalues).

    References
    ----------
    K. Wu and H. Simon, "Thick-restart Lanczos method for large symmetric eigenvalue
    problems", SIAM J. Matrix Anal. Appl. 22(2), 602-616 (2000).
    B. N. Parlett, *The Symmetric Eigenvalue Problem*, SIAM (1998), Sec. 11.7 (the
    Kato-Temple and gap bounds on Ritz values).

    Examples
    --------
    >>> import numpy as np
    >>> from dualhess import DenseOperator
    >>> from dualhess import eigsh
    >>> op = DenseOperator(np.diag([4.0, 3.0, 2.0, 1.0, -5.0]))
    >>> np.round(eigsh(op, k=2, seed=0).values, 8)
    array([4., 3.])
    >>> np.round(eigsh(op, k=1, which="LM", seed=0).values, 8)
    array([-5.])
    """
    if checkpoint is not None:
        from ._checkpoint import checkpointed

        op = check_operator(op, "eigsh")
        check_tolerance(tol, "tol", "eigsh")  # before the checkpoint's fingerprint product
        settings = {"k": k, "which": which, "tol": tol, "max_matvecs": max_matvecs, "max_basis": max_basis, "seed": seed}
        if block_size != 1:
            settings["block_size"] = block_size
        if residual_tol is not None:
            settings["residual_tol"] = residual_tol
        if criterion != "eigenvalue":
            settings["criterion"] = criterion
        with checkpointed(op, checkpoint, checkpoint_every, "eigsh", settings) as work:
            return eigsh(work, k=k, which=which, tol=tol, max_matvecs=max_matvecs, max_basis=max_basis, seed=seed, return_vectors=return_vectors, progress=progress, block_size=block_size, v0=v0, residual_tol=residual_tol, criterion=criterion, basis=basis, basis_dir=basis_dir)
    op = check_operator(op, "eigsh")
    m, b, budget = _check_sizes(op.n, k, which, block_size, max_basis, max_matvecs)
    tol = check_tolerance(tol, "tol", "eigsh")
    if residual_tol is not None:
        residual_tol = check_tolerance(residual_tol, "residual_tol", "eigsh")
    check_basis(basis, basis_dir, "eigsh")
    if criterion not in _CRITERIA:
        raise ValueError(f"eigsh: criterion must be one of {_CRITERIA}, got {criterion!r}")

    # Rule per device: where the operator's arrays compile per shape (jax) but live in host
    # memory (a CPU), the Krylov bookkeeping runs in numpy beside products that stay compiled
    # (a copy of a vector is a memcpy there; eager jax compiled each bookkeeping op and ran
    # it dispatch by dispatch). On an accelerator the fixed-shape basis stays on the device.
    native = op
    if op.fixed_shapes and on_host(op._like):
        op = HostOperator(native)
        if v0 is not None and not isinstance(v0, (np.ndarray, list, tuple)):
            v0 = np.asarray(to_numpy(v0), dtype=np.float64)
    eps = _eps(op)
    claim = _Rule(tol, residual_tol, criterion).floor(10 * eps)
    low = isinstance(native, WorkPrecisionOperator)
    # The Krylov work of a 16-bit operator is float32; its products carry 16 bits. Iterate
    # down to the products' unit roundoff at most (further steps only fit their rounding).
    rule = claim.floor(native.product_eps / 2) if low else claim
    kry = _Krylov(op, default_rng(seed), eps, capacity=m + 3 + b, basis=basis,
                  basis_dir=basis_dir)
    # The bar counts the wanted pairs that have converged, with the worst relative error
    # bound and the products so far (the budget is a cap, not a measure of progress).
    bar = progress_bar(progress, k, "eigsh", unit="pairs converged")
    try:
        # popped one by one: a loop variable would keep the last start vector alive (one
        # more vector, 475 MB on GPT-2 small) for the whole run
        start = _start_columns(op, v0, b)
        while start:
            kry.add_vector(start.pop(0))
        del start
        while kry.size < b:
            kry.add_random()
        solver = _ThickRestart(kry, k, which, rule, m, b, budget, native, bar)
        solver.run()
        bar.close()
        return _finish(solver, native, op, claim, return_vectors, low, tol)
    finally:
        bar.close()
        kry.close()


def _check_sizes(n: int, k: Any, which: Any, block_size: Any, max_basis: Any,
                 max_matvecs: Any) -> tuple[int, int, int]:
    """Validate the sizes; returns the basis size ``m``, block size ``b`` and product budget."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"eigsh: k must be an int, got {type(k).__name__}")
    if k <= 0:
        raise ValueError(f"eigsh: k must be positive, got k={k}")
    if k >= n:
        raise ValueError(
            f"eigsh: k must be < n (got k={k}, n={n}); for all eigenvalues use a dense "
            "eigensolver on op.to_dense()"
        )
    if which not in _WHICH:
        raise ValueError(f"eigsh: which must be one of {_WHICH}, got {which!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise TypeError(f"eigsh: block_size must be an int, got {type(block_size).__name__}")
    if block_size < 1:
        raise ValueError(f"eigsh: block_size must be >= 1, got {block_size}")
    b = int(min(block_size, n - k))
    if max_basis is None:
        # A block method needs room for several block steps between restarts: measured on
        # clustered spectra, + 6 b converges in about half the operator calls of b = 1.
        m = min(n, max(2 * k + 1, 20) + (6 * b if b > 1 else 0))
    else:
        if isinstance(max_basis, bool) or not isinstance(max_basis, (int, np.integer)):
            raise TypeError(f"eigsh: max_basis must be an int, got {type(max_basis).__name__}")
        if max_basis < k + b:
            raise ValueError(
                f"eigsh: max_basis must be >= k + block_size (got max_basis={max_basis}, k={k}, "
                f"block_size={b})"
            )
        m = min(int(max_basis), n)
    if max_matvecs is None:
        return m, b, 100 * m
    if isinstance(max_matvecs, bool) or not isinstance(max_matvecs, (int, np.integer)):
        raise TypeError(f"eigsh: max_matvecs must be an int, got {type(max_matvecs).__name__}")
    if max_matvecs < k:
        raise ValueError(f"eigsh: max_matvecs must be >= k (got {max_matvecs}, k={k})")
    return m, b, int(max_matvecs)


def _with(values: np.ndarray, index: np.ndarray, new: np.ndarray) -> np.ndarray:
    """A copy of ``values`` with ``values[index] = new``."""
    out = values.copy()
    out[index] = new
    return out


def _finish(solver: _ThickRestart, native: Operator, op: Operator, claim: _Rule,
            return_vectors: bool, low: bool, tol: float) -> Eigen:
    """The result: wanted pairs, their residuals, what converged, and the warning if not."""
    kry, k, which = solver.kry, solver.k, solver.which
    exhausted, start_count = solver.exhausted, solver.start_count
    # A wrong spectrum must never look converged: a non-symmetric operator is refused.
    asymmetry = check_symmetric_products(native, kry.asymmetry, kry.scale,
                                         op.num_matvecs - start_count, "eigsh")
    theta, Y, res, wanted, bounds, scale = solver.assess()
    residuals = res[wanted].copy()
    vectors = kry.vectors(Y[:, wanted]) if return_vectors or low else None
    if low:
        # 16-bit products: the Krylov relation holds for the rounded products it was built
        # from, not for the operator. Fresh products of the returned vectors (k more) give
        # the residuals the arithmetic supports, and convergence is judged on those against
        # the tolerance asked for (never the 16-bit floor it was stopped at).
        residuals = np.maximum(residuals, recomputed_residuals(op, vectors, theta[wanted]))
        bounds = np.maximum(bounds, error_bounds(theta, _with(res, wanted, residuals), wanted))
    converged = claim.converged(bounds, residuals, scale)
    if asymmetry > claim.tol:  # products less precise than their dtype: no claim beyond that
        converged = np.zeros_like(converged, dtype=bool)
    if not np.all(converged):
        reason = "max_matvecs" if exhausted else "the basis"
        advice = "raise max_matvecs or max_basis, or loosen tol"
        if asymmetry > claim.tol:
            reason = f"the products' precision (symmetric only to {asymmetry:.1e})"
            advice = "loosen tol, or compute the whole model in float64"
        if low and not exhausted:
            reason = f"the rounding of {native.product_dtype} products"
            worst = float(np.max(residuals) / max(scale, np.finfo(float).tiny))
            advice = (
                f"their relative residuals ({worst:.1e}) are at the level "
                f"{native.product_dtype} arithmetic supports (eps {native.product_eps:.1e}); "
                "loosen tol or compute in "
                "float32 (dtype=torch.float32 / float32 parameters)"
            )
        warnings.warn(
            f"eigsh: {int(np.sum(~converged))} of {k} eigenpairs did not reach tol={tol:g} "
            f"within {reason} ({op.num_matvecs - start_count} products); {advice}",
            NotConvergedWarning,
            stacklevel=3,
        )
    return Eigen(
        values=theta[wanted].copy(),
        vectors=(vectors if op is native else native.asarray(vectors)) if return_vectors else None,
        residuals=residuals,
        converged=np.asarray(converged, dtype=bool),
        num_matvecs=op.num_matvecs - start_count,
        which=which,
        tol=tol,
        precision=precision_of(native),
    )
