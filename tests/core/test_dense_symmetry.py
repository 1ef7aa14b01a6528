"""DenseOperator refuses non-symmetric matrices (issue 13, point 4) and keeps rounding-level ones."""

from __future__ import annotations

import numpy as np
import pytest

import dualhess


def _symmetric(n=6, seed=0):
    A = np.random.default_rng(seed).standard_normal((n, n))
    return A + A.T


@pytest.mark.errors_table
def test_non_symmetric_dense_matrix_is_refused():
    """np.triu(A) + 1 was accepted, and every algorithm silently assumed symmetry."""
    A = np.random.default_rng(0).standard_normal((5, 5))
    with pytest.raises(dualhess.OperatorError, match=r"not symmetric .*\(A \+ A\.T\) / 2"):
        dualhess.DenseOperator(np.triu(A) + 1)


@pytest.mark.parametrize("scale", [1e-200, 1.0, 1e200])
def test_symmetry_check_is_scale_free(scale):
    S = _symmetric() * scale
    dualhess.DenseOperator(S)
    B = S.copy()
    B[0, 1] += 1e-6 * np.abs(S).max()  # far above rounding, at any scale
    with pytest.raises(dualhess.OperatorError, match="not symmetric"):
        dualhess.DenseOperator(B)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_rounding_level_asymmetry_is_accepted(dtype):
    """A Hessian assembled by products is symmetric only to rounding: that is accepted."""
    S = _symmetric(40).astype(dtype)
    eps = np.finfo(dtype).eps
    noise = np.triu(np.random.default_rng(1).standard_normal(S.shape), 1)
    B = (S + (4 * eps * np.abs(S).max() * noise).astype(dtype)).astype(dtype)
    assert np.linalg.norm(B - B.T) > 0
    op = dualhess.DenseOperator(B)
    assert op.n == 40
    # ... but 1e4 times more is refused, and the message gives the numbers
    with pytest.raises(dualhess.OperatorError, match=r"n=40 in " + np.dtype(dtype).name):
        dualhess.DenseOperator(S + (4e4 * eps * np.abs(S).max() * noise).astype(dtype))


def test_torch_and_jax_matrices_are_checked_too():
    A = np.triu(np.ones((4, 4)))
    torch = pytest.importorskip("torch")
    with pytest.raises(dualhess.OperatorError, match="not symmetric"):
        dualhess.DenseOperator(torch.tensor(A))
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(dualhess.OperatorError, match="not symmetric"):
        dualhess.DenseOperator(jnp.asarray(A))


def test_check_symmetric_false_skips_the_check():
    A = np.triu(np.ones((3, 3)))
    assert dualhess.DenseOperator(A, check_symmetric=False).n == 3
