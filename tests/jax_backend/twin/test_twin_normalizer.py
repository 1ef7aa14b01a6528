"""The JAX twin weights batches with the torch loss's own normaliser (kept labels of an
``ignore_index``, class-weight sums), so both frameworks differentiate the same
whole-data-set loss (issue 23): over several batches the two agree to float64 rounding and
equal the single-batch dense Hessian."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")

import dualhess  # noqa: E402
from dualhess._analysis import AnalysisSettings, analyze  # noqa: E402

pytestmark = pytest.mark.both
errors_table = pytest.mark.errors_table


def _problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double().eval()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(20, 4, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (20,), generator=g)
    y[[5, 6, 7, 13, 16, 17, 18, 19]] = -100
    batches = [(X[i : i + 5], y[i : i + 5]) for i in range(0, 20, 5)]
    return model, X, y, batches


LOSSES = {
    "ignore_index": lambda: torch.nn.CrossEntropyLoss(),
    "class_weights_and_ignore": lambda: torch.nn.CrossEntropyLoss(
        weight=torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    ),
}


def _dense_eigenvalues(model, loss_fn, X, y):
    """Eigenvalues (ascending) of the dense Hessian of the one-batch loss (double backward)."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def loss(v):
        parts = [t.reshape(s) for t, s in zip(torch.split(v, [s.numel() for s in shapes]), shapes)]
        return loss_fn(torch.func.functional_call(model, dict(zip(names, parts)), (X,)), y)

    return np.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat).numpy())


@errors_table
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_twin_follows_the_torch_loss_normaliser(name):
    model, X, y, batches = _problem()
    loss_fn = LOSSES[name]()
    report = dualhess.crosscheck_model(model, loss_fn, batches, k=2, num_probes=4)
    print(f"{name}: twin vs torch over 4 batches: HVP rel diff {report.max_rel_diff:.2e}")
    assert report.passed, str(report)
    assert report.max_rel_diff <= 1e-12
    # and both are the Hessian of the whole data set's loss (one batch, dense float64)
    top = _dense_eigenvalues(model, loss_fn, X, y)[-2:][::-1]
    for values in (report.eig_a, report.eig_b):
        assert np.max(np.abs(np.asarray(values)[:2] - top)) <= 1e-10 * abs(top[0])


def test_analyze_jax_side_alone_follows_the_normaliser():
    """--framework jax on a torch model: only the twin runs, and its top eigenvalue is the
    whole data set's (it was the sample-weighted one, silently)."""
    model, X, y, batches = _problem()
    loss_fn = torch.nn.CrossEntropyLoss()
    out = analyze(model, loss_fn, batches, AnalysisSettings(framework="jax", top_k=1,
                  trace_matvecs=8, density_probes=1, density_steps=5))
    top = _dense_eigenvalues(model, loss_fn, X, y)[-1]
    got = out["results"]["jax"]["summary"]["lambda_max"]
    assert abs(got - top) <= 1e-9 * abs(top)
