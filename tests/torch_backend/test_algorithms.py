"""The core algorithms on a torch Hessian operator agree with numpy on the dense matrix."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch_refs import reference, trained  # noqa: E402

import dualhess  # noqa: E402
import torch_backend as tb  # noqa: E402

CE = torch.nn.CrossEntropyLoss()


@pytest.fixture(scope="module")
def problem():
    model, X, y = trained("residual")
    op = tb.hessian(model, CE, [(X[:60], y[:60]), (X[60:], y[60:])], method="func")
    return op, reference("residual").numpy()


@pytest.mark.parametrize("block_size", [1, 4])
def test_eigsh(problem, block_size):
    eigsh = pytest.importorskip("dualhess._eigsh").eigsh
    op, H = problem
    exact = np.linalg.eigvalsh(H)
    scale = np.abs(exact).max()
    top = eigsh(op, k=3, which="LA", tol=1e-10, seed=0, block_size=block_size)
    assert np.all(top.converged)
    np.testing.assert_allclose(
        np.sort(top.values)[::-1], exact[::-1][:3], rtol=0, atol=1e-8 * scale
    )
    low = eigsh(op, k=2, which="SA", tol=1e-10, seed=1, block_size=block_size)
    np.testing.assert_allclose(np.sort(low.values), exact[:2], rtol=0, atol=1e-8 * scale)


def test_trace_and_density_match_numpy(problem):
    trace = pytest.importorskip("dualhess._trace").trace
    density = pytest.importorskip("dualhess._density").density
    op, H = problem
    dense = dualhess.DenseOperator(H)
    for method in ("hutchinson", "xtrace"):
        a = trace(op, method=method, num_matvecs=60, seed=0)
        b = trace(dense, method=method, num_matvecs=60, seed=0)
        assert abs(float(a.value) - float(b.value)) <= 1e-9 * np.abs(np.diag(H)).sum()
    a = density(op, num_probes=3, num_steps=30, seed=0)
    b = density(dense, num_probes=3, num_steps=30, seed=0)
    np.testing.assert_allclose(a.nodes, b.nodes, rtol=0, atol=1e-8 * np.abs(H).max())
    np.testing.assert_allclose(a.values, b.values, rtol=1e-6, atol=1e-8 * np.max(b.values))
