"""The PyHessian drop-in against real PyHessian 0.1 and against the dense float64 Hessian.

PyHessian's README example (``hessian(model, criterion, data=..., cuda=...)`` then
``eigenvalues``, ``trace``, ``density``) is run both ways on a small float64 MLP. The PyHessian
0.1 bugs the drop-in fixes are demonstrated on the real package (``.grad`` accumulation
doubling the Hessian, the early stop of ``trace`` on a negative trace, ``torch.eig`` in
``density``, largest-|lambda| selection, ``cuda=True`` without CUDA).
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pyhessian = pytest.importorskip("pyhessian")

from dualhess._trace import _draw_probes  # noqa: E402
from torch_backend.examples import load_digits, make_mlp, train  # noqa: E402
from torch_backend.pyhessian import hessian  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore:Using backward")]

CRITERION = torch.nn.CrossEntropyLoss()


def negated_cross_entropy(outputs, targets):
    """A loss with a negative (semi-)definite Hessian: -H of the cross-entropy."""
    return -torch.nn.functional.cross_entropy(outputs, targets)


@functools.cache
def problem():
    X, y = load_digits(torch.float64, n=96, flat=True)
    model = train(make_mlp(hidden=4, seed=0), (X, y), steps=20, seed=0)
    return model, X, y


@functools.cache
def dense(negate: bool = False) -> np.ndarray:
    model, X, y = problem()
    loss = negated_cross_entropy if negate else CRITERION
    comp = hessian(model, loss, data=(X, y), cuda=False, method="func")
    H = comp.operator.to_dense().numpy()
    return 0.5 * (H + H.T)


def real_pyhessian(model, criterion, X, y):
    """PyHessian 0.1 as its README uses it (gradients cleared first, see the doubling bug)."""
    model.zero_grad(set_to_none=True)
    comp = pyhessian.hessian(model, criterion, data=(X, y), cuda=False)
    return comp


# ---------------------------------------------------------------------- README example
def test_readme_eigenvalues_both_ways():
    model, X, y = problem()
    H = dense()
    exact = np.linalg.eigvalsh(H)[::-1]
    norm = float(np.abs(exact).max())

    ours = hessian(model, CRITERION, data=(X, y), cuda=False, seed=0)
    values, vectors = ours.eigenvalues(top_n=2)  # maxIter=100, tol=1e-3
    assert len(values) == 2 and values[0] >= values[1]
    # eigsh: ||H v - theta v|| <= tol * ||H||, hence |theta - lambda| <= tol * ||H||.
    np.testing.assert_allclose(values, exact[:2], rtol=0, atol=1e-3 * norm)
    # Eigenvectors: lists of tensors shaped like the parameters, unit norm jointly.
    shapes = [tuple(p.shape) for p in model.parameters()]
    for vec, value in zip(vectors, values):
        assert [tuple(t.shape) for t in vec] == shapes
        flat = torch.cat([t.reshape(-1) for t in vec]).numpy()
        assert np.linalg.norm(flat) == pytest.approx(1.0, abs=1e-12)
        residual = np.linalg.norm(H @ flat - value * flat)
        assert residual <= 1e-3 * norm

    torch.manual_seed(0)
    theirs, _ = real_pyhessian(model, CRITERION, X, y).eigenvalues(top_n=1)  # tol=1e-3
    # PyHessian stops power iteration when the Rayleigh quotient changes by less than
    # tol relative. Its error then shrinks by r = (lambda_2 / lambda_1)^2 per step, so the
    # remaining error is at most tol * |lambda| * r / (1 - r) (plus its 1e-6 normalisation
    # fudge). Ours is exact to 1e-3 * ||H|| (above), so the two agree within that sum.
    r = (exact[1] / exact[0]) ** 2
    bound = 1e-3 * abs(theirs[0]) * r / (1 - r) + 1e-5 * norm + 1e-3 * norm
    assert abs(theirs[0] - values[0]) <= bound


def test_readme_trace_both_ways():
    model, X, y = problem()
    H = dense()
    exact = float(np.trace(H))
    # Exact standard deviation of one Rademacher Hutchinson sample.
    sigma = math.sqrt(2 * (np.sum(H**2) - np.sum(np.diag(H) ** 2)))

    ours = hessian(model, CRITERION, data=(X, y), cuda=False, method="autograd", seed=1).trace()
    torch.manual_seed(1)
    theirs = real_pyhessian(model, CRITERION, X, y).trace()
    for samples in (ours, theirs):
        assert isinstance(samples, list) and all(isinstance(s, float) for s in samples)
        assert abs(np.mean(samples) - exact) <= 4 * sigma / math.sqrt(len(samples))
    # Both are Hutchinson samples of the same matrix: same mean and spread.
    pooled = math.sqrt(np.var(ours, ddof=1) / len(ours) + np.var(theirs, ddof=1) / len(theirs))
    assert abs(np.mean(ours) - np.mean(theirs)) <= 4 * pooled

    # Our samples are exactly z^T H z for the probes drawn from the seed ...
    rng = np.random.default_rng(1)
    Z = np.concatenate(
        [_draw_probes(rng, H.shape[0], 10) for _ in range(math.ceil(len(ours) / 10))], axis=1
    )[:, : len(ours)]
    np.testing.assert_allclose(ours, np.einsum("ij,ik,kj->j", Z, H, Z), rtol=1e-10, atol=1e-10)
    # ... and sampling stopped at the first sample meeting the (fixed) relative-change rule.
    means = np.cumsum(ours) / np.arange(1, len(ours) + 1)
    previous = np.concatenate([[0.0], means[:-1]])
    stop = np.abs(means - previous) / (np.abs(previous) + 1e-6) < 1e-3
    assert not stop[:-1].any() and (stop[-1] or len(ours) == 100)


def test_readme_density_both_ways():
    model, X, y = problem()
    H = dense()
    n = H.shape[0]
    ours = hessian(model, CRITERION, data=(X, y), cuda=False, method="autograd", seed=2)
    eigen_list, weight_list = ours.density(iter=30, n_v=2)
    assert len(eigen_list) == len(weight_list) == 2
    assert all(len(row) == 30 for row in eigen_list + weight_list)
    # Gauss quadrature of each Rademacher probe z: sum_j w_j theta_j^p = z^T H^p z / n,
    # exactly for p < 2 * iter.
    Z = _draw_probes(np.random.default_rng(2), n, 2, "rademacher")
    for probe, (nodes, weights) in enumerate(zip(eigen_list, weight_list)):
        nodes, weights, z = np.array(nodes), np.array(weights), Z[:, probe]
        assert weights.sum() == pytest.approx(1.0, abs=1e-12)
        for power in (1, 2, 3):
            moment = z @ np.linalg.matrix_power(H, power) @ z / n
            scale = np.abs(np.linalg.eigvalsh(H)).max() ** power
            assert abs(weights @ nodes**power - moment) <= 1e-10 * scale

    # PyHessian 0.1's density calls torch.eig, which torch 2.x removed.
    torch.manual_seed(2)
    with pytest.raises((AttributeError, RuntimeError), match="eig"):
        real_pyhessian(model, CRITERION, X, y).density(iter=5, n_v=1)


def test_dataloader_matches_single_batch():
    model, X, y = problem()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=40)
    comp = hessian(model, CRITERION, dataloader=loader, cuda=False, method="autograd", seed=0)
    v = [torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
         for i, p in enumerate(model.parameters())]
    quad, hv = comp.dataloader_hv_product(v)
    flat = torch.cat([t.reshape(-1) for t in v]).numpy()
    expected = dense() @ flat
    np.testing.assert_allclose(torch.cat([t.reshape(-1) for t in hv]).numpy(), expected,
                               rtol=1e-10, atol=1e-12)
    assert quad == pytest.approx(flat @ expected, rel=1e-10)


# ---------------------------------------------------------------------- PyHessian's bugs
def test_building_twice_does_not_double_the_hessian():
    model, X, y = problem()
    top = np.linalg.eigvalsh(dense())[-1]
    # PyHessian: loss.backward(create_graph=True) accumulates into .grad, so the second
    # object differentiates g + g and its products are 2 H v.
    from pyhessian.utils import hessian_vector_product

    model.zero_grad(set_to_none=True)
    pyhessian.hessian(model, CRITERION, data=(X, y), cuda=False)
    doubled = pyhessian.hessian(model, CRITERION, data=(X, y), cuda=False)
    v = [torch.ones_like(p) for p in doubled.params]
    hv = hessian_vector_product(doubled.gradsH, doubled.params, v)
    flat = torch.cat([t.reshape(-1) for t in hv]).detach().numpy()
    np.testing.assert_allclose(flat, 2 * dense() @ np.ones(len(flat)), rtol=1e-10, atol=1e-12)
    model.zero_grad(set_to_none=True)
    # Ours never touches .grad, even with stale gradients around.
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    first = hessian(model, CRITERION, data=(X, y), cuda=False, seed=0, method="autograd")
    second = hessian(model, CRITERION, data=(X, y), cuda=False, seed=0, method="autograd")
    for comp in (first, second):
        (value,), _ = comp.eigenvalues(tol=1e-10)
        assert value == pytest.approx(top, rel=1e-9)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_trace_does_not_stop_on_a_negative_trace():
    model, X, y = problem()
    H = dense(negate=True)
    exact = float(np.trace(H))
    assert exact < 0
    torch.manual_seed(3)
    theirs = real_pyhessian(model, negated_cross_entropy, X, y).trace()
    # PyHessian divides the change of the mean by the *signed* previous mean: negative, so
    # the test "< tol" passes at once and it returns after two samples.
    assert len(theirs) == 2
    ours = hessian(
        model, negated_cross_entropy, data=(X, y), cuda=False, method="autograd", seed=3
    ).trace()
    assert len(ours) > 2
    sigma = math.sqrt(2 * (np.sum(H**2) - np.sum(np.diag(H) ** 2)))
    assert abs(np.mean(ours) - exact) <= 4 * sigma / math.sqrt(len(ours))


def test_eigenvalue_selection():
    model, X, y = problem()
    exact = np.linalg.eigvalsh(dense(negate=True))  # ascending; most of the mass negative
    assert abs(exact[0]) > abs(exact[-1])
    norm = float(np.abs(exact).max())
    comp = hessian(model, negated_cross_entropy, data=(X, y), cuda=False, method="autograd", seed=0)
    algebraic, _ = comp.eigenvalues(top_n=2, tol=1e-8)
    np.testing.assert_allclose(algebraic, exact[::-1][:2], rtol=0, atol=1e-8 * norm)
    magnitude, _ = comp.eigenvalues(top_n=2, tol=1e-8, selection="magnitude")
    by_size = exact[np.argsort(-np.abs(exact))][:2]
    np.testing.assert_allclose(magnitude, by_size, rtol=0, atol=1e-8 * norm)
    # PyHessian returns the largest |lambda| (here the most negative one) ...
    # Power iteration stopped at a relative change tol is within tol |lambda| r / (1 - r)
    # of lambda, r = (second largest |lambda| / largest |lambda|)^2 (see the README test).
    r = (by_size[1] / by_size[0]) ** 2
    bound = 1e-3 * abs(exact[0]) * r / (1 - r) + 1e-5 * norm
    torch.manual_seed(0)
    theirs, _ = real_pyhessian(model, negated_cross_entropy, X, y).eigenvalues()
    assert abs(theirs[0] - exact[0]) <= bound
    # ... and selection="pyhessian" reproduces that with dualhess's power iteration.
    pytest.importorskip("dualhess._power")
    (value,), _ = comp.eigenvalues(selection="pyhessian")
    assert abs(value - exact[0]) <= bound


def test_cuda_without_cuda_falls_back_with_a_warning():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    model, X, y = problem()
    with pytest.warns(RuntimeWarning, match="CUDA is not available"):
        comp = hessian(model, CRITERION, data=(X, y))
    assert comp.device == "cpu" and comp.operator.device.type == "cpu"
    # PyHessian 0.1 crashes moving the data to CUDA.
    with warnings.catch_warnings(), pytest.raises((AssertionError, RuntimeError)):
        warnings.simplefilter("ignore")
        pyhessian.hessian(model, CRITERION, data=(X, y), cuda=True)


def test_bad_input():
    model, X, y = problem()
    with pytest.raises(ValueError, match="exactly one of"):
        hessian(model, CRITERION, cuda=False)
    with pytest.raises(ValueError, match="exactly one of"):
        hessian(model, CRITERION, data=(X, y), dataloader=[(X, y)], cuda=False)
    comp = hessian(model, CRITERION, data=(X, y), cuda=False, method="autograd")
    with pytest.raises(ValueError, match="selection"):
        comp.eigenvalues(selection="largest")
    with pytest.raises(ValueError, match="top_n"):
        comp.eigenvalues(top_n=0)
    with pytest.raises(ValueError, match="maxIter"):
        comp.trace(maxIter=0)
