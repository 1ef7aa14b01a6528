"""dualhess.crosscheck on dense operators with known differences."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dualhess import DenseOperator
from dualhess._alignment import Alignment
from dualhess._crosscheck import crosscheck


def _matrix(n: int = 30, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.concatenate([[9.0, 7.0, 5.0, 3.0, 2.0], rng.uniform(-1.0, 1.0, n - 5)])
    return (Q * lam) @ Q.T


BLOCKS = [("layer1.weight", np.arange(0, 12)), ("layer1.bias", np.arange(12, 15)),
          ("layer2.weight", np.arange(15, 27)), ("layer2.bias", np.arange(27, 30))]


def test_identical_operators_pass_with_a_permutation():
    A = _matrix()
    perm = np.random.default_rng(1).permutation(30)
    B = A[np.ix_(perm, perm)]  # the same operator in another flat order
    align = Alignment(perm, BLOCKS)
    report = crosscheck(DenseOperator(A), DenseOperator(B), align=align, k=3)
    assert report.passed, str(report)
    assert report.max_rel_diff <= 1e-14
    assert report.quad_rel_diff <= 1e-14
    np.testing.assert_allclose(report.eig_a, [9.0, 7.0, 5.0], rtol=1e-10)
    np.testing.assert_allclose(report.eig_b, report.eig_a, rtol=1e-10)
    assert report.trace_a == pytest.approx(report.trace_b, rel=1e-12)
    assert report.failing_blocks == []
    assert [b.name for b in report.blocks] == [name for name, _ in BLOCKS]
    json.dumps(report.to_dict())  # JSON-able
    assert "PASSED" in str(report)


def test_wrong_alignment_fails():
    A = _matrix()
    perm = np.random.default_rng(1).permutation(30)
    B = A[np.ix_(perm, perm)]
    report = crosscheck(DenseOperator(A), DenseOperator(B), k=0)  # identity: wrong order
    assert not report.passed
    assert report.max_rel_diff > 1e-2


def test_difference_confined_to_one_block_is_named():
    A = _matrix()
    B = A.copy()
    idx = BLOCKS[2][1]
    B[idx, idx] += 1e-3  # e.g. an L2 penalty on layer2.weight on one side only
    report = crosscheck(DenseOperator(A), DenseOperator(B), align=Alignment.identity(30, BLOCKS), k=2)
    assert not report.passed
    assert report.failing_blocks == ["layer2.weight"]
    assert "disagreeing blocks: layer2.weight" in str(report)


def test_small_perturbation_caught_at_float64_rtol():
    A = _matrix()
    B = A * (1 + 1e-8)
    report = crosscheck(DenseOperator(A), DenseOperator(B), k=0)
    assert not report.passed and report.max_rel_diff == pytest.approx(1e-8, rel=1e-3)
    assert crosscheck(DenseOperator(A), DenseOperator(B), k=0, rtol=1e-7).passed


def test_default_rtol_follows_dtype():
    A = _matrix()
    r64 = crosscheck(DenseOperator(A), DenseOperator(A), k=0)
    r32 = crosscheck(DenseOperator(A.astype(np.float32)), DenseOperator(A), k=0)
    assert r64.rtol == 1e-10 and r32.rtol == 1e-4
    assert r32.passed  # float32 round-off only


def test_bad_input():
    with pytest.raises(ValueError, match="different sizes"):
        crosscheck(DenseOperator(np.eye(3)), DenseOperator(np.eye(4)))
    with pytest.raises(ValueError, match="align is for n=4"):
        crosscheck(DenseOperator(np.eye(3)), DenseOperator(np.eye(3)), align=Alignment.identity(4))
    with pytest.raises(ValueError, match="not a permutation"):
        Alignment([0, 0, 1])
