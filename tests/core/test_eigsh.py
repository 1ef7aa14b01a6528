"""Thick-restart Lanczos eigsh against exact eigendecompositions (numpy.linalg.eigh)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse.linalg as sla
from conftest import as_numpy, dense_operator, make_symmetric
from hypothesis import given, settings
from hypothesis import strategies as st

from dualhess import DenseOperator, Operator, OperatorError
from dualhess._eigsh import NotConvergedWarning, eigsh


def expected_values(A: np.ndarray, k: int, which: str) -> np.ndarray:
    """The exact answer from numpy.linalg.eigh, in eigsh's documented order."""
    w = np.linalg.eigh(A)[0]
    if which == "LA":
        return w[::-1][:k]
    if which == "SA":
        return w[:k]
    if which == "LM":
        return w[np.argsort(-np.abs(w), kind="stable")][:k]
    return np.sort(np.r_[w[: k // 2], w[len(w) - (k - k // 2) :]])  # BE


def check_result(A: np.ndarray, res, k: int, which: str, atol: float,
                 criterion: str = "eigenvalue") -> None:
    """Values against eigh, residuals against a recomputation, orthonormal vectors, and what
    ``tol`` bounds under ``criterion``: the eigenvalue error, or the residual."""
    scale = np.abs(np.linalg.eigvalsh(A)).max()
    exact = expected_values(A, k, which)
    assert res.values.shape == (k,) and res.residuals.shape == (k,)
    assert res.converged.dtype == bool and res.converged.all()
    if which == "LM":  # ties in |lambda| may come in either order: compare magnitudes
        np.testing.assert_allclose(np.abs(res.values), np.abs(exact), rtol=0, atol=atol)
    else:
        np.testing.assert_allclose(res.values, exact, rtol=0, atol=atol)
    V = as_numpy(res.vectors)
    assert V.shape == (A.shape[0], k)
    np.testing.assert_allclose(V.T @ V, np.eye(k), rtol=0, atol=1e-12)
    recomputed = np.linalg.norm(A @ V - V * res.values, axis=0)
    np.testing.assert_allclose(res.residuals, recomputed, rtol=0, atol=1e-12 * scale)
    if criterion == "residual":
        assert np.all(recomputed <= res.tol * scale * (1 + 1e-6) + 1e-13 * scale)
    else:
        values = np.abs(res.values) if which == "LM" else res.values
        wanted = np.abs(exact) if which == "LM" else exact
        assert np.all(np.abs(values - wanted) <= res.tol * scale * (1 + 1e-6) + 1e-13 * scale)


# name -> (eigenvalues, k, which). Each a spectrum the issue asks for.
SPECTRA = {
    "well_separated": (np.r_[np.linspace(-1.0, 1.0, 74), 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], 4, "LA"),
    "clustered_1e-6": (np.r_[1.0 - 1e-6 * np.arange(3), np.linspace(0.0, 0.5, 77)], 3, "LA"),
    "multiplicity_5": (np.r_[[10.0] * 5, 5.0, 4.0, 3.0, np.linspace(-1.0, 1.0, 72)], 6, "LA"),
    "indefinite_LM": (np.r_[-9.0, np.linspace(-3.0, 4.0, 79)], 3, "LM"),
    "indefinite_SA": (np.r_[-9.0, -6.0, np.linspace(-3.0, 4.0, 78)], 3, "SA"),
    "indefinite_BE": (np.r_[-9.0, -6.0, np.linspace(-3.0, 4.0, 77), 8.0], 5, "BE"),
    "rank_deficient": (np.r_[5.0, 3.0, -1.0, np.zeros(77)], 6, "LA"),
    "n3_k2": (np.array([2.0, -1.0, 0.5]), 2, "LA"),
    # k close to n with a repeated eigenvalue: the basis fills the space before all copies
    # have been expanded.
    "n6_k4_repeated": (np.array([-2.0, -2.0, -2.0, 1.0, 2.0, 2.0]), 4, "SA"),
}


@pytest.mark.parametrize("name", list(SPECTRA))
def test_spectra_against_eigh(name, framework):
    lam, k, which = SPECTRA[name]
    A = make_symmetric(lam, seed=len(name))
    res = eigsh(dense_operator(A, framework), k, which=which, tol=1e-10, seed=1)
    # the default criterion bounds |theta - lambda| by tol * max|lambda| = 1e-10 * max|lambda|
    check_result(A, res, k, which, atol=1e-9 * np.abs(lam).max())
    if framework == "torch":
        import torch

        assert isinstance(res.vectors, torch.Tensor) and res.vectors.dtype == torch.float64


@pytest.mark.parametrize("name", list(SPECTRA))
def test_spectra_against_eigh_residual_criterion(name):
    # criterion="residual": ||H v - theta v|| <= tol * max|lambda|, and by Weyl the values too
    lam, k, which = SPECTRA[name]
    A = make_symmetric(lam, seed=len(name))
    res = eigsh(DenseOperator(A), k, which=which, tol=1e-10, seed=1, criterion="residual")
    check_result(A, res, k, which, atol=1e-9 * np.abs(lam).max(), criterion="residual")


def test_multiplicity_five_all_copies_found():
    A = make_symmetric(SPECTRA["multiplicity_5"][0], seed=8)
    for seed in range(3):
        res = eigsh(DenseOperator(A), 6, tol=1e-10, seed=seed)
        np.testing.assert_allclose(res.values, [10.0] * 5 + [5.0], rtol=0, atol=1e-9)
        V = res.vectors[:, :5]
        # The five vectors span the whole eigenspace of 10.
        np.testing.assert_allclose(A @ V, 10.0 * V, rtol=0, atol=1e-8)
        np.testing.assert_allclose(np.linalg.svd(V, compute_uv=False), 1.0, atol=1e-10)


def test_residuals_equal_recomputed_at_loose_tol():
    # At tol=1e-4 the residuals are large enough to compare relatively.
    lam = np.r_[np.linspace(0.0, 1.0, 296), 1.2, 1.3, 1.4, 1.5]
    A = make_symmetric(lam, seed=9)
    res = eigsh(DenseOperator(A), 3, tol=1e-4, seed=0, criterion="residual")
    V = res.vectors
    recomputed = np.linalg.norm(A @ V - V * res.values, axis=0)
    assert recomputed.max() > 1e-12  # not trivially converged
    np.testing.assert_allclose(res.residuals, recomputed, rtol=1e-6, atol=1e-13)
    assert np.all(recomputed <= 1e-4 * 1.5)


@pytest.fixture(scope="module")
def decaying_2000():
    lam = 0.9 ** np.arange(2000.0)
    A, Q = make_symmetric(lam, seed=0, return_vectors=True)
    return A, Q, lam


def test_make_symmetric_matches_eigh():
    # The O(n^2) Householder construction used for n > 400 has exactly the given spectrum.
    lam = np.random.default_rng(0).standard_normal(500)
    A, Q = make_symmetric(lam, seed=1, return_vectors=True)
    np.testing.assert_allclose(np.linalg.eigvalsh(A), np.sort(lam), rtol=0, atol=1e-13)
    np.testing.assert_allclose(A @ Q, Q * lam, rtol=0, atol=1e-13)


def test_top10_of_2000_within_scipy_budget(decaying_2000):
    A, Q, lam = decaying_2000
    exact = lam[:10]
    # The top eigenpairs of the construction are exact: A q_i = lambda_i q_i.
    np.testing.assert_allclose(A @ Q[:, :10], Q[:, :10] * exact, rtol=0, atol=1e-14)
    tol = 1e-10
    count = [0]

    def product(x):
        count[0] += 1 if x.ndim == 1 else x.shape[1]
        return A @ x

    linop = sla.LinearOperator(A.shape, matvec=product, matmat=product, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(2000)
    scipy_values = np.sort(sla.eigsh(linop, k=10, which="LA", tol=tol, v0=v0)[0])[::-1]
    np.testing.assert_allclose(scipy_values, exact, rtol=1e-10)

    res = eigsh(DenseOperator(A), 10, tol=tol, seed=0)
    assert res.converged.all()
    np.testing.assert_allclose(res.values, exact, rtol=1e-10, atol=0)
    assert res.num_matvecs <= 1.2 * count[0], (res.num_matvecs, count[0])
    V = res.vectors
    recomputed = np.linalg.norm(A @ V - V * res.values, axis=0)
    np.testing.assert_allclose(res.residuals, recomputed, rtol=0, atol=1e-13)


def test_sa_and_be_on_2000_indefinite():
    lam = np.r_[-(0.8 ** np.arange(5.0)) * 3.0, np.linspace(-0.5, 1.0, 1990), 1.5, 2.0, 2.5, 3.0, 3.5]
    A = make_symmetric(lam, seed=1)
    w = np.sort(lam)
    res = eigsh(DenseOperator(A), 4, which="SA", tol=1e-10, seed=0)
    np.testing.assert_allclose(res.values, w[:4], rtol=0, atol=1e-9)
    res = eigsh(DenseOperator(A), 5, which="BE", tol=1e-10, seed=0)
    np.testing.assert_allclose(res.values, np.r_[w[:2], w[-3:]], rtol=0, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 12),
    data=st.data(),
)
def test_property_agrees_with_eigh(n, data):
    entries = data.draw(
        st.lists(
            st.floats(-10.0, 10.0, allow_nan=False, allow_subnormal=False),
            min_size=n * n,
            max_size=n * n,
        )
    )
    k = data.draw(st.integers(1, n - 1))
    which = data.draw(st.sampled_from(["LA", "SA", "LM", "BE"]))
    seed = data.draw(st.integers(0, 2**16))
    block_size = data.draw(st.integers(1, 4))
    M = np.asarray(entries).reshape(n, n)
    A = (M + M.T) / 2
    scale = max(np.abs(np.linalg.eigvalsh(A)).max(), 1e-300)
    res = eigsh(DenseOperator(A), k, which=which, tol=1e-10, seed=seed, block_size=block_size)
    exact = expected_values(A, k, which)
    assert res.converged.all()
    if which == "LM":
        np.testing.assert_allclose(np.abs(res.values), np.abs(exact), rtol=0, atol=1e-9 * scale)
    else:
        np.testing.assert_allclose(res.values, exact, rtol=0, atol=1e-9 * scale)
    V = res.vectors
    recomputed = np.linalg.norm(A @ V - V * res.values, axis=0)
    np.testing.assert_allclose(res.residuals, recomputed, rtol=0, atol=1e-12 * scale)


def test_same_seed_same_result_across_frameworks(framework):
    A = make_symmetric(np.r_[np.linspace(-1.0, 1.0, 57), 2.0, 3.0, 4.0], seed=3)
    ref = eigsh(DenseOperator(A), 3, tol=1e-8, seed=4)
    res = eigsh(dense_operator(A, framework), 3, tol=1e-8, seed=4)
    assert res.num_matvecs == ref.num_matvecs
    np.testing.assert_allclose(res.values, ref.values, rtol=0, atol=1e-12)


def test_float32_operator_reaches_single_precision():
    torch = pytest.importorskip("torch")
    lam = np.r_[np.linspace(0.0, 1.0, 97), 2.0, 3.0, 4.0]
    A = make_symmetric(lam, seed=6)
    res = eigsh(DenseOperator(torch.tensor(A, dtype=torch.float32)), 3, seed=0)
    assert res.vectors.dtype == torch.float32
    np.testing.assert_allclose(res.values, [4.0, 3.0, 2.0], rtol=0, atol=1e-4)


def test_max_matvecs_exhausted_warns_and_returns():
    A = make_symmetric(np.linspace(1.0, 2.0, 200), seed=7)  # no gaps to speak of
    op = DenseOperator(A)
    with pytest.warns(NotConvergedWarning, match="did not reach tol"):
        res = eigsh(op, 4, tol=1e-12, max_matvecs=30, seed=0)
    assert res.num_matvecs == 30
    assert res.values.shape == (4,) and not res.converged.all()
    V = res.vectors
    recomputed = np.linalg.norm(A @ V - V * res.values, axis=0)
    np.testing.assert_allclose(res.residuals, recomputed, rtol=1e-8, atol=1e-14)
    np.testing.assert_array_equal(res.converged, recomputed <= 1e-12 * res.values.max() * 1.0001)


def test_options_and_counter():
    A = make_symmetric(np.r_[np.linspace(-1.0, 1.0, 37), 2.0, 3.0, 4.0], seed=2)
    op = DenseOperator(A)
    op.num_matvecs = 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = eigsh(op, 2, tol=1e-8, seed=0, return_vectors=False, max_basis=6, progress=True)
    assert res.vectors is None
    assert op.num_matvecs == 5 + res.num_matvecs
    np.testing.assert_allclose(res.values, [4.0, 3.0], atol=1e-7)
    assert res.to_dict()["which"] == "LA"


def test_bad_input_messages():
    A = make_symmetric(np.arange(1.0, 6.0), seed=0)
    op = DenseOperator(A)
    with pytest.raises(ValueError, match="k must be < n"):
        eigsh(op, 5)
    with pytest.raises(ValueError, match="k must be positive"):
        eigsh(op, 0)
    with pytest.raises(ValueError, match="which must be one of"):
        eigsh(op, 2, which="LR")
    with pytest.raises(ValueError, match="max_basis must be >= k \\+ block_size"):
        eigsh(op, 2, max_basis=2)
    with pytest.raises(ValueError, match="tol must be"):
        eigsh(op, 2, tol=-1.0)
    with pytest.raises(OperatorError, match="square"):
        eigsh(DenseOperator(np.ones((3, 4))), 1)

    class NaNOperator(Operator):
        def _matvec(self, v):
            return v * np.nan

    with pytest.raises(OperatorError, match="NaN"):
        eigsh(NaNOperator((5, 5)), 2, seed=0)
    # Without the operator's own check, eigsh still refuses to return NaN.
    with pytest.raises(OperatorError, match="NaN"):
        eigsh(NaNOperator((5, 5), check_finite=False), 2, seed=0)


# ---------------------------------------------------------------------- block_size
class CountingOperator(DenseOperator):
    """A dense operator that counts its calls (one per matvec or matmat)."""

    def __init__(self, matrix):
        super().__init__(matrix)
        self.calls = 0

    def _matvec(self, v):
        self.calls += 1
        return super()._matvec(v)

    def _matmat(self, V):
        self.calls += 1
        return super()._matmat(V)


@pytest.mark.parametrize("block_size", [2, 3, 8])
@pytest.mark.parametrize("name", list(SPECTRA))
def test_block_spectra_against_eigh(name, block_size, framework):
    """The same exact answers with several columns expanded per operator call."""
    lam, k, which = SPECTRA[name]
    A = make_symmetric(lam, seed=len(name))
    res = eigsh(dense_operator(A, framework), k, which=which, tol=1e-10, seed=1,
                block_size=block_size)
    check_result(A, res, k, which, atol=1e-9 * np.abs(lam).max())


@pytest.mark.parametrize("block_size", [4, 8])
def test_block_takes_fewer_operator_calls(decaying_2000, block_size):
    A, _, lam = decaying_2000
    single, block = CountingOperator(A), CountingOperator(A)
    one = eigsh(single, 10, tol=1e-10, seed=0)
    many = eigsh(block, 10, tol=1e-10, seed=0, block_size=block_size)
    np.testing.assert_allclose(many.values, lam[:10], rtol=1e-10, atol=0)
    np.testing.assert_allclose(one.values, lam[:10], rtol=1e-10, atol=0)
    assert single.calls == one.num_matvecs  # one column per call
    assert block.calls < single.calls / 1.5, (block.calls, single.calls)
    assert many.num_matvecs <= block_size * block.calls


def test_block_finds_every_copy_of_a_repeated_eigenvalue():
    lam = np.r_[[10.0] * 5, 5.0, 4.0, 3.0, np.linspace(-1.0, 1.0, 192)]
    A = make_symmetric(lam, seed=3)
    res = eigsh(DenseOperator(A), 6, tol=1e-10, seed=0, block_size=5)
    np.testing.assert_allclose(res.values, [10.0] * 5 + [5.0], rtol=0, atol=1e-8)


def test_block_respects_the_budget_and_checks_input():
    A = make_symmetric(np.linspace(-1.0, 1.0, 100), seed=0)
    with pytest.warns(NotConvergedWarning):
        res = eigsh(DenseOperator(A), 3, tol=1e-14, seed=0, block_size=8, max_matvecs=30)
    assert res.num_matvecs <= 30
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        eigsh(DenseOperator(A), 3, block_size=0)
    with pytest.raises(TypeError, match="block_size must be an int"):
        eigsh(DenseOperator(A), 3, block_size=2.0)
    with pytest.raises(ValueError, match="max_basis must be >= k \\+ block_size"):
        eigsh(DenseOperator(A), 3, block_size=8, max_basis=10)


@pytest.mark.parametrize(
    ("entries", "which"),
    [
        ([0.0, 0.0, 0.0, 3.0, 1.0, 0.0, 0.0, 0.0, -1.0], "SA"),  # did not converge in 300
        ([0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0], "LM"),  # wrong pair "converged"
    ],
)
def test_block_on_a_space_smaller_than_two_blocks(entries, which):
    """Found by the property test: n = 3, k = 1, b = 2 restarted before every block, losing
    the directions it had; a restart now happens only when the next block does not fit."""
    M = np.asarray(entries).reshape(3, 3)
    A = (M + M.T) / 2
    res = eigsh(DenseOperator(A), 1, which=which, tol=1e-10, seed=0, block_size=2)
    assert res.converged.all() and res.num_matvecs <= 6
    np.testing.assert_allclose(res.values, expected_values(A, 1, which), rtol=0, atol=1e-12)


def test_jax_host_rule_and_device_fixed_shapes_give_the_same_numbers(monkeypatch):
    """jax on a CPU runs its Krylov bookkeeping in numpy (a rule per device); the on-device
    fixed-shape path (accelerators) and numpy itself give the same pairs to rounding."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import dualhess._eigsh as eigsh_module

    rng = np.random.default_rng(5)
    Q, _ = np.linalg.qr(rng.standard_normal((60, 60)))
    A = (Q * np.r_[5.0, 4.0, 4.0, 3.5, np.linspace(-1.0, 2.0, 56)]) @ Q.T
    A = (A + A.T) / 2
    reference = eigsh(DenseOperator(A), k=4, tol=1e-10, seed=3)
    op = DenseOperator(jnp.asarray(A))
    assert op.fixed_shapes
    host = eigsh(op, k=4, tol=1e-10, seed=3)
    monkeypatch.setattr(eigsh_module, "on_host", lambda x: False)
    device = eigsh(op, k=4, tol=1e-10, seed=3)
    for res in (host, device):
        assert isinstance(res.vectors, jax.Array) and res.vectors.dtype == jnp.float64
        np.testing.assert_allclose(res.values, reference.values, rtol=0, atol=1e-12)
        # rounding-level differences may move a restart by one product
        assert abs(res.num_matvecs - reference.num_matvecs) <= 2 and np.all(res.converged)
        np.testing.assert_allclose(res.residuals, 0.0, atol=1e-9)
    # the simple eigenvalues' vectors agree up to sign (4.0 is double: any basis of its plane)
    for j in (0, 3):
        overlap = abs(float(np.asarray(host.vectors)[:, j] @ np.asarray(device.vectors)[:, j]))
        assert overlap == pytest.approx(1.0, abs=1e-10)


def test_start_vectors_are_released_before_the_first_product(monkeypatch):
    # eigsh keeps no reference to a start column once it is in the basis: at GPT-2 scale
    # each one is another vector of the model's size for the whole run
    import gc
    import weakref

    from dualhess import _eigsh

    refs = []
    original = _eigsh._start_columns

    def tracked(op, v0, block):
        columns = original(op, v0, block)
        refs.extend(weakref.ref(c) for c in columns)
        return columns

    monkeypatch.setattr(_eigsh, "_start_columns", tracked)
    alive = []

    class Spy(DenseOperator):
        def _matmat(self, V):
            gc.collect()
            alive.append(any(r() is not None for r in refs))
            return super()._matmat(V)

    A = np.diag(np.arange(1.0, 31.0))
    v0 = np.random.default_rng(0).standard_normal((30, 2))
    eigsh(Spy(A), 2, tol=1e-8, seed=0, v0=v0, block_size=2)
    assert refs and alive and not any(alive)
