"""The Operator seam: products, counting, chunking, checks, scipy interop, dense export."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as sla

import dualhess
from dualhess import DenseOperator, Operator, OperatorError, ParamLayout


def _sym(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n))
    return (A + A.T) / 2


def _native(framework: str, A: np.ndarray):
    if framework == "numpy":
        return A
    if framework == "torch":
        torch = pytest.importorskip("torch")
        return torch.tensor(A, dtype=torch.float64)
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    return jnp.asarray(A, dtype=jnp.float64)


class MatvecOnly(Operator):
    def __init__(self, A: np.ndarray, **kw):
        super().__init__(A.shape, np.float64, **kw)
        self.A = A
        self.calls = 0

    def _matvec(self, v):
        self.calls += 1
        return self.A @ v


class MatmatOnly(Operator):
    def __init__(self, A: np.ndarray, **kw):
        super().__init__(A.shape, np.float64, **kw)
        self.A = A
        self.widths: list[int] = []

    def _matmat(self, V):
        self.widths.append(V.shape[1])
        return self.A @ V


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
def test_dense_operator_products_match_matrix(framework):
    A = _sym(7)
    op = DenseOperator(_native(framework, A))
    assert op.shape == (7, 7)
    assert op.framework == framework
    rng = np.random.default_rng(1)
    v, V = rng.standard_normal(7), rng.standard_normal((7, 3))
    np.testing.assert_allclose(op.to_numpy(op.matvec(op.asarray(v))), A @ v, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(op.to_numpy(op @ op.asarray(V)), A @ V, rtol=1e-14, atol=1e-14)
    assert op.num_matvecs == 4
    np.testing.assert_allclose(op.to_numpy(op.to_dense()), A, rtol=0, atol=1e-14)
    np.testing.assert_allclose(op.to_numpy(op.exact_diagonal()), np.diag(A), rtol=0, atol=0)
    assert op.exact_trace() == pytest.approx(np.trace(A), rel=1e-14)


def test_subclass_implementing_only_matvec_gets_matmat():
    A = _sym(5)
    op = MatvecOnly(A)
    V = np.random.default_rng(0).standard_normal((5, 4))
    np.testing.assert_allclose(op.matmat(V), A @ V, rtol=1e-14)
    assert op.calls == 4 and op.num_matvecs == 4


def test_subclass_implementing_only_matmat_gets_matvec_and_chunks():
    A = _sym(6)
    op = MatmatOnly(A, chunk_size=3)
    V = np.random.default_rng(0).standard_normal((6, 8))
    np.testing.assert_allclose(op.matmat(V), A @ V, rtol=1e-14)
    assert op.widths == [3, 3, 2]  # never more than chunk_size columns in one call
    v = V[:, 0]
    np.testing.assert_allclose(op.matvec(v), A @ v, rtol=1e-14)
    assert op.widths[-1] == 1
    assert op.num_matvecs == 9
    op.reset_counter()
    assert op.num_matvecs == 0


def test_subclass_must_implement_a_product():
    class Nothing(Operator):
        pass

    with pytest.raises(TypeError, match="_matvec or _matmat"):
        Nothing((3, 3), np.float64)


def test_wrong_shape_dtype_and_framework_are_clear_errors():
    op = DenseOperator(_sym(4))
    with pytest.raises(OperatorError, match=r"shape \(n,\) with n=4, got shape \(5,\)"):
        op.matvec(np.ones(5))
    with pytest.raises(OperatorError, match=r"shape \(n, k\) with n=4"):
        op.matmat(np.ones((3, 2)))
    with pytest.raises(OperatorError, match="dtype mismatch: the operator is float64, the vector is float32"):
        op.matvec(np.ones(4, dtype=np.float32))
    with pytest.raises(OperatorError, match="1-D or 2-D"):
        op @ np.ones((4, 1, 1))
    torch = pytest.importorskip("torch")
    with pytest.raises(OperatorError, match="works on numpy arrays, got a torch array"):
        op.matvec(torch.ones(4, dtype=torch.float64))


def test_device_mismatch_is_a_clear_error():
    torch = pytest.importorskip("torch")
    op = DenseOperator(torch.eye(3, dtype=torch.float64))
    with pytest.raises(OperatorError, match="device mismatch"):
        op.matvec(torch.ones(3, dtype=torch.float64, device="meta"))


def test_non_square_and_bad_chunk_size():
    with pytest.raises(OperatorError, match="square"):
        DenseOperator(np.ones((3, 4)))
    with pytest.raises(OperatorError, match="chunk_size must be a positive int"):
        DenseOperator(np.eye(3), chunk_size=0)


def test_nan_from_the_operator_is_reported():
    A = np.eye(3)
    A[1, 1] = np.nan
    op = DenseOperator(A)
    with pytest.raises(OperatorError, match="NaN or Inf"):
        op.matvec(np.ones(3))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_one_non_finite_entry_among_large_ones_is_reported(bad):
    # the check sums the output first: an Inf beside a -Inf sums to NaN, a NaN to NaN
    A = np.diag([1e300, -1e300, 1.0, 2.0])
    A[2, 2] = bad
    with pytest.raises(OperatorError, match="NaN or Inf"):
        DenseOperator(A).matvec(np.ones(4))


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_finite_output_whose_sum_overflows_is_accepted(framework):
    # finite entries whose sum overflows: the output is finite and is returned as it is
    big = np.finfo(np.float32).max
    A = np.diag([big, big, big]).astype(np.float32)
    if framework == "torch":
        torch = pytest.importorskip("torch")
        A = torch.from_numpy(A)
    op = DenseOperator(A)
    y = op.matvec(op.asarray(np.ones(3, dtype=np.float32)))
    assert np.all(np.asarray(y) == big)


def test_to_dense_refuses_large_n():
    op = MatvecOnly(np.eye(10))
    with pytest.raises(OperatorError, match="refuses n=10 > max_size=5"):
        op.to_dense(max_size=5)
    assert op.num_matvecs == 0  # refused before any product


def test_to_scipy_works_with_eigsh_and_cg():
    rng = np.random.default_rng(3)
    lam = np.linspace(1.0, 50.0, 60)
    Q, _ = np.linalg.qr(rng.standard_normal((60, 60)))
    A = (Q * lam) @ Q.T
    op = DenseOperator(A)
    vals = sla.eigsh(op.to_scipy(), k=3, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(vals), lam[-3:], rtol=1e-10)
    b = rng.standard_normal(60)
    x, info = sla.cg(op.to_scipy(), b, rtol=1e-12, maxiter=500)
    assert info == 0
    np.testing.assert_allclose(A @ x, b, rtol=1e-9, atol=1e-9)


def test_to_scipy_on_torch_operator():
    torch = pytest.importorskip("torch")
    A = _sym(8)
    op = DenseOperator(torch.tensor(A))
    lin = op.to_scipy()
    v = np.arange(8.0)
    np.testing.assert_allclose(lin @ v, A @ v, rtol=1e-14)


def test_exact_diagonal_unavailable_by_default():
    op = MatvecOnly(np.eye(3))
    with pytest.raises(dualhess.ExactUnavailableError, match="no exact diagonal"):
        op.exact_diagonal()


def test_param_layout_split_join_select():
    layout = ParamLayout.from_shapes([("w", (2, 3)), ("b", (2,)), ("c", (1, 1))])
    assert layout.size == 9 and layout.names == ["w", "b", "c"]
    flat = np.arange(9.0)
    parts = layout.split(flat)
    np.testing.assert_array_equal(parts["w"], np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(layout.join(parts), flat)
    assert [e.name for e in layout.select(lambda n: n != "w")] == ["b", "c"]
    with pytest.raises(KeyError, match="unknown parameters"):
        layout.select(["nope"])
    with pytest.raises(ValueError, match="length 9"):
        layout.split(np.arange(8.0))


def test_join_releasing_equals_join_and_lets_go_of_the_blocks():
    layout = ParamLayout.from_shapes([("w", (2, 3)), ("b", (2,)), ("c", ())])
    flat = np.arange(9.0)
    parts = layout.split(flat)
    blocks = [parts[name].copy() for name in layout.names]
    out = layout.join_releasing(blocks)
    np.testing.assert_array_equal(out, layout.join(parts))
    assert blocks == []  # every block released as it was copied
    with pytest.raises(ValueError, match="expected 3 blocks"):
        layout.join_releasing([parts["w"]])
