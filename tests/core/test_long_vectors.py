"""Float32 vectors of millions of entries: norms and Krylov coefficients stay accurate.

torch's ``vector_norm`` on the CPU accumulates float32 in one running sum: on 4e6 entries it
is off by ~1e-3 (GPT-2 small, 1.2e8 entries: up to 6e-2), so ``eigsh`` computed a wrong
``beta``, saw ``v_i^T A v_j != beta`` (2e-3 relative) in an exactly symmetric float32
operator and refused it. Norms now go through a summed (pairwise) reduction.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import dualhess  # noqa: E402
from dualhess._array import safe_vector_norm  # noqa: E402

N = 4_000_000


def _long_vector():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(N, generator=gen) * 1e-2
    w[:100] += torch.randn(100, generator=gen) * 8  # mass in a few entries, like H v
    return w


def test_norm_of_a_long_float32_vector_is_accurate():
    import array_api_compat

    w = _long_vector()
    exact = float(torch.linalg.vector_norm(w.double()))
    got = float(safe_vector_norm(w, array_api_compat.array_namespace(w)))
    plain = float(torch.linalg.vector_norm(w))
    print(f"relative error: safe_vector_norm {got / exact - 1:.1e}, "
          f"torch.linalg.vector_norm {plain / exact - 1:.1e}")
    assert abs(got / exact - 1) <= 1e-6


class Diagonal(dualhess.Operator):
    """diag(d) in float32 torch: exactly symmetric, products exact to rounding."""

    def __init__(self, d):
        super().__init__((d.shape[0], d.shape[0]), d.dtype, like=d)
        self.d = d

    def _matvec(self, v):
        return self.d * v


def test_eigsh_on_a_long_float32_operator_is_not_refused():
    d = _long_vector().abs()
    d[7] = 100.0
    d[11] = 60.0
    op = Diagonal(d)
    result = dualhess.eigsh(op, k=1, tol=1e-4, seed=0, return_vectors=False)
    assert result.converged[0]
    assert float(result.values[0]) == pytest.approx(100.0, rel=1e-4)


def test_random_vectors_of_float32_operators_are_drawn_in_chunks_with_the_same_numbers():
    """eigsh's random directions: for float32 the stream is drawn chunk by chunk into a float32
    array (no float64 copy of the whole vector), and the numbers are those of one draw."""
    from dualhess._array import _DRAW_CHUNK, normal_vector

    n = 2 * _DRAW_CHUNK + 7
    seen = []
    chunked = normal_vector(np.random.default_rng(3), n, np.float32,
                            lambda a: seen.append(a.dtype) or a)
    once = np.random.default_rng(3).standard_normal(n).astype(np.float32)
    assert seen == [np.float32]
    np.testing.assert_array_equal(chunked, once)
    wide = normal_vector(np.random.default_rng(3), n, np.float64, lambda a: a)
    np.testing.assert_array_equal(wide, np.random.default_rng(3).standard_normal(n))
