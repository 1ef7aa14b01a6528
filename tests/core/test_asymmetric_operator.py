"""eigsh and lanczos never report a spectrum of a non-symmetric operator (issue 23).

Lanczos with full reorthogonalisation already computes every projection ``v_i^T A v_j`` of
the basis; for a symmetric operator ``v_i^T A v_j = v_j^T A v_i`` (the coefficient below the
diagonal is beta, the older ones zero), so their difference measures the asymmetry at no
extra product. Beyond ``sqrt(u)`` of the products' unit roundoff (float64: 1.5e-8; symmetric
operators measure below ``6 u``) the run raises :class:`AsymmetricOperatorError`.

Before: ``eigsh`` symmetrised the Rayleigh-Ritz matrix and reported ``converged=True`` for a
spectrum that belongs to no operator (``np.triu(A) + 1``, a custom Operator, a framework's
wrong second derivative); ``lanczos`` and ``density`` returned their numbers silently.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from _matrices import symmetric_with_spectrum

import dualhess
from dualhess import AsymmetricOperatorError, DenseOperator, Operator
from dualhess._util import symmetry_tolerance

errors_table = pytest.mark.errors_table
N = 120
SPECTRUM = np.linspace(-5.0, 10.0, N)


def _non_symmetric() -> np.ndarray:
    A = symmetric_with_spectrum(SPECTRUM, seed=1)
    return np.triu(A) + 1.0


class Skewed(Operator):
    """A custom operator whose product is ``(S + e K) v`` with ``K`` skew: not symmetric."""

    def __init__(self, strength: float) -> None:
        super().__init__((N, N), np.float64)
        rng = np.random.default_rng(3)
        K = rng.standard_normal((N, N))
        self.matrix = symmetric_with_spectrum(SPECTRUM, seed=2) + strength * (K - K.T)

    def _matvec(self, v):
        return self.matrix @ v


@errors_table
def test_eigsh_of_a_non_symmetric_dense_matrix():
    op = DenseOperator(_non_symmetric(), check_symmetric=False)
    with pytest.raises(AsymmetricOperatorError, match=r"max \|u\^T A v - v\^T A u\| / \|\|A\|\|") as info:
        dualhess.eigsh(op, k=4, seed=0, tol=1e-10)
    text = str(info.value)
    assert "eigsh: the operator is not symmetric" in text and "(A + A.T) / 2" in text
    assert "weight_norm" in text  # the likely causes are named


@pytest.mark.parametrize("block_size", [1, 2, 4])
@pytest.mark.parametrize("which", ["LA", "SA", "BE"])
def test_eigsh_never_reports_convergence_for_asymmetry(block_size, which):
    op = DenseOperator(_non_symmetric(), check_symmetric=False)
    with pytest.raises(AsymmetricOperatorError):
        dualhess.eigsh(op, k=3, which=which, seed=0, block_size=block_size)


@errors_table
def test_eigsh_block_of_a_custom_non_symmetric_operator():
    with pytest.raises(AsymmetricOperatorError, match="eigsh: the operator is not symmetric"):
        dualhess.eigsh(Skewed(1e-3), k=4, seed=0, block_size=2)


@errors_table
def test_lanczos_and_density_of_a_non_symmetric_operator():
    op = DenseOperator(_non_symmetric(), check_symmetric=False)
    with pytest.raises(AsymmetricOperatorError, match="lanczos: the operator is not symmetric"):
        dualhess.lanczos(op, 20, seed=0)
    with pytest.raises(AsymmetricOperatorError, match="lanczos: the operator is not symmetric"):
        dualhess.lanczos(Skewed(1e-3), 20, num_probes=3, seed=0)
    with pytest.raises(AsymmetricOperatorError, match="lanczos: the operator is not symmetric"):
        dualhess.lanczos(op, 20, seed=0, reorthogonalize=False)
    with pytest.raises(AsymmetricOperatorError, match="not symmetric"):
        dualhess.density(op, num_probes=2, num_steps=15, seed=0)


def test_asymmetry_is_measured_at_its_size():
    """The reported figure follows the asymmetry; rounding-level skew (1e-12) is accepted."""
    figures = []
    for strength in (1e-3, 1e-2, 1e-1):
        with pytest.raises(AsymmetricOperatorError) as info:
            dualhess.eigsh(Skewed(strength), k=2, seed=0)
        text = str(info.value)
        figures.append(float(text.split("||A|| = ")[1].split(",")[0]))
    assert figures[0] < figures[1] < figures[2]
    assert 10 < figures[1] / figures[0] < 1000 and 10 < figures[2] / figures[1] < 1000
    r = dualhess.eigsh(Skewed(1e-13), k=2, seed=0, tol=1e-8)
    assert r.converged.all()


def test_asymmetry_costs_no_extra_product():
    op = DenseOperator(symmetric_with_spectrum(SPECTRUM, seed=1))
    r = dualhess.eigsh(op, k=4, seed=0, tol=1e-10)
    assert r.num_matvecs == op.num_matvecs


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize(
    "spectrum",
    [
        SPECTRUM,  # indefinite
        np.r_[np.full(5, 10.0), np.full(5, 10.0 - 1e-7), np.linspace(-1.0, 1.0, N - 10)],  # clusters
        1e-9 * SPECTRUM,  # tiny scale: the measure is relative
        np.r_[np.zeros(N - 3), 1.0, 2.0, -3.0],  # rank-deficient (breakdown)
    ],
    ids=["indefinite", "clustered", "tiny", "rank3"],
)
def test_symmetric_operators_are_unaffected(dtype, spectrum):
    A = symmetric_with_spectrum(spectrum, seed=1)
    if dtype is np.float16 and np.abs(spectrum).max() < 1e-4:
        pytest.skip("below float16's range")
    op = DenseOperator(A.astype(dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 16-bit products: not converged to tol, honestly
        for block_size in (1, 2):
            r = dualhess.eigsh(op, k=3, which="BE", seed=0, tol=1e-6, block_size=block_size)
            if dtype is not np.float16:
                assert r.converged.all()
        dualhess.lanczos(op, 30, num_probes=2, seed=0)
        dualhess.density(op, num_probes=2, num_steps=20, seed=0)


def test_tolerance_follows_the_products_precision():
    assert symmetry_tolerance(DenseOperator(np.eye(3)), 10) == pytest.approx(np.sqrt(2.0**-52))
    low = dualhess._util.check_operator(DenseOperator(np.eye(3, dtype=np.float16)), "t")
    assert symmetry_tolerance(low, 10) == pytest.approx(np.sqrt(2.0**-10))


@errors_table
def test_small_asymmetry_of_a_float64_operator_warns_and_limits_convergence():
    """Between float64's rounding and float32's (a float64 model computing partly in
    float32: Hugging Face's float32 loss, RMSNorm casts) the spectrum is accurate to the
    asymmetry, not refused: a PrecisionWarning, and no pair converged below it."""
    with pytest.warns(dualhess.PrecisionWarning, match="symmetric only to"):
        r = dualhess.eigsh(Skewed(1e-6), k=2, seed=0, tol=1e-10)
    assert not r.converged.any()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dualhess.PrecisionWarning)
        loose = dualhess.eigsh(Skewed(1e-6), k=2, seed=0, tol=1e-3)
    assert loose.converged.all()
