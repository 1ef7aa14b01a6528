"""Bad input gives clear errors, never a silent NaN or a wrong operator."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch_refs import assert_clean, digits, trained  # noqa: E402

import torch_backend as tb  # noqa: E402

CE = torch.nn.CrossEntropyLoss()


def small():
    model, X, y = trained("mlp")
    return model, X[:32], y[:32]


def test_nan_loss():
    model, X, y = small()
    X = X.clone()
    X[3, 5] = float("nan")
    with pytest.raises(ValueError, match="the loss is nan"):
        tb.hessian(model, CE, (X, y), method="func")


def test_non_scalar_loss():
    model, X, y = small()
    with pytest.raises(ValueError, match="reduction='mean' or reduction='sum'"):
        tb.hessian(model, torch.nn.CrossEntropyLoss(reduction="none"), (X, y))
    with pytest.raises(ValueError, match="must return a scalar"):
        tb.hessian(model, lambda o, t: (o - 1.0) ** 2, (X, y))


def test_empty_loader():
    from torch.utils.data import DataLoader, TensorDataset

    model, X, y = small()
    with pytest.raises(ValueError, match="empty"):
        tb.hessian(model, CE, DataLoader(TensorDataset(X[:0], y[:0]), batch_size=8))
    with pytest.raises(ValueError, match="empty"):
        tb.hessian(model, CE, [])


def test_shuffled_loader():
    from torch.utils.data import DataLoader, TensorDataset

    model, X, y = small()
    with pytest.raises(ValueError, match="shuffle=True"):
        tb.hessian(model, CE, DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True))

    class Reshuffling:  # an iterable that reorders the samples on every pass
        def __init__(self):
            self.gen = torch.Generator().manual_seed(0)

        def __iter__(self):
            perm = torch.randperm(X.shape[0], generator=self.gen)
            return iter([(X[perm[i : i + 8]], y[perm[i : i + 8]]) for i in range(0, 32, 8)])

    with pytest.raises(ValueError, match="shuffle=True"):
        tb.hessian(model, CE, Reshuffling(), method="func")
    gen = ((X[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8))
    with pytest.raises(TypeError, match="one-shot iterator"):
        tb.hessian(model, CE, gen, method="func")


def test_dropout_and_batchnorm_in_train_mode():
    X, y = digits(True)
    model = torch.nn.Sequential(torch.nn.Linear(64, 10), torch.nn.Dropout(0.5)).double()
    with pytest.raises(ValueError, match=r"Dropout.*model\.eval\(\)"):
        tb.hessian(model, CE, (X, y))
    assert model.training  # the user's mode is left alone
    bn, Xi, yi = trained("bn_cnn")
    bn.train()
    try:
        with pytest.raises(ValueError, match=r"BatchNorm.*model\.eval\(\)"):
            tb.hessian(bn, CE, (Xi, yi))
    finally:
        bn.eval()


def test_determinism_check_names_causes():
    class Noisy(torch.nn.Module):  # randomness that no layer check can see
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 10).double()

        def forward(self, x):
            return self.lin(x * (1 + 0.1 * torch.rand_like(x)))

    X, y = digits(True)
    for method in ("func", "autograd"):
        batches = [(X[:64], y[:64]), (X[64:], y[64:])]
        with pytest.raises(ValueError, match=r"loss differs.*randn_like.*check_deterministic"):
            tb.hessian(Noisy(), CE, batches, method=method)


class _RandomForward(torch.nn.Module):
    """A forward that draws randomness no layer-mode check can see (issue 13, point 5)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.first = torch.nn.Linear(3, 4)
        self.second = torch.nn.Linear(4, 2)

    def forward(self, x):
        if self.kind == "noise":
            x = x + 0.1 * torch.randn_like(x)
        elif self.kind == "dropout":
            x = torch.nn.functional.dropout(x, 0.5, training=True)
        h = torch.tanh(self.first(x))
        if self.kind == "stochastic_depth" and bool(torch.rand(()) < 0.5):
            h = torch.zeros_like(h)  # the residual branch dropped: h + branch(h) -> h
        return self.second(h + torch.tanh(h))


@pytest.mark.parametrize("kind", ["noise", "dropout", "stochastic_depth"])
def test_random_forward_is_refused(kind):
    """The autograd engine reuses one graph, so its products repeated one draw: "auto" and
    "autograd" built, and eigsh returned a number. The loss is now evaluated twice."""
    torch.manual_seed(0)
    X, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    model = _RandomForward(kind).double()
    builders = {
        "auto": lambda **k: tb.hessian(model, CE, (X, y), dtype=torch.float64, **k),
        "autograd": lambda **k: tb.hessian(
            model, CE, (X, y), dtype=torch.float64, method="autograd", **k
        ),
        "ggn": lambda **k: tb.ggn(model, CE, (X, y), dtype=torch.float64, **k),
        "fisher": lambda **k: tb.fisher(model, CE, (X, y), dtype=torch.float64, **k),
    }
    for name, build in builders.items():
        torch.manual_seed(1)  # stochastic depth: both draws kept and dropped in 10 tries
        for _ in range(10):
            try:
                build()
            except ValueError as err:
                assert "loss differs between two evaluations" in str(err), name
                assert "check_deterministic=False" in str(err)
                break
        else:
            raise AssertionError(f"{name}: a random forward was accepted ({kind})")
    op = tb.hessian(model, CE, (X, y), dtype=torch.float64, check_deterministic=False)
    assert op.n == 26  # the check can be skipped


def test_device_and_dtype_mismatch():
    model, X, y = small()
    with pytest.raises(ValueError, match="dtype mismatch"):
        tb.hessian(model, CE, (X.float(), y))
    meta_model = torch.nn.Linear(64, 10, device="meta", dtype=torch.float64)
    with pytest.raises(ValueError, match=r"device mismatch: the model is on meta"):
        tb.hessian(meta_model, CE, (X, y))


def test_bad_arguments():
    model, X, y = small()
    with pytest.raises(ValueError, match="method must be one of"):
        tb.hessian(model, CE, (X, y), method="magic")
    with pytest.raises(KeyError, match="unknown parameters"):
        tb.hessian(model, CE, (X, y), params=["nope"])
    with pytest.raises(ValueError, match="contradicts"):
        tb.hessian(model, CE, (X, y), reduction="sum")
    with pytest.raises(TypeError, match="data must be"):
        tb.hessian(model, CE, 3)
    with pytest.raises(ValueError, match="kind must be"):
        tb.fisher(model, CE, (X, y), kind="true")
    with pytest.raises(ValueError, match="supports"):
        tb.fisher(model, torch.nn.functional.cross_entropy, (X, y), kind="mc")
    assert_clean(model)
