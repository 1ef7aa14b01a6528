"""XTrace's stderr is calibrated: it matches the spread of the estimate over seeds.

The leave-one-out estimates ``t_i`` that XTrace averages are positively correlated, so
their independent-sample standard error ``std(t_i) / sqrt(k)`` is 10-35 % too small
(+-2 sigma covered the trace 80-90 % of the time). ``stderr`` adds an unbiased estimate
of their covariance (see ``dualhess._trace._xtrace_stderr``), so ``stderr^2`` is
unbiased for the variance of the value: over 200 seeds the mean stderr is within a few
per cent of the observed standard deviation (which itself carries about 5 % sampling
error at 200 seeds, and ``E[stderr] <= sqrt(E[stderr^2])``), and +-2 sigma covers the
trace 93-95 % of the time. (Not quite a normal 95 %: with k = 20 probes the stderr is
itself an estimate, with a coefficient of variation near 0.2, so the interval behaves
like a Student t one; over 2000 seeds these spectra give 0.938-0.946, and a block of
200 seeds scatters by about +-0.017 around that.)
"""

from __future__ import annotations

import numpy as np
import pytest
from _matrices import symmetric_with_spectrum

from dualhess import DenseOperator
from dualhess._trace import trace

N = 200
BUDGET = 40  # k = 20 probes
SEEDS = 200
_i = np.arange(1.0, N + 1.0)
_noise = np.random.default_rng(2024)
SPECTRA = {
    # a decaying (numerically low-rank) part plus a small flat floor
    "low-rank": 10.0 * _i**-2.0 + 0.01,
    "flat": 1.0 + 0.1 * _noise.standard_normal(N),
    "indefinite": np.where(_i % 2 == 0, 1.0, -1.0) * (1.0 + _noise.random(N)),
}


@pytest.fixture(scope="module", params=sorted(SPECTRA))
def runs(request) -> tuple[str, float, np.ndarray, np.ndarray, np.ndarray]:
    """Name, exact trace, and over 200 seeds: values, stderrs, independent-sample stderrs."""
    eigenvalues = SPECTRA[request.param]
    op = DenseOperator(symmetric_with_spectrum(eigenvalues, seed=1))
    estimates = [trace(op, method="xtrace", num_matvecs=BUDGET, seed=s) for s in range(SEEDS)]
    values = np.array([e.value for e in estimates])
    stderrs = np.array([e.stderr for e in estimates])
    k = BUDGET // 2
    naive = np.array([np.std(e.samples, ddof=1) / np.sqrt(k) for e in estimates])
    return request.param, float(eigenvalues.sum()), values, stderrs, naive


def test_xtrace_stderr_matches_the_spread_and_covers_the_trace(runs):
    name, exact, values, stderrs, naive = runs
    spread = float(np.std(values, ddof=1))
    coverage = float(np.mean(np.abs(values - exact) <= 2.0 * stderrs))
    ratio = float(np.mean(stderrs)) / spread
    rms_ratio = float(np.sqrt(np.mean(stderrs**2) / np.mean((values - exact) ** 2)))
    naive_coverage = float(np.mean(np.abs(values - exact) <= 2.0 * naive))
    naive_ratio = float(np.mean(naive)) / spread
    figures = (
        f"{name}: coverage(+-2 stderr) {coverage:.3f}, mean(stderr)/std(value) {ratio:.3f}, "
        f"rms(stderr)/rms(error) {rms_ratio:.3f}; independent-sample stderr: coverage "
        f"{naive_coverage:.3f}, ratio {naive_ratio:.3f}"
    )
    print(figures)
    assert coverage >= 0.93, figures
    assert 0.85 <= ratio <= 1.25, figures
    assert 0.85 <= rms_ratio <= 1.25, figures
    # The covariance term only ever adds to the independent-sample error.
    assert np.all(stderrs >= naive * (1 - 1e-12)), figures
