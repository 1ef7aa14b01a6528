"""dualhess.trace: Hutchinson, Hutch++, XTrace and exact, against exact traces."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _matrices import (
    FRAMEWORKS,
    CountingOperator,
    native_operator,
    symmetric_with_spectrum,
)

from dualhess import DenseOperator, ExactUnavailableError, Operator
from dualhess._trace import STOPPING_BLOCK, trace

N = 1000
BUDGET = 90
DECAY = 1.0 / np.arange(1.0, N + 1.0) ** 2  # lambda_i = i^-2


@pytest.fixture(scope="module")
def decaying() -> DenseOperator:
    return DenseOperator(symmetric_with_spectrum(DECAY, seed=0))


@pytest.fixture(scope="module")
def runs(decaying: DenseOperator) -> dict[str, list]:
    """Estimates at 90 products: 40 seeds of Hutchinson, 20 of Hutch++ and XTrace."""
    seeds = {"hutchinson": 40, "hutch++": 20, "xtrace": 20}
    return {
        method: [trace(decaying, method=method, num_matvecs=BUDGET, seed=s) for s in range(count)]
        for method, count in seeds.items()
    }


def _relative_errors(estimates: list) -> np.ndarray:
    exact = DECAY.sum()
    return np.array([abs(e.value - exact) / exact for e in estimates])


def test_hutchpp_and_xtrace_beat_hutchinson_on_decaying_spectrum(runs):
    medians = {m: float(np.median(_relative_errors(r[:20]))) for m, r in runs.items()}
    assert medians["hutch++"] <= 1e-3
    assert medians["xtrace"] <= 1e-3
    assert medians["hutchinson"] >= 10 * max(medians["hutch++"], medians["xtrace"])
    for estimates in runs.values():
        assert all(e.num_matvecs == BUDGET for e in estimates)
        assert all(isinstance(e.value, float) and isinstance(e.stderr, float) for e in estimates)


def test_hutchinson_stderr_covers_truth_at_nominal_rate(runs, decaying):
    estimates = runs["hutchinson"]
    exact = DECAY.sum()
    covered = np.mean([abs(e.value - exact) <= 2 * e.stderr for e in estimates])
    assert covered >= 0.8
    # The stderr also matches the exact Rademacher variance 2 (|A|_F^2 - sum A_ii^2) / m.
    A = decaying.matrix
    exact_stderr = math.sqrt(2 * (np.sum(A**2) - np.sum(np.diag(A) ** 2)) / BUDGET)
    median_stderr = float(np.median([e.stderr for e in estimates]))
    assert 0.5 * exact_stderr <= median_stderr <= 2 * exact_stderr
    assert all(e.samples.shape == (BUDGET,) for e in estimates)


@pytest.mark.parametrize("method", ["xtrace", "hutch++"])
def test_error_estimate_has_the_right_order_of_magnitude(runs, method):
    estimates = runs[method]
    errors = np.array([e.value - DECAY.sum() for e in estimates])
    stderrs = np.array([e.stderr for e in estimates])
    ratio = math.sqrt(np.mean(errors**2)) / math.sqrt(np.mean(stderrs**2))
    assert 0.1 <= ratio <= 10


def test_xtrace_equals_its_leave_one_out_definition():
    """The vectorised formula equals the mean of the k leave-one-out estimates."""
    rng = np.random.default_rng(5)
    eigenvalues = np.arange(1.0, 41.0) ** -1.5 * np.where(rng.random(40) < 0.3, -1.0, 1.0)
    A = symmetric_with_spectrum(eigenvalues, seed=1)
    op = CountingOperator(A)
    est = trace(op, method="xtrace", num_matvecs=17, seed=3)
    assert est.num_matvecs == 16 and op.num_matvecs == 16
    assert len(op.matmat_calls) == 2  # A Omega and A Q, each one block
    Omega = op.matmat_calls[0]
    Y = A @ Omega

    def estimate(i, left_out):
        """Basis of A Omega without the columns left_out, Hutchinson sample of probe i."""
        Q, _ = np.linalg.qr(np.delete(Y, left_out, axis=1))
        P = np.eye(40) - Q @ Q.T
        w = Omega[:, i]
        return np.trace(Q.T @ A @ Q) + w @ P @ A @ P @ w

    k = Omega.shape[1]
    loo = np.array([estimate(i, [i]) for i in range(k)])
    assert est.value == pytest.approx(loo.mean(), abs=1e-12)
    np.testing.assert_allclose(est.samples, loo, atol=1e-12)
    # stderr^2 = s^2 / k + the unbiased covariance estimate from the leave-two-out
    # differences D_ij = t_i - t_i^(-j) (see dualhess._trace._xtrace_stderr).
    D = np.array(
        [[loo[i] - estimate(i, [i, j]) if i != j else 0.0 for i in range(k)] for j in range(k)]
    )
    covariance = max(0.0, float(np.sum(D * D.T)) / (k * (k - 1)))
    expected = math.sqrt(loo.var(ddof=1) / k + covariance)
    assert covariance > 0
    assert est.stderr == pytest.approx(expected, rel=1e-10)


def test_hutchpp_equals_its_definition_and_splits_the_budget():
    A = symmetric_with_spectrum(np.arange(1.0, 61.0) ** -1.0, seed=2)
    op = CountingOperator(A)
    est = trace(op, method="hutch++", num_matvecs=20, seed=4)
    # 20 = 6 sketch + 6 basis products + 8 Hutchinson probes, in two blocks.
    assert est.num_matvecs == 20 and op.num_matvecs == 20
    assert [c.shape[1] for c in op.matmat_calls] == [6, 14]
    S = op.matmat_calls[0]
    Q, _ = np.linalg.qr(A @ S)
    second = op.matmat_calls[1]
    np.testing.assert_allclose(np.abs(second[:, :6]), np.abs(Q), atol=1e-12)
    G = second[:, 6:]  # the projected Hutchinson probes (I - Q Q^T) g
    np.testing.assert_allclose(Q.T @ G, 0, atol=1e-12)
    expected = np.trace(Q.T @ A @ Q) + np.mean(np.sum(G * (A @ G), axis=0))
    assert est.value == pytest.approx(expected, abs=1e-12)
    assert est.samples.shape == (8,)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
@pytest.mark.parametrize(
    "kind",
    ["negative", "indefinite"],
)
def test_negative_and_indefinite_traces(method, kind):
    i = np.arange(1.0, 301.0)
    if kind == "negative":
        eigenvalues = -(i**-1.0) - 0.01
    else:  # dominant eigenvalue negative, trace of either sign in the tail
        eigenvalues = (-1.0) ** i * i**-1.0 - 0.002
    exact = eigenvalues.sum()
    A = symmetric_with_spectrum(eigenvalues, seed=3)
    est = trace(A, method=method, num_matvecs=60, seed=11)
    assert abs(est.value - exact) <= 4 * est.stderr + 1e-12
    assert np.sign(est.value) == np.sign(exact) or abs(exact) < 4 * est.stderr
    if method != "hutchinson":
        assert abs(est.value - exact) <= 0.05 * np.abs(eigenvalues).sum()


def test_target_stderr_stops_early(decaying):
    full = trace(decaying, method="hutchinson", num_matvecs=200, seed=0)
    target = 0.1
    early = trace(decaying, method="hutchinson", num_matvecs=200, seed=0, target_stderr=target)
    assert early.num_matvecs < full.num_matvecs == 200
    assert early.num_matvecs % STOPPING_BLOCK == 0
    assert early.stderr <= target
    assert early.samples.shape == (early.num_matvecs,)
    # An unreachable target spends the whole budget, and never more.
    strict = trace(decaying, method="hutchinson", num_matvecs=35, seed=0, target_stderr=1e-9)
    assert strict.num_matvecs == 35 and strict.stderr > 1e-9


def test_target_stderr_on_a_diagonal_matrix_stops_after_one_block():
    # For a diagonal matrix every Rademacher sample w^T D w equals tr(D): stderr 0.
    d = np.array([3.0, -1.0, 0.5, 2.0, -4.0])
    op = DenseOperator(np.diag(d))
    est = trace(op, method="hutchinson", num_matvecs=1000, seed=0, target_stderr=1e-6)
    assert est.num_matvecs == STOPPING_BLOCK == op.num_matvecs
    assert est.value == pytest.approx(d.sum(), abs=1e-12)
    assert est.stderr == 0.0


def test_exact_trace():
    A = symmetric_with_spectrum(np.linspace(-2.0, 3.0, 50), seed=4)
    op = DenseOperator(A)
    est = trace(op, method="exact")
    assert est.value == pytest.approx(np.trace(A), abs=1e-12)
    assert est.stderr == 0.0 and est.num_matvecs == 0 and est.method == "exact"
    assert isinstance(est.value, float)
    assert est.to_dict()["value"] == est.value


def test_exact_trace_unavailable_propagates():
    class MatvecOnly(Operator):
        def __init__(self, A):
            super().__init__(A.shape)
            self.A = A

        def _matvec(self, v):
            return self.A @ v

    with pytest.raises(ExactUnavailableError, match="no exact diagonal"):
        trace(MatvecOnly(np.eye(3)), method="exact")


@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
def test_budget_beyond_n_gives_the_exact_trace(method):
    A = symmetric_with_spectrum([4.0, -1.0, 0.5, 2.0, -3.0], seed=5)
    est = trace(A, method=method, num_matvecs=100, seed=0)
    assert est.value == pytest.approx(np.trace(A), abs=1e-12)
    assert est.stderr <= 1e-12
    assert est.num_matvecs == 10  # two blocks of n = 5, never more than asked


@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
@pytest.mark.parametrize(("dtype", "tol"), [(np.float64, 1e-10), (np.float32, 1e-5)])
def test_rank_deficient_operator(method, dtype, tol):
    eigenvalues = np.zeros(80)
    eigenvalues[:4] = [3.0, -2.0, 1.0, 0.5]
    A = symmetric_with_spectrum(eigenvalues, seed=6).astype(dtype)
    est = trace(DenseOperator(A), method=method, num_matvecs=30, seed=1)
    assert est.value == pytest.approx(2.5, abs=tol)
    assert est.stderr <= tol
    assert est.num_matvecs == 30


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
def test_same_seed_same_estimate_across_frameworks(method):
    A = symmetric_with_spectrum(np.arange(1.0, 61.0) ** -1.0 - 0.01, seed=7)
    results = {}
    for framework in FRAMEWORKS:
        try:
            op = native_operator(A, framework)
        except pytest.skip.Exception:
            continue
        results[framework] = trace(op, method=method, num_matvecs=24, seed=42)
    reference = results["numpy"]
    for framework, est in results.items():
        assert est.value == pytest.approx(reference.value, abs=1e-12), framework
        assert est.stderr == pytest.approx(reference.stderr, abs=1e-12), framework
    again = trace(A, method=method, num_matvecs=24, seed=np.random.default_rng(42))
    assert again.value == pytest.approx(reference.value, abs=1e-12)
    other = trace(A, method=method, num_matvecs=24, seed=43)
    assert other.value != reference.value


def test_float32_operator_agrees_with_float64_to_single_precision():
    A = symmetric_with_spectrum(np.arange(1.0, 101.0) ** -1.0, seed=8)
    for method in ("hutchinson", "hutch++", "xtrace"):
        e64 = trace(A, method=method, num_matvecs=30, seed=3)
        e32 = trace(DenseOperator(A.astype(np.float32)), method=method, num_matvecs=30, seed=3)
        assert e32.value == pytest.approx(e64.value, rel=1e-4), method


def test_gaussian_probes():
    A = symmetric_with_spectrum(np.arange(1.0, 201.0) ** -0.5, seed=9)
    est = trace(A, method="hutchinson", num_matvecs=400, seed=0, distribution="gaussian")
    exact_stderr = math.sqrt(2 * np.sum(A**2) / 400)  # Gaussian: Var = 2 |A|_F^2
    assert 0.7 * exact_stderr <= est.stderr <= 1.4 * exact_stderr
    assert abs(est.value - np.trace(A)) <= 4 * est.stderr
    xt = trace(A, method="xtrace", num_matvecs=60, seed=0, distribution="gaussian")
    assert abs(xt.value - np.trace(A)) <= 4 * xt.stderr


def test_progress_bar_runs(capsys):
    est = trace(np.diag([1.0, 2.0, 3.0]), method="hutchinson", num_matvecs=5, seed=0, progress=True)
    assert est.value == pytest.approx(6.0, abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_matvecs": 0}, ValueError, "num_matvecs must be positive"),
        ({"num_matvecs": -3}, ValueError, "num_matvecs must be positive"),
        ({"num_matvecs": 2.5}, TypeError, "num_matvecs must be an int"),
        ({"method": "hutch"}, ValueError, "unknown method 'hutch'"),
        ({"method": "hutch++", "num_matvecs": 2}, ValueError, "hutch\\+\\+.*num_matvecs >= 3"),
        ({"method": "xtrace", "num_matvecs": 3}, ValueError, "xtrace.*num_matvecs >= 4"),
        ({"distribution": "uniform"}, ValueError, "unknown distribution 'uniform'"),
        ({"method": "xtrace", "target_stderr": 0.1}, ValueError, "target_stderr"),
        ({"method": "hutchinson", "target_stderr": -1.0}, ValueError, "target_stderr must be"),
        ({"seed": "zero"}, TypeError, "seed must be"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        trace(np.eye(4), **kwargs)


def test_single_probe_has_unestimated_stderr():
    est = trace(np.diag([1.0, 2.0]), method="hutchinson", num_matvecs=1, seed=0)
    assert est.value == pytest.approx(3.0) and est.stderr == math.inf
