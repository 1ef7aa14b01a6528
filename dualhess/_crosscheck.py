"""Compare two curvature operators number by number (e.g. the same model in torch and JAX).

The same probes (mapped through an :class:`~dualhess.alignment.Alignment` when the two flat
parameter orders differ) go through both operators; the report gives the largest relative
difference of the products, the agreement of the quadratic forms ``v^T H v`` (and the
Hutchinson trace they make), the top-``k`` eigenvalues of each side, and a per-block
breakdown naming the parameter tensors whose rows disagree.

One tolerance judges everything: a block fails when its rows' difference exceeds ``rtol``
times the norm of the whole product (so the products pass exactly when no block's share of
the difference is above tolerance), and the eigenvalue solves run only when the products
agree (a pair that cannot agree never spends the eigensolver's budget).

When the two sides disagree, a **referee** decides which one is wrong: along the probe where
the products differ most, ``v``, and the direction of their difference, ``d``, each side's
own loss gives ``d^T H v`` by central second differences (Richardson-extrapolated, from
``Operator.loss_at``); the side whose products disagree with finite differences of its own
loss is named in :attr:`CrosscheckReport.verdict`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ._alignment import Alignment
from ._array import default_rng, is_float64, to_numpy
from ._errors import LossUnavailableError
from ._operator import Operator
from ._results import Result
from ._util import check_operator, check_positive_int

__all__ = ["crosscheck", "CrosscheckReport", "BlockDifference", "Verdict", "default_rtol",
           "referee"]


def default_rtol(op_a: Operator, op_b: Operator) -> float:
    """1e-10 when both operators are float64, else 1e-4 (float32 round-off through a network)."""
    return 1e-10 if is_float64(op_a.dtype) and is_float64(op_b.dtype) else 1e-4


@dataclasses.dataclass(frozen=True)
class BlockDifference(Result):
    """How much the rows of one parameter block differ between the two products."""

    name: str
    size: int
    rel_diff: float
    passed: bool


@dataclasses.dataclass(frozen=True)
class CrosscheckReport(Result):
    """The outcome of :func:`crosscheck`; ``str(report)`` is a readable summary.

    Attributes
    ----------
    passed : bool
        Every check below holds at ``rtol``.
    rtol : float
    max_rel_diff : float
        ``max_j ||H_a v_j - H_b v_j|| / max(||H_a v_j||, ||H_b v_j||)`` over the probes.
    quad_a, quad_b : list of float
        ``v_j^T H v_j`` from each side; ``quad_rel_diff`` the largest relative difference,
        scaled by ``||v_j|| * ||H v_j||``.
    trace_a, trace_b, trace_stderr : float
        The Hutchinson trace of each side from the same Rademacher probes.
    eig_a, eig_b : list of float
        Top-``k`` (largest algebraic) eigenvalues of each side, descending;
        ``eig_bound`` the largest admissible difference (residuals + rtol * |lambda_max|).
    blocks : list of BlockDifference
        Per parameter block; ``failing_blocks`` names those above ``rtol``.
    notes : list of str
        Why the tolerance is what it is (a model computing partly in float32), what was
        skipped and why.
    verdict : Verdict or None
        When the products disagree: the referee's finding of which side is wrong.
    """

    passed: bool
    rtol: float
    num_probes: int
    max_rel_diff: float
    quad_a: list[float]
    quad_b: list[float]
    quad_rel_diff: float
    trace_a: float
    trace_b: float
    trace_stderr: float
    eig_a: list[float]
    eig_b: list[float]
    eig_residuals_a: list[float]
    eig_residuals_b: list[float]
    eig_max_diff: float
    eig_bound: float
    blocks: list[BlockDifference]
    failing_blocks: list[str]
    labels: tuple[str, str]
    num_matvecs: tuple[int, int]
    checks: dict[str, bool]
    notes: tuple[str, ...] = ()
    verdict: Verdict | None = None

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        a, b = self.labels
        lines = [
            f"crosscheck {a} vs {b}: {'PASSED' if self.passed else 'FAILED'} at rtol={self.rtol:.1e}",
            f"  products   max rel diff over {self.num_probes} probes: {self.max_rel_diff:.3e}"
            f"  [{'ok' if self.checks['products'] else 'FAIL'}]",
            f"  v'Hv       max rel diff: {self.quad_rel_diff:.3e}"
            f"  [{'ok' if self.checks['quadratic_forms'] else 'FAIL'}]",
            f"  trace      {a}: {self.trace_a:.10g}   {b}: {self.trace_b:.10g}"
            f"   (Hutchinson, {self.num_probes} shared probes, stderr {self.trace_stderr:.3g})",
        ]
        if self.eig_a:
            lines.append(
                f"  top-{len(self.eig_a)} eigenvalues (max diff {self.eig_max_diff:.3e},"
                f" allowed {self.eig_bound:.3e}) [{'ok' if self.checks['eigenvalues'] else 'FAIL'}]"
            )
            lines.append(f"    {'#':>3} {a:>22} {b:>22} {'diff':>11}")
            for i, (x, y) in enumerate(zip(self.eig_a, self.eig_b)):
                lines.append(f"    {i + 1:>3} {x:>22.14g} {y:>22.14g} {abs(x - y):>11.3e}")
        if len(self.blocks) > 1:
            lines.append("  per block (rows of H v):")
            width = max(len(bl.name) for bl in self.blocks)
            for bl in self.blocks:
                mark = "ok" if bl.passed else "FAIL"
                lines.append(f"    {bl.name:<{width}}  n={bl.size:<7d} rel diff {bl.rel_diff:.3e}  {mark}")
        if self.failing_blocks:
            lines.append("  disagreeing blocks: " + ", ".join(self.failing_blocks))
        if self.verdict is not None:
            lines.append("  referee: " + self.verdict.message)
        lines += ["  note: " + note for note in self.notes]
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Verdict(Result):
    """Which side of a disagreeing cross-check is wrong, by finite differences.

    Attributes
    ----------
    wrong : str or None
        The label of the side whose products disagree with finite differences of its own
        loss; ``"both"``, or None when the finite differences cannot tell (the difference is
        below their accuracy, or the two losses themselves differ).
    rel_err_a, rel_err_b : float
        ``|d^T H v - FD|`` of each side, relative to ``||H v||``.
    fd_accuracy : float
        The finite differences' own error estimate (Richardson), on the same scale.
    loss_rel_diff : float
        How much the two sides' losses at ``theta`` differ (relative).
    message : str
    """

    wrong: str | None
    rel_err_a: float
    rel_err_b: float
    fd_accuracy: float
    loss_rel_diff: float
    message: str


def _second_difference(op: Operator, to_side: Any, w: np.ndarray, h: float, f0: float) -> float:
    plus = op.loss_at(op.asarray(to_side(h * w)))
    minus = op.loss_at(op.asarray(to_side(-h * w)))
    return (plus - 2.0 * f0 + minus) / (h * h)


def _fd_bilinear(op: Operator, to_side: Any, d: np.ndarray, v: np.ndarray,
                 h: float) -> tuple[float, float, float]:
    """``d^T H v`` from the loss alone: polarisation of two quadratic forms, each a central
    second difference at steps ``h`` and ``h / 2``, Richardson-extrapolated. Returns the
    value, its error estimate and the loss at theta."""
    f0 = float(op.loss_at(op.asarray(to_side(np.zeros_like(v)))))
    out = []
    for step in (h, h / 2):
        q_plus = _second_difference(op, to_side, d + v, step, f0)
        q_minus = _second_difference(op, to_side, d - v, step, f0)
        out.append((q_plus - q_minus) / 4.0)
    coarse, fine = out
    value = (4.0 * fine - coarse) / 3.0
    return value, abs(value - fine), f0


def referee(
    op_a: Operator,
    op_b: Operator,
    v: np.ndarray,
    hv_a: np.ndarray,
    hv_b: np.ndarray,
    *,
    align: Alignment | None = None,
    labels: tuple[str, str] = ("a", "b"),
    step: float = 1e-3,
) -> Verdict:
    """Decide which of two disagreeing operators is wrong, from finite differences.

    ``v`` is a probe (order a) and ``hv_a``, ``hv_b`` the two sides' products with it (order
    a). With ``d`` the unit direction of ``hv_a - hv_b``, each side's ``d^T H v`` from its
    products is compared with central second differences of *its own* loss
    (``op.loss_at``) along ``d +- v``; the operators must have a loss behind them.

    Examples
    --------
    A side whose products are off by 10 % is named (quadratic loss, exact products on the
    other side):

    >>> import numpy as np
    >>> from dualhess import DenseOperator
    >>> from dualhess._crosscheck import referee
    >>> A = np.diag([3.0, 2.0, 1.0])
    >>> class Quadratic(DenseOperator):
    ...     def loss_at(self, delta):
    ...         x = np.ones(3) + delta
    ...         return 0.5 * x @ A @ x
    >>> good, bad = Quadratic(A), Quadratic(1.1 * A)
    >>> v = np.array([1.0, -1.0, 1.0])
    >>> referee(good, bad, v, A @ v, 1.1 * A @ v, labels=("good", "bad")).wrong
    'bad'
    """
    align = align or Alignment.identity(op_a.n)
    a, b = labels
    vn = float(np.linalg.norm(v))
    vhat = v / vn
    diff = hv_a - hv_b
    d = diff / max(float(np.linalg.norm(diff)), np.finfo(float).tiny)
    scale = max(float(np.linalg.norm(hv_a)), float(np.linalg.norm(hv_b))) / vn
    gap = float(np.linalg.norm(diff)) / vn / max(scale, np.finfo(float).tiny)
    prod_a, prod_b = float(d @ hv_a) / vn, float(d @ hv_b) / vn
    fd_a, acc_a, f0_a = _fd_bilinear(op_a, lambda x: x, d, vhat, step)
    fd_b, acc_b, f0_b = _fd_bilinear(op_b, align.a_to_b, d, vhat, step)
    tiny = np.finfo(float).tiny
    err_a = abs(prod_a - fd_a) / max(scale, tiny)
    err_b = abs(prod_b - fd_b) / max(scale, tiny)
    accuracy = max(acc_a, acc_b) / max(scale, tiny)
    loss_diff = abs(f0_a - f0_b) / max(abs(f0_a), abs(f0_b), tiny)
    resolvable = 10.0 * accuracy < gap
    bad_a, bad_b = err_a > gap / 2, err_b > gap / 2
    good_a, good_b = err_a <= gap / 10, err_b <= gap / 10
    if not resolvable:
        wrong, message = None, (
            f"inconclusive: the products differ by {gap:.2g}, below what finite differences of "
            f"the losses resolve (~{accuracy:.1g})")
    elif bad_a and good_b:
        wrong, message = a, (
            f"{a}'s second derivatives disagree with finite differences of its own loss "
            f"(rel err {err_a:.2g}); {b} agrees to {err_b:.2g}: {a} is the wrong side")
    elif bad_b and good_a:
        wrong, message = b, (
            f"{b}'s second derivatives disagree with finite differences of its own loss "
            f"(rel err {err_b:.2g}); {a} agrees to {err_a:.2g}: {b} is the wrong side")
    elif good_a and good_b:
        wrong, message = None, (
            f"each side's products agree with finite differences of its own loss ({a} "
            f"{err_a:.2g}, {b} {err_b:.2g}): the two sides compute different functions "
            f"(their losses differ by {loss_diff:.2g} relative)")
    else:
        wrong, message = "both", (
            f"both sides disagree with finite differences of their own losses ({a} "
            f"{err_a:.2g}, {b} {err_b:.2g})")
    return Verdict(wrong, err_a, err_b, accuracy, loss_diff, message)


def _products(op: Operator, probes: np.ndarray) -> np.ndarray:
    return to_numpy(op.matmat(op.asarray(probes))).astype(np.float64)


def crosscheck(
    op_a: Any,
    op_b: Any,
    *,
    align: Alignment | None = None,
    num_probes: int = 8,
    k: int = 5,
    seed: Any = 0,
    rtol: float | None = None,
    labels: tuple[str, str] | None = None,
    eig_tol: float | None = None,
    progress: bool = False,
    notes: Any = (),
    referee_check: bool = True,
) -> CrosscheckReport:
    """Compare two operators that should represent the same matrix.

    Parameters
    ----------
    op_a, op_b : Operator
        The two operators (any frameworks). ``op_a``'s flat order is "order a".
    align : Alignment, optional
        Maps order a to ``op_b``'s order (``v_b = v_a[align.perm]``) and names the parameter
        blocks; identity with one block when omitted.
    num_probes : int
        Rademacher probes sent through both operators (one ``matmat`` each side).
    k : int
        Top eigenvalues compared (0 skips the eigenvalue check).
    seed : int, Generator or None
        Probe randomness (numpy float64, so both sides see identical probes).
    rtol : float, optional
        Pass/fail tolerance; default 1e-10 when both are float64, else 1e-4.
    labels : (str, str), optional
        Names for the two sides in the report (default: their frameworks).
    eig_tol : float, optional
        Residual tolerance for the eigenvalue solves (default ``rtol``, at least 1e-12).
        The solves run only when the products agree to ``rtol``.
    notes : sequence of str
        Lines added to the report (why ``rtol`` is what it is).
    referee_check : bool
        When the products disagree, decide which side is wrong by finite differences of
        each side's loss (:func:`referee`; needs operators with ``loss_at``).

    Returns
    -------
    CrosscheckReport

    Examples
    --------
    >>> import numpy as np, dualhess
    >>> A = np.diag([3.0, 2.0, 1.0])
    >>> report = dualhess.crosscheck(dualhess.DenseOperator(A), dualhess.DenseOperator(A.copy()), k=1)
    >>> report.passed
    True
    """
    op_a = check_operator(op_a, "crosscheck")
    op_b = check_operator(op_b, "crosscheck")
    if op_a.n != op_b.n:
        raise ValueError(f"crosscheck: the operators have different sizes, {op_a.n} and {op_b.n}")
    check_positive_int(num_probes, "num_probes", "crosscheck")
    if align is None:
        align = Alignment.identity(op_a.n)
    if align.n != op_a.n:
        raise ValueError(f"crosscheck: align is for n={align.n}, the operators have n={op_a.n}")
    if k < 0 or k >= op_a.n:
        raise ValueError(f"crosscheck: k must be in [0, n) with n={op_a.n}, got {k}")
    rtol = default_rtol(op_a, op_b) if rtol is None else float(rtol)
    labels = labels or (op_a.framework, op_b.framework)
    if labels[0] == labels[1]:
        labels = (labels[0] + " (a)", labels[1] + " (b)")
    start = (op_a.num_matvecs, op_b.num_matvecs)

    rng = default_rng(seed)
    V = rng.choice([-1.0, 1.0], size=(op_a.n, num_probes))
    HA = _products(op_a, V)
    HB = align.b_to_a(_products(op_b, align.a_to_b(V)))

    norm_a, norm_b = np.linalg.norm(HA, axis=0), np.linalg.norm(HB, axis=0)
    scale = np.maximum(np.maximum(norm_a, norm_b), np.finfo(float).tiny)
    max_rel = float(np.max(np.linalg.norm(HA - HB, axis=0) / scale))

    quad_a, quad_b = np.sum(V * HA, axis=0), np.sum(V * HB, axis=0)
    quad_scale = np.linalg.norm(V, axis=0) * scale
    quad_rel = float(np.max(np.abs(quad_a - quad_b) / quad_scale))
    stderr = float(np.std(quad_a, ddof=1) / np.sqrt(num_probes)) if num_probes > 1 else float("nan")

    blocks = []
    for name, idx in align.blocks:
        diff = np.linalg.norm(HA[idx] - HB[idx], axis=0)
        ref = np.maximum(np.linalg.norm(HA[idx], axis=0), np.linalg.norm(HB[idx], axis=0))
        # reported relative to the block's own rows (never below round-off of the whole
        # product); judged, like the products, relative to the whole product
        rel = float(np.max(diff / np.maximum(ref, 1e-3 * scale)))
        share = float(np.max(diff / scale))
        blocks.append(BlockDifference(name, int(idx.shape[0]), rel, share <= rtol))
    products_ok = max_rel <= rtol
    if not products_ok and all(b.passed for b in blocks):
        # the difference is spread over blocks: name the largest contributors
        shares = [float(np.max(np.linalg.norm(HA[idx] - HB[idx], axis=0) / scale))
                  for _, idx in align.blocks]
        top = max(shares)
        blocks = [dataclasses.replace(b, passed=share < top / 2)
                  for b, share in zip(blocks, shares)]
    notes = list(notes)

    eig_a: list[float] = []
    eig_b: list[float] = []
    res_a: list[float] = []
    res_b: list[float] = []
    eig_max_diff, eig_bound, eig_ok = 0.0, 0.0, True
    if k > 0 and not products_ok:
        eig_ok = False
        notes.append(f"eigenvalues not computed: the products already differ by {max_rel:.2g} "
                     f"(> rtol {rtol:.1g}), so the two spectra cannot agree to rtol")
    elif k > 0:
        from ._eigsh import eigsh

        tol = max(rtol if eig_tol is None else eig_tol, 1e-12)
        ea = eigsh(op_a, k=k, which="LA", tol=tol, seed=rng, return_vectors=False, progress=progress)
        eb = eigsh(op_b, k=k, which="LA", tol=tol, seed=rng, return_vectors=False, progress=progress)
        va, vb = np.sort(ea.values)[::-1], np.sort(eb.values)[::-1]
        eig_a, eig_b = va.tolist(), vb.tolist()
        res_a, res_b = np.asarray(ea.residuals).tolist(), np.asarray(eb.residuals).tolist()
        lam_scale = float(max(np.max(np.abs(va)), np.max(np.abs(vb)), np.finfo(float).tiny))
        # |theta - lambda| <= ||r|| for a Ritz pair (Hermitian), plus Weyl: rtol * ||H||.
        eig_bound = float(np.max(ea.residuals) + np.max(eb.residuals) + rtol * lam_scale)
        eig_max_diff = float(np.max(np.abs(va - vb)))
        eig_ok = eig_max_diff <= eig_bound

    verdict = None
    if not products_ok and referee_check:
        worst = int(np.argmax(np.linalg.norm(HA - HB, axis=0) / scale))
        try:
            verdict = referee(op_a, op_b, V[:, worst], HA[:, worst], HB[:, worst],
                              align=align, labels=labels)
        except LossUnavailableError:
            notes.append("no referee: the operators have no loss behind them (loss_at)")
    checks = {
        "products": products_ok,
        "quadratic_forms": quad_rel <= rtol,
        "eigenvalues": eig_ok,
        "blocks": all(b.passed for b in blocks),
    }
    return CrosscheckReport(
        passed=all(checks.values()),
        rtol=rtol,
        num_probes=num_probes,
        max_rel_diff=max_rel,
        quad_a=quad_a.tolist(),
        quad_b=quad_b.tolist(),
        quad_rel_diff=quad_rel,
        trace_a=float(np.mean(quad_a)),
        trace_b=float(np.mean(quad_b)),
        trace_stderr=stderr,
        eig_a=eig_a,
        eig_b=eig_b,
        eig_residuals_a=res_a,
        eig_residuals_b=res_b,
        eig_max_diff=eig_max_diff,
        eig_bound=eig_bound,
        blocks=blocks,
        failing_blocks=[b.name for b in blocks if not b.passed],
        labels=tuple(labels),
        num_matvecs=(op_a.num_matvecs - start[0], op_b.num_matvecs - start[1]),
        checks=checks,
        notes=tuple(notes),
        verdict=verdict,
    )
