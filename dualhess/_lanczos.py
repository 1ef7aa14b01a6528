"""Lanczos tridiagonalisation with full reorthogonalisation, batched over start vectors.

References
----------
C. Lanczos, "An iteration method for the solution of the eigenvalue problem of linear
differential and integral operators", J. Res. Nat. Bur. Standards 45 (1950).
B. N. Parlett, *The Symmetric Eigenvalue Problem*, SIAM (1998), ch. 13 (full
reorthogonalisation, "twice is enough").
J. W. Daniel, W. B. Gragg, L. Kaufman and G. W. Stewart, "Reorthogonalization and stable
algorithms for updating the Gram-Schmidt QR factorization", Math. Comp. 30 (1976): the
second pass only after cancellation (``eta = 1/sqrt(2)``), as each step here does after its
three-term recurrence.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._array import (
    array_namespace,
    default_rng,
    device,
    dtype_eps,
    on_host,
    safe_vector_norm,
    to_numpy,
)
from ._basis import Basis, check_basis, make_basis
from ._docs import fill_doc
from ._operator import Operator
from ._precision import precision_of
from ._results import Tridiagonal
from ._util import check_operator, check_positive_int, check_symmetric_products, progress_bar
from ._wrappers import HostOperator

__all__ = ["lanczos"]

#: Reorthogonalise a second time only when the first pass shrank the vector below this
#: fraction of its norm (Daniel, Gragg, Kaufman and Stewart, 1976).
_ETA = 1 / np.sqrt(2)


def _basis_out(op: Operator, native: Operator, bases: list[Basis], basis_list: list[Any] | None,
               p: int, m: int, return_basis: bool) -> Any:
    """The Lanczos vectors as a native ``(p, n, m)`` array (``(n, m)`` for one probe)."""
    if not return_basis:
        return None
    if basis_list is not None:
        xp = array_namespace(basis_list[0])
        stacked = xp.permute_dims(xp.stack(basis_list, axis=-1), (1, 0, 2))  # (p, n, steps)
    else:
        stacked = array_namespace(bases[0].like).stack(
            [b.combination(np.eye(b.size)) for b in bases], axis=0)
    xp = array_namespace(stacked)
    if stacked.shape[-1] < m:  # pad with zero columns after an early stop
        pad = xp.zeros((p, op.n, m - stacked.shape[-1]), dtype=stacked.dtype,
                       device=device(stacked))
        stacked = xp.concat([stacked, pad], axis=-1)
    out = stacked if op is native else native.asarray(stacked)
    return out[0] if p == 1 else out


def _column_major(Q: Any, xp: Any) -> Any:
    """``Q`` (n, p) with each column contiguous (the transpose of a row-major (p, n))."""
    if Q.shape[1] == 1:
        return Q
    return xp.permute_dims(xp.stack([Q[:, i] for i in range(Q.shape[1])], axis=0), (1, 0))


def _start_block(op: Operator, start: Any, num_probes: int, rng: np.random.Generator) -> Any:
    if start is None:
        return op.asarray(rng.standard_normal((op.n, num_probes)))
    if isinstance(start, np.ndarray) or not hasattr(start, "__array_namespace__") and not hasattr(start, "detach"):
        start = op.asarray(np.asarray(start, dtype=np.float64))
    xp = array_namespace(start)
    if len(start.shape) == 1:
        start = xp.reshape(start, (-1, 1))
    if len(start.shape) != 2 or start.shape[0] != op.n:
        raise ValueError(f"lanczos: start must have shape (n,) or (n, num_probes) with n={op.n}, got {tuple(start.shape)}")
    if start.dtype != op.dtype:
        start = op.asarray(start)
    return start


@fill_doc
def lanczos(
    op: Operator,
    num_steps: int,
    *,
    start: Any = None,
    num_probes: int = 1,
    seed: Any = None,
    reorthogonalize: bool = True,
    return_basis: bool = False,
    progress: bool = False,
    checkpoint: Any = None,
    checkpoint_every: int | None = None,
    basis: str = "device",
    basis_dir: Any = None,
) -> Tridiagonal:
    """Run ``num_steps`` Lanczos steps from one or several start vectors.

    Several start vectors advance together: each step costs one ``op.matmat`` on an
    ``(n, num_probes)`` block, never one call per probe.

    Parameters
    ----------
    op : Operator
        A symmetric operator.
    num_steps : int
        Number of steps ``m`` (products per probe). When an invariant subspace is found
        earlier (``beta`` ~ 0, "breakdown") the probe stops cleanly: its remaining
        ``alpha`` and ``beta`` are zero and ``num_steps[p]`` records where it stopped.
    start : array, shape (n,) or (n, num_probes), optional
        Start vectors (normalised internally). Default: Gaussian, drawn from ``seed``.
    num_probes : int
        Number of random start vectors when ``start`` is None.
    seed : int, numpy.random.Generator or None
        Randomness for the start vectors (drawn in numpy float64).
    reorthogonalize : bool
        Full two-pass Gram-Schmidt against all previous Lanczos vectors (default).
        Without it, ghost copies of converged Ritz values appear after many steps.
    return_basis : bool
        Return the Lanczos vectors (``(n, m)``, or ``(num_probes, n, m)``).
    progress : bool
        Show a progress bar.
    %(checkpoint)s
    %(basis)s
        Each probe has its own basis of contiguous vectors, reorthogonalised probe by
        probe (a batched product over a ``(probes, n, steps)`` slice cost ten times more
        for the same arithmetic).

    Returns
    -------
    Tridiagonal
        ``alpha`` of shape ``(m,)`` and ``beta`` of shape ``(m - 1,)`` (leading
        ``num_probes`` axis when several start vectors were given).

    Examples
    --------
    >>> import numpy as np, dualhess
    >>> op = dualhess.DenseOperator(np.diag(np.r_[np.linspace(0.0, 1.0, 99), 10.0]))
    >>> T = dualhess.lanczos(op, 30, seed=0)
    >>> round(float(np.linalg.eigvalsh(T.matrix()).max()), 10)
    10.0
    """
    if checkpoint is not None:
        from ._checkpoint import checkpointed

        op = check_operator(op, "lanczos")
        settings = {"num_steps": num_steps, "num_probes": num_probes, "seed": seed, "reorthogonalize": reorthogonalize, "start": None if start is None else "given"}
        with checkpointed(op, checkpoint, checkpoint_every, "lanczos", settings) as work:
            return lanczos(work, num_steps=num_steps, start=start, num_probes=num_probes, seed=seed, reorthogonalize=reorthogonalize, return_basis=return_basis, progress=progress, basis=basis, basis_dir=basis_dir)
    op = check_operator(op, "lanczos")
    m = check_positive_int(num_steps, "num_steps", "lanczos")
    check_positive_int(num_probes, "num_probes", "lanczos")
    check_basis(basis, basis_dir, "lanczos")
    rng = default_rng(seed)
    # Rule per device (as in eigsh): an operator whose arrays compile per shape but live in
    # host memory (jax on a CPU) reorthogonalises in numpy beside its compiled products.
    native = op
    if op.fixed_shapes and on_host(op._like):
        op = HostOperator(native)
        if start is not None and not isinstance(start, np.ndarray):
            start = np.asarray(to_numpy(start), dtype=np.float64)
    start_count = op.num_matvecs

    Q = _start_block(op, start, num_probes, rng)
    xp = array_namespace(Q)
    # Column-major blocks (each probe's vector contiguous): a product takes its column
    # without a copy, and the basis stores it with a plain one. Elementwise operations keep
    # the layout (numpy, torch). Measured on a 10 x 60 density (97k parameters): 0.3 s of
    # 7 s went to copying strided columns.
    Q = _column_major(Q, xp)
    p = Q.shape[1]
    norms = safe_vector_norm(Q, xp, axis=0)
    norms_np = to_numpy(norms).astype(np.float64)
    if np.any(norms_np == 0) or not np.all(np.isfinite(norms_np)):
        raise ValueError("lanczos: a start vector is zero or not finite")
    Q = Q / norms

    alpha = np.zeros((p, m))
    beta = np.zeros((p, max(m - 1, 0)))
    steps = np.full(p, m, dtype=int)
    active = np.ones(p, dtype=bool)
    # Without reorthogonalisation the vectors are kept only when asked for.
    basis_list: list[Any] | None = [Q] if return_basis and not reorthogonalize else None
    # One basis per probe (its vectors contiguous), preallocated with m rows so that
    # every step runs on the same shapes (jax compiles once per shape).
    bases: list[Basis] = []
    if reorthogonalize:
        bases = [make_basis(basis, m, Q[:, i], op.fixed_shapes, basis_dir) for i in range(p)]
        for i in range(p):
            bases[i].append(Q[:, i])
    Q_prev = None
    beta_prev = None
    eps = dtype_eps(op.dtype)
    scale = 0.0
    asymmetry = 0.0

    bar = progress_bar(progress, m, "lanczos", unit="steps")
    try:
        for j in range(m):
            W = op.matmat(Q)
            a = xp.sum(Q * W, axis=0)
            W = W - Q * a
            if Q_prev is not None:
                if not reorthogonalize:  # the one coefficient measured without the basis
                    below = to_numpy(xp.sum(Q_prev * W, axis=0)).astype(np.float64)
                    gap = np.abs(below - to_numpy(beta_prev).astype(np.float64))
                    asymmetry = max(asymmetry, float(np.max(gap[active], initial=0.0)))
                W = W - Q_prev * beta_prev
            if reorthogonalize:
                columns = []
                for i in range(p):  # per probe: its own contiguous basis
                    # W is this step's own array: orthogonalised in place where it can be;
                    # a second pass only after cancellation (DGKS, eta = 1/sqrt(2)): the
                    # three-term recurrence left little to remove, so one pass is the rule
                    w, total = bases[i].orthogonalize(W[:, i], overwrite=True, eta=_ETA)
                    columns.append(w)
                    # For a symmetric operator these projections of A q_j - alpha q_j -
                    # beta q_{j-1} on the earlier vectors are rounding: q_i^T A q_j equals
                    # q_j^T A q_i, which is beta_{j-1} for i = j - 1 and 0 below. What is
                    # left measures the asymmetry, at no extra product.
                    if active[i]:
                        asymmetry = max(asymmetry, float(np.max(np.abs(total[: j + 1]),
                                                                initial=0.0)))
                W = xp.permute_dims(xp.stack(columns, axis=0), (1, 0))  # column-major
            a_np = to_numpy(a).astype(np.float64)
            alpha[active, j] = a_np[active]
            bar.update(1)
            if j == m - 1:
                break
            b = safe_vector_norm(W, xp, axis=0)
            b_np = to_numpy(b).astype(np.float64)
            scale = max(scale, float(np.max(np.abs(a_np[active]), initial=0.0)), float(np.max(b_np[active], initial=0.0)))
            # Invariant subspace found: the residual is at rounding level.
            broke = active & (b_np <= 100 * eps * np.sqrt(op.n) * max(scale, np.finfo(float).tiny))
            for i in np.flatnonzero(broke):
                steps[i] = j + 1
            active &= ~broke
            beta[active, j] = b_np[active]
            if not active.any():
                break
            safe = np.where(active, b_np, 1.0)
            mask = op.asarray(active.astype(np.float64))
            Q_prev, beta_prev = Q, b
            Q = W / op.asarray(safe) * mask
            if basis_list is not None:
                basis_list.append(Q)
            if reorthogonalize:
                for i in range(p):
                    bases[i].append(Q[:, i])
        basis_out = _basis_out(op, native, bases, basis_list, p, m, return_basis)
    finally:
        bar.close()
        for b_ in bases:
            b_.close()

    scale = max(scale, float(np.max(np.abs(alpha), initial=0.0)))
    check_symmetric_products(native, asymmetry, scale, max(int(np.max(steps)), 1), "lanczos")
    batched = p > 1 or (start is not None and len(getattr(start, "shape", (0,))) == 2)
    if not batched:
        alpha, beta = alpha[0], beta[0]
    return Tridiagonal(
        alpha=alpha,
        beta=beta,
        basis=basis_out,
        num_matvecs=op.num_matvecs - start_count,
        breakdown=steps < m,
        num_steps=steps,
        norm=norms_np,
        precision=precision_of(native),
    )
