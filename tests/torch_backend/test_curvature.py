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


# ---------------------------------------------------------------------- Fisher convention
# l_n = the whole negative log-likelihood of sample n (summed over its D loss elements),
# r = 1/(N D) for reduction="mean", 1 for "sum";  EF = r sum_n g_n g_n^T,
# MC = r sum_n E_y~[g_n(y~) g_n(y~)^T]  (issue 13: BCE/MSE with C > 1 outputs were 1/C of it).
FISHER_LOSSES = {
    "ce": torch.nn.CrossEntropyLoss,
    "nll": torch.nn.NLLLoss,
    "mse": torch.nn.MSELoss,
    "bce": torch.nn.BCEWithLogitsLoss,
}
CLASSES = 3


class _Positions(torch.nn.Module):
    """(N, C * L) -> (N, C, L): a classifier with L outputs (positions) per sample."""

    def __init__(self, width):
        super().__init__()
        self.width = width

    def forward(self, x):
        return x.reshape(x.shape[0], CLASSES, self.width) if self.width > 1 else x


def fisher_problem(loss_name, width, n=8, seed=0):
    """Model, data and D for a loss with ``width`` loss elements per sample (C or L)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    classify = loss_name in ("ce", "nll")
    out = CLASSES * width if classify else width
    layers = [torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, out)]
    if classify:
        layers.append(_Positions(width))
    if loss_name == "nll":
        layers.append(torch.nn.LogSoftmax(dim=1))
    model = torch.nn.Sequential(*layers).double()
    X = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    if classify:
        shape = (n, width) if width > 1 else (n,)
        Y = torch.randint(0, CLASSES, shape, generator=gen)
    elif loss_name == "mse":
        Y = torch.randn(n, width, generator=gen, dtype=torch.float64)
    else:
        Y = (torch.rand(n, width, generator=gen) > 0.5).double()
    return model, X, Y


def sample_nll(loss_name, out, y):
    """l_n written out: the negative log-likelihood of one sample, summed over its elements."""
    if loss_name in ("ce", "nll"):
        logp = torch.log_softmax(out, 0) if loss_name == "ce" else out
        return -logp.reshape(CLASSES, -1).gather(0, y.reshape(1, -1)).sum()
    if loss_name == "mse":
        return ((out - y) ** 2).sum()
    return (F.softplus(out) - y * out).sum()


def reference_grads(model, loss_name, X, Y):
    """(N, n) per-sample gradients of l_n with torch.func.vmap(grad), in layout order."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def ell(p, x, y):
        out = torch.func.functional_call(model, p, (x.unsqueeze(0),))[0]
        return sample_nll(loss_name, out, y)

    grads = torch.func.vmap(torch.func.grad(ell), in_dims=(None, 0, 0))(params, X, Y)
    return torch.cat([grads[k].reshape(X.shape[0], -1) for k in params], dim=1)


def reduction_factor(reduction, n, width, loss_name):
    elements = width  # C outputs (MSE, BCE) or L positions (CE, NLL) per sample
    return 1.0 / (n * elements) if reduction == "mean" else 1.0


FISHER_CASES = [
    (name, reduction, width)
    for name in FISHER_LOSSES
    for reduction in ("mean", "sum")
    for width in (1, 4)
]


@pytest.mark.errors_table
@pytest.mark.parametrize(("loss_name", "reduction", "width"), FISHER_CASES)
def test_empirical_fisher_convention(loss_name, reduction, width):
    model, X, Y = fisher_problem(loss_name, width)
    loss_fn = FISHER_LOSSES[loss_name](reduction=reduction)
    G = reference_grads(model, loss_name, X, Y)
    r = reduction_factor(reduction, X.shape[0], width, loss_name)
    expected = r * G.T @ G
    op = tb.fisher(model, loss_fn, [(X[:5], Y[:5]), (X[5:], Y[5:])], kind="empirical")
    assert op.elements_per_sample == (width if reduction == "mean" else 1)
    assert rel_err(op.to_dense(), expected) <= 1e-12
    assert rel_err(op.exact_diagonal(), torch.diagonal(expected)) <= 1e-12


@pytest.mark.parametrize(("loss_name", "reduction", "width"), FISHER_CASES)
def test_mc_fisher_convention(loss_name, reduction, width):
    model, X, Y = fisher_problem(loss_name, width)
    loss_fn = FISHER_LOSSES[loss_name](reduction=reduction)
    M = 3
    op = tb.fisher(
        model, loss_fn, [(X[:5], Y[:5]), (X[5:], Y[5:])], kind="mc", num_samples=M, seed=3
    )
    draws = torch.cat(op.mc_targets(), dim=1)  # (M, N, ...)
    r = reduction_factor(reduction, X.shape[0], width, loss_name)
    expected = 0
    for m in range(M):
        G = reference_grads(model, loss_name, X, draws[m])
        expected = expected + r * G.T @ G / M
    assert rel_err(op.to_dense(), expected) <= 1e-12
    if loss_name in ("ce", "nll"):
        assert set(draws.unique().tolist()) <= set(range(CLASSES))


@pytest.mark.errors_table
@pytest.mark.parametrize(("loss_name", "reduction", "width"), FISHER_CASES)
def test_mc_fisher_expectation_is_ggn(loss_name, reduction, width):
    """E[F_mc] = GGN for every supported loss: the diagonal within 5 MC standard errors.

    The standard error of each diagonal entry comes from the per-draw values
    ``r sum_n g_nm**2`` (written with vmap(grad) on the operator's own labels). NLLLoss is
    linear in its log-probability inputs: its Fisher is the GGN of CrossEntropyLoss on the
    logits (the same model without the LogSoftmax).
    """
    model, X, Y = fisher_problem(loss_name, width)
    loss_fn = FISHER_LOSSES[loss_name](reduction=reduction)
    M = 2000
    op = tb.fisher(model, loss_fn, (X, Y), kind="mc", num_samples=M, seed=0)
    diag = op.exact_diagonal()
    draws = op.mc_targets()[0]  # (M, N, ...)
    r = reduction_factor(reduction, X.shape[0], width, loss_name)
    N = X.shape[0]
    flat = draws.reshape((M * N, *draws.shape[2:]))
    G = reference_grads(model, loss_name, X.repeat(M, 1), flat).reshape(M, N, -1)
    per_draw = r * (G * G).sum(dim=1)  # (M, n): one Fisher diagonal per draw
    assert rel_err(per_draw.mean(dim=0), diag) <= 1e-10
    standard_error = per_draw.std(dim=0) / M**0.5
    if loss_name == "nll":
        ggn_model = torch.nn.Sequential(*list(model)[:-1])
        ggn_loss = torch.nn.CrossEntropyLoss(reduction=reduction)
    else:
        ggn_model, ggn_loss = model, loss_fn
    ggn_diag = torch.diagonal(tb.ggn(ggn_model, ggn_loss, (X, Y)).to_dense())
    slack = 5 * standard_error + 1e-12 * ggn_diag.abs().max()
    assert bool(((diag - ggn_diag).abs() <= slack).all()), float(
        ((diag - ggn_diag).abs() / standard_error).max()
    )
