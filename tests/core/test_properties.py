"""Property tests (hypothesis) of the invariants of Lanczos, density, trace and diagonal on
random symmetric matrices, with entries spanning many orders of magnitude."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import dualhess


@st.composite
def symmetric(draw, max_n=24):
    n = draw(st.integers(2, max_n))
    entries = draw(st.lists(st.floats(-10.0, 10.0, allow_nan=False, allow_subnormal=False),
                            min_size=n * n, max_size=n * n))
    scale = draw(st.sampled_from([1.0, 1e-8, 1e8, 1e-200, 1e200]))
    M = np.asarray(entries).reshape(n, n) * scale
    return (M + M.T) / 2


def _bounds(A):
    w = np.linalg.eigvalsh(A)
    width = max(np.abs(w).max(), np.finfo(float).tiny)
    return w, width


@settings(max_examples=60, deadline=None)
@given(A=symmetric(), steps=st.integers(1, 30), probes=st.integers(1, 3), seed=st.integers(0, 99))
def test_lanczos_ritz_values_lie_in_the_spectrum(A, steps, probes, seed):
    w, width = _bounds(A)
    t = dualhess.lanczos(dualhess.DenseOperator(A), steps, num_probes=probes, seed=seed)
    alpha, beta = np.atleast_2d(t.alpha), np.atleast_2d(t.beta)
    assert np.all(np.isfinite(alpha)) and np.all(beta >= 0)
    for i in range(alpha.shape[0]):
        m = int(np.atleast_1d(t.num_steps)[i])
        assert 1 <= m <= min(steps, A.shape[0])
        T = np.diag(alpha[i, :m]) + np.diag(beta[i, : m - 1], 1) + np.diag(beta[i, : m - 1], -1)
        theta = np.linalg.eigvalsh(T)
        # Ritz values of an orthonormal basis lie in [lambda_min, lambda_max] (to rounding).
        assert theta.min() >= w.min() - 1e-10 * width
        assert theta.max() <= w.max() + 1e-10 * width


@settings(max_examples=60, deadline=None)
@given(A=symmetric(), steps=st.integers(2, 30), probes=st.integers(1, 3), seed=st.integers(0, 99))
def test_density_is_a_probability_on_the_spectrum(A, steps, probes, seed):
    w, width = _bounds(A)
    d = dualhess.density(dualhess.DenseOperator(A), num_probes=probes, num_steps=steps, seed=seed)
    assert np.all(np.isfinite(d.values)) and np.all(d.values >= 0)
    np.testing.assert_allclose(d.weights.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert np.all(d.weights >= 0)
    used = d.weights > 0
    assert np.all(d.nodes[used] >= w.min() - 1e-10 * width)
    assert np.all(d.nodes[used] <= w.max() + 1e-10 * width)
    area = float(np.sum(np.diff(d.grid) * (d.values[1:] + d.values[:-1])) / 2)
    assert abs(area - 1.0) <= 1e-6


@settings(max_examples=60, deadline=None)
@given(A=symmetric(max_n=16), seed=st.integers(0, 99), method=st.sampled_from(["xtrace", "hutch++"]))
def test_trace_is_exact_once_the_sketch_spans_the_space(A, seed, method):
    n = A.shape[0]
    _, width = _bounds(A)
    est = dualhess.trace(dualhess.DenseOperator(A), method=method, num_matvecs=4 * n, seed=seed)
    assert abs(est.value - np.trace(A)) <= 1e-9 * n * width
    assert np.isfinite(est.stderr)


@settings(max_examples=60, deadline=None)
@given(A=symmetric(max_n=16), seed=st.integers(0, 99))
def test_xdiag_is_exact_once_the_sketch_spans_the_space(A, seed):
    n = A.shape[0]
    _, width = _bounds(A)
    est = dualhess.diagonal(dualhess.DenseOperator(A), method="xdiag", num_matvecs=4 * n, seed=seed)
    np.testing.assert_allclose(est.numpy(), np.diag(A), rtol=0, atol=1e-9 * n * width)
