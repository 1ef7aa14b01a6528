"""Gradient overlap: how much of the gradient lies in the top Hessian eigenspace.

Gur-Ari, Roberts and Dyer observed that during training the gradient quickly settles into
the span of the top ``k`` eigenvectors of the Hessian (``k`` the number of classes). The
overlap is the fraction of the squared gradient norm in that span,

    overlap_k = ||P_k g||^2 / ||g||^2,      P_k = V_k V_k^T,

with ``V_k`` the ``n x k`` matrix of orthonormal top eigenvectors and ``g`` the gradient of
the whole-data-set loss (:meth:`dualhess.Operator.gradient`). It lies in ``[0, 1]``; a random
direction in ``n`` dimensions has ``k / n`` on average.

References
----------
G. Gur-Ari, D. A. Roberts, E. Dyer, "Gradient descent happens in a tiny subspace",
arXiv:1812.04754 (2018), https://arxiv.org/abs/1812.04754.

Examples
--------
>>> import numpy as np, dualhess
>>> from dualhess._landscape import QuadraticLoss
>>> op = QuadraticLoss(np.diag([4.0, 3.0, 1.0]), params=np.array([0.0, 1.0, 1.0]))
>>> round(dualhess.gradient_overlap(op, k=2).value, 12)    # g = (0, 3, 1): 9 / 10
0.9
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ._array import to_numpy
from ._operator import Operator
from ._results import Eigen, Result
from ._util import check_operator, check_positive_int

__all__ = ["GradientOverlap", "gradient_overlap", "overlap_of"]

#: ``k`` when neither ``k`` nor ``eigen`` is given: the number of classes in Gur-Ari et al.
DEFAULT_OVERLAP_K = 10


@dataclasses.dataclass(frozen=True)
class GradientOverlap(Result):
    """The overlap ``||P_k g||^2 / ||g||^2`` of the gradient with the top-``k`` eigenspace.

    Attributes
    ----------
    value : float
        The overlap, in ``[0, 1]``.
    k : int
        The dimension of the eigenspace.
    per_direction : ndarray, shape (k,)
        ``(v_i^T g)^2 / ||g||^2`` for each eigenvector (they sum to ``value``).
    eigenvalues : ndarray, shape (k,)
        The eigenvalues of the directions, largest first.
    gradient_norm : float
        ``||g||``.
    num_matvecs : int
        Operator products spent (0 when ``eigen`` was given).
    """

    value: float
    k: int
    per_direction: np.ndarray
    eigenvalues: np.ndarray
    gradient_norm: float
    num_matvecs: int

    def __float__(self) -> float:
        return float(self.value)


def overlap_of(gradient: Any, vectors: Any) -> tuple[float, np.ndarray]:
    """``(||P g||^2 / ||g||^2, per-column squared cosines)`` for the span of ``vectors``.

    The columns are orthonormalised (QR, float64 on the host) first, so a basis that is
    orthonormal only to the eigensolver's tolerance still gives a projection; the per-column
    values use the columns as given (normalised). A zero gradient has overlap 0.

    Examples
    --------
    >>> import numpy as np
    >>> value, parts = overlap_of(np.array([3.0, 4.0, 0.0]), np.eye(3)[:, :1])
    >>> round(value, 12), parts.round(12).tolist()
    (0.36, [0.36])
    """
    g = np.asarray(to_numpy(gradient), dtype=np.float64).reshape(-1)
    V = np.asarray(to_numpy(vectors), dtype=np.float64)
    if V.ndim == 1:
        V = V[:, None]
    if V.shape[0] != g.shape[0]:
        raise ValueError(f"overlap_of: vectors have {V.shape[0]} rows, the gradient {g.size}")
    norm = float(np.linalg.norm(g))
    if norm == 0.0 or not np.isfinite(norm):
        if not np.isfinite(norm):
            raise FloatingPointError("overlap_of: the gradient is not finite")
        return 0.0, np.zeros(V.shape[1])
    u = g / norm
    Q, _ = np.linalg.qr(V)
    value = float(np.sum((Q.T @ u) ** 2))
    cols = V / np.maximum(np.linalg.norm(V, axis=0), 1e-300)
    return min(value, 1.0), (cols.T @ u) ** 2


def gradient_overlap(
    op: Operator,
    k: int | None = None,
    *,
    eigen: Eigen | None = None,
    tol: float = 1e-6,
    seed: Any = 0,
) -> GradientOverlap:
    """The fraction ``||P_k g||^2 / ||g||^2`` of the gradient in the top-``k`` eigenspace.

    Parameters
    ----------
    op : Operator
        A curvature operator with a gradient (:meth:`~dualhess.Operator.gradient`): every
        backend operator.
    k : int, optional
        The dimension of the eigenspace: the ``k`` largest (algebraic) eigenvalues. Default:
        all vectors of ``eigen`` when given, else 10 (the number of classes in Gur-Ari et
        al.), capped at ``n - 1``.
    eigen : Eigen, optional
        Eigenpairs already computed (e.g. by :func:`dualhess.eigsh` with
        ``return_vectors=True``, in the operator's flat order); their first ``k`` vectors
        are used in the order given. Default: computed here with :func:`dualhess.eigsh`.
    tol : float
        Relative residual tolerance of the eigenvectors computed here.
    seed : int, numpy.random.Generator or None
        The eigensolver's start vector.

    Returns
    -------
    GradientOverlap
        ``value`` (also ``float(result)``), ``per_direction``, ``eigenvalues``,
        ``gradient_norm``.

    Raises
    ------
    dualhess.LossUnavailableError
        When the operator has no loss (a plain DenseOperator).

    References
    ----------
    G. Gur-Ari, D. A. Roberts, E. Dyer, "Gradient descent happens in a tiny subspace",
    https://arxiv.org/abs/1812.04754.

    Examples
    --------
    >>> import numpy as np, dualhess
    >>> from dualhess._landscape import QuadraticLoss
    >>> op = QuadraticLoss(np.diag([5.0, 2.0, 1.0, 0.5]), params=np.ones(4))
    >>> result = dualhess.gradient_overlap(op, k=1)        # g = (5, 2, 1, 0.5)
    >>> round(result.value, 10), round(25 / 30.25, 10)
    (0.826446281, 0.826446281)
    """
    from ._eigsh import eigsh

    op = check_operator(op, "gradient_overlap")
    g = op.gradient()  # first: an operator without a loss fails before any product
    before = op.num_matvecs
    if eigen is not None:
        if eigen.vectors is None:
            raise ValueError("gradient_overlap: eigen has no vectors; compute it with "
                             "eigsh(..., return_vectors=True)")
        available = int(eigen.vectors.shape[1])
        k = available if k is None else check_positive_int(k, "k", "gradient_overlap")
        if k > available:
            raise ValueError(f"gradient_overlap: k={k} but eigen holds {available} vectors")
        vectors = np.asarray(to_numpy(eigen.vectors), dtype=np.float64)[:, :k]
        values = np.asarray(eigen.values, dtype=np.float64)[:k]
    else:
        k = min(DEFAULT_OVERLAP_K, op.n - 1) if k is None else check_positive_int(
            k, "k", "gradient_overlap")
        if k >= op.n:
            raise ValueError(f"gradient_overlap: k must be < n = {op.n}, got {k} (with k = n "
                             "the overlap is 1)")
        eig = eigsh(op, k=k, which="LA", tol=tol, seed=seed, criterion="residual")
        order = np.argsort(np.asarray(eig.values))[::-1]
        vectors = np.asarray(to_numpy(eig.vectors), dtype=np.float64)[:, order]
        values = np.asarray(eig.values, dtype=np.float64)[order]
    value, parts = overlap_of(g, vectors)
    return GradientOverlap(
        value=value,
        k=int(k),
        per_direction=parts,
        eigenvalues=values,
        gradient_norm=float(np.linalg.norm(np.asarray(to_numpy(g), dtype=np.float64))),
        num_matvecs=op.num_matvecs - before,
    )
