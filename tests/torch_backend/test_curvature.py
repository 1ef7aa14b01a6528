"""GGN and Fisher operators against their dense definitions (float64)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch_refs import digits, flat_params, rel_err  # noqa: E402

import torch_backend as tb  # noqa: E402

F = torch.nn.functional


def tiny(seed=0, out=10):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 6), torch.nn.Tanh(), torch.nn.Linear(6, out)
    ).double()


def data(loss_name, n=48):
    X, y = digits(True)
    X, y = X[:n], y[:n]
    if loss_name == "mse":
        return X, F.one_hot(y, 10).double()
    if loss_name == "bce":
        return X, (torch.rand(n, 10, generator=torch.Generator().manual_seed(0)) > 0.5).double()
    return X, y


LOSSES = {
    "ce": torch.nn.CrossEntropyLoss,
    "mse": torch.nn.MSELoss,
    "bce": torch.nn.BCEWithLogitsLoss,
}


def outputs_fn(model, X):
    names, theta = flat_params(model)
    named = dict(model.named_parameters())

    def f(t):
        parts, s = {}, 0
        for n in names:
            parts[n] = t[s : s + named[n].numel()].reshape(named[n].shape)
            s += named[n].numel()
        return torch.func.functional_call(model, parts, (X,))

    return f, theta


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ggn_is_jt_hl_j(loss_name, reduction):
    model = tiny()
    X, Y = data(loss_name)
    loss_fn = LOSSES[loss_name](reduction=reduction)
    f, theta = outputs_fn(model, X)
    out = f(theta).detach()
    J = torch.autograd.functional.jacobian(f, theta).reshape(out.numel(), -1)
    HL = torch.autograd.functional.hessian(
        lambda o: loss_fn(o.reshape(out.shape), Y), out.reshape(-1)
    )
    G = J.T @ HL @ J
    op = tb.ggn(model, loss_fn, [(X[:20], Y[:20]), (X[20:], Y[20:])])
    V = torch.randn(op.n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert rel_err(op.matmat(V), G @ V) <= 1e-10
    assert rel_err(op.matvec(V[:, 0]), G @ V[:, 0]) <= 1e-10


def per_sample_grads(model, loss_fn, X, Y):
    """Rows g_i = grad of loss_fn on sample i alone (dense Jacobian of the per-sample losses)."""
    f, theta = outputs_fn(model, X)

    def losses(t):
        out = f(t)
        return torch.stack([loss_fn(out[i : i + 1], Y[i : i + 1]) for i in range(X.shape[0])])

    return torch.autograd.functional.jacobian(losses, theta)


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_empirical_fisher(loss_name):
    model = tiny()
    X, Y = data(loss_name)
    for reduction, scale in (("mean", 1.0 / X.shape[0]), ("sum", 1.0)):
        loss_fn = LOSSES[loss_name](reduction=reduction)
        G = per_sample_grads(model, loss_fn, X, Y)
        Fd = scale * G.T @ G
        op = tb.fisher(model, loss_fn, [(X[:30], Y[:30]), (X[30:], Y[30:])], kind="empirical")
        V = torch.randn(op.n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        assert rel_err(op.matmat(V), Fd @ V) <= 1e-10
        assert rel_err(op.exact_diagonal(), torch.diagonal(Fd)) <= 1e-10


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_mc_fisher_definition(loss_name):
    model = tiny()
    X, Y = data(loss_name)
    loss_fn = LOSSES[loss_name]()
    op = tb.fisher(
        model, loss_fn, [(X[:30], Y[:30]), (X[30:], Y[30:])], kind="mc", num_samples=2, seed=3
    )
    draws = op.mc_targets()
    assert [d.shape[0] for d in draws] == [2, 2]
    Fd = 0
    for m in range(2):
        Ym = torch.cat([draws[0][m], draws[1][m]])
        G = per_sample_grads(model, loss_fn, X, Ym)
        Fd = Fd + G.T @ G / (2 * X.shape[0])
    V = torch.randn(op.n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert rel_err(op.matmat(V), Fd @ V) <= 1e-10
    # fixed operator: the same labels in every product
    assert rel_err(op.matmat(V), Fd @ V) <= 1e-10
    if loss_name == "ce":
        assert set(torch.cat(draws, dim=1).unique().tolist()) <= set(range(10))


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
def test_mc_fisher_expectation_is_ggn(loss_name):
    """E[F_mc] = GGN for these likelihoods; checks the sampling (sigma^2 = D/2 for MSE)."""
    model = tiny(out=10)
    X, Y = data(loss_name, n=16)
    loss_fn = LOSSES[loss_name]()
    M = 3000
    diag_mc = tb.fisher(model, loss_fn, (X, Y), kind="mc", num_samples=M, seed=0).exact_diagonal()
    diag_ggn = torch.diagonal(tb.ggn(model, loss_fn, (X, Y)).to_dense())
    # Monte Carlo error of a mean of M draws: a few times 1/sqrt(M) ~ 0.02 relative
    assert rel_err(diag_mc, diag_ggn) <= 0.1
