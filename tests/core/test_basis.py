"""Where Krylov vectors live: basis="device" | "host" | "disk" give the same numbers."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import make_symmetric

from dualhess import DenseOperator
from dualhess._basis import DiskBasis, make_basis
from dualhess._density import density
from dualhess._eigsh import eigsh
from dualhess._lanczos import lanczos

LAM = np.r_[[10.0] * 3, 7.0, 5.0, np.linspace(-2.0, 2.0, 115)]


@pytest.fixture(scope="module")
def matrix():
    return make_symmetric(LAM, seed=4)


@pytest.mark.parametrize("mode", ["host", "disk"])
@pytest.mark.parametrize("max_basis", [None, 12])  # 12: several thick restarts
def test_eigsh_basis_modes_agree(matrix, mode, max_basis, tmp_path):
    ref = eigsh(DenseOperator(matrix), 5, tol=1e-10, seed=2, max_basis=max_basis)
    kwargs = {"basis_dir": str(tmp_path)} if mode == "disk" else {}
    res = eigsh(DenseOperator(matrix), 5, tol=1e-10, seed=2, max_basis=max_basis, basis=mode,
                **kwargs)
    assert res.num_matvecs == ref.num_matvecs
    np.testing.assert_allclose(res.values, ref.values, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.values, [10.0, 10.0, 10.0, 7.0, 5.0], rtol=0, atol=1e-9)
    np.testing.assert_allclose(res.residuals, ref.residuals, rtol=0, atol=1e-12)
    # the simple eigenvalues' vectors agree up to sign
    for j in (3, 4):
        assert abs(float(res.vectors[:, j] @ ref.vectors[:, j])) == pytest.approx(1, abs=1e-12)
    assert not list(tmp_path.iterdir())  # the disk basis removed its file


@pytest.mark.parametrize("mode", ["host", "disk"])
def test_lanczos_and_density_basis_modes_agree(matrix, mode):
    # 10 steps: before the top eigenvectors converge to rounding. Past that, the Lanczos
    # coefficients amplify any rounding difference (the order of a BLAS sum) by ~100 per
    # step, in every mode alike; the quadrature (nodes, density) stays stable, below.
    ref = lanczos(DenseOperator(matrix), 10, num_probes=3, seed=1, return_basis=True)
    tri = lanczos(DenseOperator(matrix), 10, num_probes=3, seed=1, return_basis=True, basis=mode)
    np.testing.assert_allclose(tri.alpha, ref.alpha, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tri.beta, ref.beta, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tri.basis, ref.basis, rtol=0, atol=1e-12)
    d_ref = density(DenseOperator(matrix), num_probes=4, num_steps=30, seed=0)
    d = density(DenseOperator(matrix), num_probes=4, num_steps=30, seed=0, basis=mode)
    np.testing.assert_allclose(d.nodes, d_ref.nodes, rtol=0, atol=1e-12)
    np.testing.assert_allclose(d.values, d_ref.values, rtol=0, atol=1e-12)


def test_lanczos_breakdown_with_host_basis():
    op = DenseOperator(np.diag([1.0, 2.0, 3.0, 4.0, 5.0]))
    ref = lanczos(op, 8, num_probes=2, seed=0)
    tri = lanczos(op, 8, num_probes=2, seed=0, basis="host")
    np.testing.assert_array_equal(tri.num_steps, ref.num_steps)
    np.testing.assert_allclose(tri.alpha, ref.alpha, rtol=0, atol=1e-12)


@pytest.mark.torch
def test_torch_operator_basis_modes_agree(matrix):
    torch = pytest.importorskip("torch")
    op = DenseOperator(torch.asarray(matrix))
    ref = eigsh(op, 5, tol=1e-10, seed=2, max_basis=12)
    for mode in ("host", "disk"):
        res = eigsh(DenseOperator(torch.asarray(matrix)), 5, tol=1e-10, seed=2, max_basis=12,
                    basis=mode)
        assert isinstance(res.vectors, torch.Tensor) and res.vectors.dtype == torch.float64
        np.testing.assert_allclose(res.values, ref.values, rtol=0, atol=1e-12)
        # 10 steps: interior Ritz values past convergence move with any rounding (torch
        # against numpy by 2e-3 at 20 steps, before this change too)
        t_ref = lanczos(op, 10, num_probes=3, seed=0)
        t = lanczos(DenseOperator(torch.asarray(matrix)), 10, num_probes=3, seed=0, basis=mode)
        np.testing.assert_allclose(t.alpha, t_ref.alpha, rtol=0, atol=1e-12)
        np.testing.assert_allclose(t.beta, t_ref.beta, rtol=0, atol=1e-12)


def test_basis_operations_against_numpy():
    rng = np.random.default_rng(0)
    n = 50
    V0, _ = np.linalg.qr(rng.standard_normal((n, 6)))
    M = rng.standard_normal((6, 4))
    w = rng.standard_normal(n)
    for mode in ("device", "host", "disk"):
        with make_basis(mode, capacity=8, like=np.zeros(n)) as basis:
            for j in range(6):
                basis.append(V0[:, j])
            out, h = basis.orthogonalize(w)
            np.testing.assert_allclose(np.abs(V0.T @ out).max(), 0.0, atol=1e-14)
            np.testing.assert_allclose(h, V0.T @ w, rtol=0, atol=1e-12)
            np.testing.assert_allclose(basis.combination(M), V0 @ M, rtol=0, atol=1e-12)
            basis.combine_rows(np.arange(6), M, np.arange(4))  # in place, overlapping rows
            basis.truncate(4)
            np.testing.assert_allclose(basis.rows([0, 1, 2, 3]), V0 @ M, rtol=0, atol=1e-12)


def test_disk_basis_file_removed_and_bad_arguments(tmp_path):
    basis = DiskBasis(4, np.zeros(10), directory=str(tmp_path))
    assert os.path.exists(basis.path)
    basis.close()
    assert not list(tmp_path.iterdir())
    A = np.diag(np.arange(1.0, 11.0))
    with pytest.raises(ValueError, match="basis must be one of"):
        eigsh(DenseOperator(A), 2, basis="gpu")
    with pytest.raises(ValueError, match="basis_dir"):
        lanczos(DenseOperator(A), 3, basis="host", basis_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not an existing directory"):
        density(DenseOperator(A), basis="disk", basis_dir=str(tmp_path / "missing"))


class _Reads:
    """Records the size of every block a host or disk basis reads."""

    def __init__(self, basis, monkeypatch):
        self.sizes, self.calls = [], 0
        read = basis._read

        def recording(start, stop, columns):
            block = read(start, stop, columns)
            self.sizes.append(block.nbytes)
            return block

        monkeypatch.setattr(basis, "_read", recording)


@pytest.mark.parametrize("mode", ["host", "disk"])
def test_blocks_are_bounded_and_match_the_device_basis(mode, monkeypatch):
    # float32 rows of 40,000 entries (160 kB) in blocks of at most 64 kB: every operation
    # streams the basis a block of columns at a time, and agrees with the device basis
    rng = np.random.default_rng(1)
    n, rows = 40_000, 7
    V0, _ = np.linalg.qr(rng.standard_normal((n, rows)))
    V0 = V0.astype(np.float32)
    M = rng.standard_normal((rows, 3))
    w = rng.standard_normal(n).astype(np.float32)
    ref = make_basis("device", rows, np.zeros(n, dtype=np.float32))
    basis = make_basis(mode, rows, np.zeros(n, dtype=np.float32))
    monkeypatch.setattr(basis, "block_bytes", 1 << 16)
    reads = _Reads(basis, monkeypatch)
    with basis, ref:
        for j in range(rows):
            ref.append(V0[:, j])
            basis.append(V0[:, j])
        out, h = basis.orthogonalize(w.copy())
        out_ref, h_ref = ref.orthogonalize(w.copy())
        np.testing.assert_allclose(h, h_ref, rtol=0, atol=1e-5)
        np.testing.assert_allclose(out, out_ref, rtol=0, atol=1e-5)
        assert np.abs(V0.T.astype(np.float64) @ out).max() < 1e-5 * np.linalg.norm(w)
        np.testing.assert_allclose(basis.combination(M), ref.combination(M), atol=1e-5)
        np.testing.assert_allclose(basis.rows([2, 5]), ref.rows([2, 5]), atol=0)
        basis.combine_rows(np.arange(rows), M, np.arange(3))
        ref.combine_rows(np.arange(rows), M, np.arange(3))
        np.testing.assert_allclose(basis.rows([0, 1, 2]), ref.rows([0, 1, 2]), atol=1e-5)
    assert reads.sizes and max(reads.sizes) <= 1 << 16


@pytest.mark.parametrize("mode", ["host", "disk"])
def test_two_passes_read_the_basis_three_times(mode, monkeypatch):
    # the second pass's coefficients are summed while the first pass's update reads a block
    rng = np.random.default_rng(2)
    n = 30_000
    basis = make_basis(mode, 4, np.zeros(n))
    monkeypatch.setattr(basis, "block_bytes", 1 << 16)
    with basis:
        for v in np.linalg.qr(rng.standard_normal((n, 4)))[0].T:
            basis.append(v)
        reads = _Reads(basis, monkeypatch)
        blocks = len(basis._column_blocks(4))
        assert blocks > 1
        w = rng.standard_normal(n)
        out, h = basis.orthogonalize(w)
        assert len(reads.sizes) == 3 * blocks
        V = np.stack([basis.row(j) for j in range(4)])
        np.testing.assert_allclose(h, V @ w, rtol=0, atol=1e-12)
        assert np.abs(V @ out).max() < 1e-14 * np.linalg.norm(w)


@pytest.mark.parametrize("mode", ["device", "host", "disk"])
def test_second_pass_only_after_cancellation(mode, monkeypatch):
    # eta = 1/sqrt(2) (DGKS): a vector nearly orthogonal to the basis keeps one pass, one
    # that mostly lies in the span gets the second; both come out orthogonal to rounding
    rng = np.random.default_rng(3)
    n = 2_000
    Q = np.linalg.qr(rng.standard_normal((n, 5)))[0]
    calls = []
    with make_basis(mode, 5, np.zeros(n)) as basis:
        for v in Q.T:
            basis.append(v)
        if mode == "device":
            from dualhess import _basis

            original = _basis.coefficients
            monkeypatch.setattr(_basis, "coefficients",
                                lambda V, w, xp: calls.append(1) or original(V, w, xp))
            passes = lambda: len(calls)  # noqa: E731
        else:
            reads = _Reads(basis, monkeypatch)
            blocks = len(basis._column_blocks(5))
            passes = lambda: len(reads.sizes) // blocks - 1  # noqa: E731
        free = rng.standard_normal(n)
        free -= Q @ (Q.T @ free)
        free += 1e-3 * (Q @ rng.standard_normal(5))  # a little along the basis
        out, _ = basis.orthogonalize(free, eta=1 / np.sqrt(2))
        assert passes() == 1
        assert np.abs(Q.T @ out).max() < 1e-14 * np.linalg.norm(free)
        calls.clear()
        if mode != "device":
            reads.sizes.clear()
        inside = Q @ rng.standard_normal(5) + 1e-6 * rng.standard_normal(n)
        out, _ = basis.orthogonalize(inside, eta=1 / np.sqrt(2))
        assert passes() == 2
        assert np.abs(Q.T @ out).max() < 1e-14 * np.linalg.norm(inside)


@pytest.mark.parametrize("mode", ["host", "disk"])
def test_overwrite_orthogonalises_the_callers_cpu_vector_in_place(mode):
    torch = pytest.importorskip("torch")
    n = 1_000
    Q = np.linalg.qr(np.random.default_rng(4).standard_normal((n, 3)))[0]
    with make_basis(mode, 4, torch.zeros(n, dtype=torch.float64)) as basis:
        for v in Q.T:
            basis.append(torch.from_numpy(v.copy()))
        w = torch.ones(n, dtype=torch.float64)
        kept, _ = basis.orthogonalize(w)
        assert torch.equal(w, torch.ones(n, dtype=torch.float64))  # the default copies
        out, _ = basis.orthogonalize(w, overwrite=True)
        assert out.data_ptr() == w.data_ptr()  # the same memory, no second vector
        assert torch.allclose(out, kept, rtol=0, atol=1e-14)
        basis.append(out, divisor=float(out.norm()))
        row = basis.row(3)
        assert abs(float(row.norm()) - 1) < 1e-14
        assert torch.allclose(row * float(kept.norm()), kept, rtol=0, atol=1e-13)


@pytest.mark.parametrize("mode", ["device", "host", "disk"])
def test_the_basis_keeps_no_reference_to_the_vector_it_was_made_like(mode):
    # the template vector (often the first one appended) would live as long as the basis
    import gc
    import weakref

    torch = pytest.importorskip("torch")
    like = torch.ones(1_000, dtype=torch.float64)
    ref = weakref.ref(like)
    with make_basis(mode, 3, like) as basis:
        basis.append(like / like.norm())
        del like
        gc.collect()
        assert ref() is None
        assert basis.row(0).dtype == torch.float64


@pytest.mark.parametrize("mode", ["host", "disk"])
def test_eigsh_orthogonalises_its_own_vectors_in_place(mode, monkeypatch):
    # products of an operator that gives them away, and eigsh's random directions, are
    # orthogonalised in place (no second vector of n); a caller's start vector is copied
    from dualhess import _basis

    seen = []
    original = _basis.HostBasis.orthogonalize

    def recording(self, w, passes=2, *, overwrite=False, eta=None):
        seen.append(overwrite)
        return original(self, w, passes, overwrite=overwrite, eta=eta)

    monkeypatch.setattr(_basis.HostBasis, "orthogonalize", recording)

    class Owned(DenseOperator):
        owns_outputs = True

    A = np.diag(np.arange(1.0, 41.0))
    v0 = np.ones(40)
    res = eigsh(Owned(A), 2, tol=1e-10, seed=0, v0=v0, basis=mode)
    np.testing.assert_allclose(res.values, [40.0, 39.0], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(v0, np.ones(40))  # the caller's vector is untouched
    assert seen.count(True) >= res.num_matvecs  # every product, and the random directions
    seen.clear()
    eigsh(DenseOperator(A), 2, tol=1e-10, seed=0, basis=mode)  # may return stored arrays
    assert seen.count(False) >= 1
