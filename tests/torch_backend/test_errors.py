"""Bad input gives clear errors, never a silent NaN or a wrong operator.

Tests marked ``errors_table`` are the rows of ``docs/errors.md`` (one bad input each);
``tests/docs/test_errors_table.py`` keeps the table and these tests one to one.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch_refs import assert_clean, digits, trained  # noqa: E402

import dualhess  # noqa: E402
import torch_backend as tb  # noqa: E402

CE = torch.nn.CrossEntropyLoss()
errors_table = pytest.mark.errors_table


def small():
    model, X, y = trained("mlp")
    return model, X[:32], y[:32]


def tiny():
    """A 3 -> 4 -> 5 float64 MLP (41 parameters) and 8 samples of 5 classes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 5)
    ).double()
    X = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, X, torch.arange(8) % 5


@errors_table
def test_nan_in_data():
    model, X, y = small()
    X = X.clone()
    X[3, 5] = float("nan")
    with pytest.raises(ValueError, match="the loss is nan on the data"):
        tb.hessian(model, CE, (X, y), method="func")


@errors_table
def test_nan_in_parameters():
    model, X, y = tiny()
    with torch.no_grad():
        model[0].weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"parameters contain NaN or Inf: \['0.weight'\]"):
        tb.hessian(model, CE, (X, y))


@errors_table
def test_inf_in_parameters_with_a_finite_loss():
    """tanh saturates an infinite weight: the loss is finite, the products are not."""
    model, X, y = tiny()
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"parameters contain NaN or Inf: \['0.weight'\]"):
        tb.hessian(model, CE, (X, y))


@errors_table
def test_nan_loss_from_the_loss_function():
    model, X, y = tiny()
    with pytest.raises(ValueError, match="the loss is nan on the data"):
        tb.hessian(model, lambda o, t: torch.log(CE(o, t) - 1e9), (X, y))


@errors_table
def test_loss_module_with_reduction_none():
    model, X, y = small()
    with pytest.raises(ValueError, match="use reduction='mean' or reduction='sum'"):
        tb.hessian(model, torch.nn.CrossEntropyLoss(reduction="none"), (X, y))


@errors_table
def test_loss_function_returning_per_sample_values():
    model, X, y = small()
    with pytest.raises(ValueError, match="loss_fn must return a scalar tensor"):
        tb.hessian(model, lambda o, t: (o - 1.0) ** 2, (X, y))


@errors_table
def test_empty_data():
    from torch.utils.data import DataLoader, TensorDataset

    model, X, y = small()
    with pytest.raises(ValueError, match="the data are empty"):
        tb.hessian(model, CE, DataLoader(TensorDataset(X[:0], y[:0]), batch_size=8))
    with pytest.raises(ValueError, match="the data are empty"):
        tb.hessian(model, CE, [])


@errors_table
def test_shuffled_dataloader():
    from torch.utils.data import DataLoader, TensorDataset

    model, X, y = small()
    with pytest.raises(ValueError, match="the DataLoader was built with shuffle=True"):
        tb.hessian(model, CE, DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True))


@errors_table
def test_iterable_that_reshuffles_on_every_pass():
    model, X, y = small()

    class Reshuffling:  # an iterable that reorders the samples on every pass
        def __init__(self):
            self.gen = torch.Generator().manual_seed(0)

        def __iter__(self):
            perm = torch.randperm(X.shape[0], generator=self.gen)
            return iter([(X[perm[i : i + 8]], y[perm[i : i + 8]]) for i in range(0, 32, 8)])

    with pytest.raises(ValueError, match="the data differ between two passes"):
        tb.hessian(model, CE, Reshuffling(), method="func")


@errors_table
def test_one_shot_iterator():
    model, X, y = small()
    gen = ((X[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8))
    with pytest.raises(TypeError, match="data is a one-shot iterator"):
        tb.hessian(model, CE, gen, method="func")


@errors_table
def test_dropout_in_train_mode():
    X, y = digits(True)
    model = torch.nn.Sequential(torch.nn.Linear(64, 10), torch.nn.Dropout(0.5)).double()
    with pytest.raises(ValueError, match=r"Dropout.*model.eval\(\)"):
        tb.hessian(model, CE, (X, y))
    assert model.training  # the user's mode is left alone


@errors_table
def test_batchnorm_in_train_mode():
    bn, Xi, yi = trained("bn_cnn")
    bn.train()
    try:
        with pytest.raises(ValueError, match=r"BatchNorm.*model.eval\(\)"):
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


@errors_table
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


@errors_table
def test_dtype_mismatch_between_model_and_data():
    model, X, y = small()
    with pytest.raises(ValueError, match="dtype mismatch: the model is torch.float64"):
        tb.hessian(model, CE, (X.float(), y))


@errors_table
def test_device_mismatch_between_model_and_data():
    model, X, y = small()
    meta_model = torch.nn.Linear(64, 10, device="meta", dtype=torch.float64)
    with pytest.raises(ValueError, match="device mismatch: the model is on meta"):
        tb.hessian(meta_model, CE, (X, y))


@errors_table
def test_inputs_and_targets_of_different_batch_sizes():
    """CrossEntropyLoss said "Expected input batch_size", MSELoss a raw broadcast error."""
    model, X, y = tiny()
    with pytest.raises(ValueError, match="batch 0 pairs inputs of batch size"):
        tb.hessian(model, CE, (X, y[:5]))
    Y = torch.randn(5, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="batch 0 pairs inputs of batch size"):
        tb.hessian(model, torch.nn.MSELoss(), (X, Y))


@errors_table
def test_class_labels_out_of_range():
    """Was torch's raw ``IndexError: Target 7 is out of bounds``."""
    model, X, _ = tiny()
    with pytest.raises(ValueError, match=r"class labels out of range .*lie in \[0, 4\]"):
        tb.hessian(model, CE, (X, torch.full((8,), 7)))
    with pytest.raises(ValueError, match="class labels out of range"):
        tb.ggn(model, CE, [(X[:4], torch.arange(4)), (X[4:], torch.arange(4) - 1)])


@errors_table
def test_unknown_parameter_names():
    model, X, y = small()
    with pytest.raises(KeyError, match="unknown parameters"):
        tb.hessian(model, CE, (X, y), params=["nope"])


@errors_table
def test_parameter_selection_that_selects_nothing():
    model, X, y = small()
    with pytest.raises(ValueError, match="the parameter selection is empty"):
        tb.hessian(model, CE, (X, y), params=lambda name: False)


@errors_table
def test_loss_with_no_gradient():
    """A detached loss gave a zero Hessian (func) or a raw autograd error (autograd)."""
    model, X, y = tiny()
    for method in ("func", "autograd"):
        with pytest.raises(ValueError, match="the loss has no gradient in the selected"):
            tb.hessian(model, lambda o, t: CE(o.detach(), t), (X, y), method=method)
    with pytest.raises(ValueError, match="the loss has no gradient in the selected"):
        tb.ggn(model, lambda o, t: (o.argmax(1) == t).double().mean(), (X, y))


@errors_table
def test_unknown_hvp_method():
    model, X, y = small()
    with pytest.raises(ValueError, match="method must be one of"):
        tb.hessian(model, CE, (X, y), method="magic")


@errors_table
def test_reduction_that_contradicts_the_loss_module():
    model, X, y = small()
    with pytest.raises(ValueError, match="contradicts loss_fn.reduction"):
        tb.hessian(model, CE, (X, y), reduction="sum")


@errors_table
def test_data_that_is_not_batches():
    model, _, _ = small()
    with pytest.raises(TypeError, match="data must be one batch or an iterable of batches"):
        tb.hessian(model, CE, 3)


@errors_table
def test_unknown_fisher_kind():
    model, X, y = small()
    with pytest.raises(ValueError, match="kind must be 'empirical' or 'mc'"):
        tb.fisher(model, CE, (X, y), kind="true")


@errors_table
def test_mc_fisher_of_a_loss_without_a_likelihood():
    model, X, y = small()
    with pytest.raises(ValueError, match="samples labels from the likelihood of the loss"):
        tb.fisher(model, torch.nn.functional.cross_entropy, (X, y), kind="mc")
    assert_clean(model)


@errors_table
def test_backpack_unsupported_layer():
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 5)
    ).double()
    _, X, y = tiny()
    op = tb.hessian(model, CE, (X, y))
    with pytest.raises(
        dualhess.ExactUnavailableError, match=r"unsupported layers \['1 \(LayerNorm\)'\]"
    ):
        op.exact_diagonal()
