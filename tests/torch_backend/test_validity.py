"""What makes a torch operator valid (torch_backend/_validity.py) and the inputs that used to
give a silent wrong number or a raw error from deep inside torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import dualhess
import torch_backend as tb

pytestmark = pytest.mark.torch
errors_table = pytest.mark.errors_table


def _problem(seed=0, n=20):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X = torch.randn(n, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    return model, X, y


CE = nn.CrossEntropyLoss()


# ---------------------------------------------------------------------- broadcasting losses
@errors_table
def test_mse_that_broadcasts_is_refused():
    """(N, 1) outputs against (N,) targets: an (N, N) table of differences (loss 1.79, not 1.72)."""
    model = nn.Linear(3, 1).double()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    with pytest.raises(ValueError, match="the loss broadcasts outputs of shape"):
        tb.hessian(model, nn.MSELoss(), (X, y))


@errors_table
def test_l1_loss_that_broadcasts_is_refused():
    model = nn.Linear(3, 1).double()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    with pytest.raises(ValueError, match="targets.unsqueeze"):
        tb.hessian(model, nn.L1Loss(), (X, y))


def test_mse_with_equal_shapes_is_unchanged():
    model = nn.Linear(3, 1).double()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    op = tb.hessian(model, nn.MSELoss(), (X, y))
    assert abs(op.loss - float(nn.MSELoss()(model(X), y))) <= 1e-14


# ---------------------------------------------------------------------- batch statistics
def _bn_model(track):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=track), nn.Tanh(), nn.Linear(6, 3)
    ).double()
    return model.eval()


@errors_table
def test_batchnorm_without_running_statistics_over_several_batches_is_refused():
    """Eval mode normalises with each batch's statistics: the 'Hessian' depends on the
    batching (lambda_max 1.536 with one batch of 20, 2.947 with four of 5)."""
    _, X, y = _problem()
    batches = [(X[i : i + 5], y[i : i + 5]) for i in range(0, 20, 5)]
    with pytest.raises(ValueError, match=r"without running statistics \(1;"):
        tb.hessian(_bn_model(False), CE, batches)


def test_batchnorm_without_running_statistics_on_one_batch_is_its_function():
    """Over one batch (all the data) the batch statistics are a function of the parameters."""
    _, X, y = _problem()
    op = tb.hessian(_bn_model(False), CE, (X, y))
    assert op.n == 4 * 6 + 6 + 12 + 6 * 3 + 3


def test_batchnorm_with_running_statistics_in_eval_mode_is_accepted():
    _, X, y = _problem()
    batches = [(X[i : i + 5], y[i : i + 5]) for i in range(0, 20, 5)]
    tb.hessian(_bn_model(True), CE, batches)


# ---------------------------------------------------------------------- stale operators
def _dense_at(model, X, y):
    return tb.hessian(model, CE, (X, y), method="autograd").to_dense()


@pytest.mark.parametrize("method", ["auto", "autograd", "func", "pyhessian"])
@errors_table
def test_operator_used_after_the_parameters_changed_is_stale(method):
    """p.data.mul_(2) used to give products of neither the old nor the new Hessian (autograd's
    cached graph), a deep autograd error after an optimizer step, or the new Hessian with the
    old loss (func): one StaleOperatorError for every engine, loss_at and gradient."""
    model, X, y = _problem()
    op = tb.hessian(model, CE, (X, y), method=method)
    v = torch.ones(op.n, dtype=torch.float64)
    op.matvec(v)
    with torch.no_grad():
        model[0].weight.data.mul_(2)
    for call in (lambda: op.matvec(v), lambda: op.matmat(v[:, None]),
                 lambda: op.loss_at(torch.zeros(op.n, dtype=torch.float64)), op.gradient):
        with pytest.raises(dualhess.StaleOperatorError, match="'0.weight' was modified in place"):
            call()


@errors_table
def test_operator_after_an_optimizer_step_is_stale():
    model, X, y = _problem()
    op = tb.hessian(model, CE, (X, y))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    CE(model(X), y).backward()
    opt.step()
    with pytest.raises(dualhess.StaleOperatorError):
        dualhess.eigsh(op, k=1, seed=0)
    fresh = tb.hessian(model, CE, (X, y))
    top = dualhess.eigsh(fresh, k=1, seed=0, tol=1e-10)
    dense = np.linalg.eigvalsh(_dense_at(model, X, y).numpy())[-1]
    assert abs(top.values[0] - dense) <= 1e-10 * abs(dense)


@errors_table
def test_changed_buffers_make_the_operator_stale():
    model = _bn_model(True)
    _, X, y = _problem()
    op = tb.hessian(model, CE, (X, y))
    model[1].running_mean.add_(1.0)
    with pytest.raises(dualhess.StaleOperatorError, match="buffer 1.running_mean"):
        op.matvec(torch.ones(op.n, dtype=torch.float64))


def test_an_operator_of_a_converted_copy_is_not_stale():
    """dtype= analyses a private copy: the user's model changing does not touch it."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    X, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    op = tb.hessian(model, CE, (X, y), dtype=torch.float64)
    before = op.matvec(torch.ones(op.n, dtype=torch.float64))
    model.weight.data.mul_(2)
    assert torch.equal(op.matvec(torch.ones(op.n, dtype=torch.float64)), before)


# ---------------------------------------------------------------------- symmetry
def _weight_norm_model():
    torch.manual_seed(0)
    lin = nn.utils.parametrizations.weight_norm(nn.Linear(4, 5), dim=0)
    return nn.Sequential(lin, nn.Tanh(), nn.Linear(5, 3)).double()


@errors_table
def test_asymmetric_double_backward_of_weight_norm_is_refused():
    """torch's double backward of _weight_norm is wrong on this build: max |H - H^T| was
    9.7e-2 and eigsh(block_size=2) reported converged=True."""
    model = _weight_norm_model()
    _, X, y = _problem()
    H = tb.hessian(model, CE, (X, y), check_symmetric=False, method="autograd").to_dense()
    asym = float((H - H.T).abs().max())
    print(f"weight_norm: max |H - H^T| = {asym:.2e}")
    if asym < 1e-8:  # pragma: no cover - a torch build whose double backward is right
        pytest.skip("this torch build's double backward of _weight_norm is symmetric")
    with pytest.raises(dualhess.AsymmetricOperatorError, match="_weight_norm") as info:
        tb.hessian(model, CE, (X, y))
    # the refusal names the module and says torch's derivative is the wrong side
    assert "weight normalisation (0 (dim 0))" in str(info.value)
    assert "torch's second derivative is the wrong side" in str(info.value)
    from torch_backend._validity import weight_norm_modules

    legacy = nn.Sequential(nn.Linear(2, 2), nn.utils.weight_norm(nn.Linear(2, 2)))
    assert weight_norm_modules(legacy) == ["1"] and weight_norm_modules(nn.Linear(2, 2)) == []


def test_weight_norm_on_a_small_share_of_the_parameters_is_refused_by_name():
    """Wav2Vec2's positional convolution (weight norm along dim 2) is a small share of the
    model: the whole Hessian's asymmetry (7.9e-5 on the zoo's Wav2Vec2) stays below the
    generic refusal level, yet torch's products in that block are wrong. The probe of
    aten._weight_norm itself makes the refusal definite."""
    from torch_backend._validity import weight_norm_double_backward_error

    if weight_norm_double_backward_error(2) < 1e-8:  # pragma: no cover - a fixed torch build
        pytest.skip("this torch build's double backward of _weight_norm (dim 2) is right")
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 16)
            self.pos = nn.utils.parametrizations.weight_norm(nn.Conv1d(16, 16, 3, padding=1,
                                                                       groups=16), dim=2)
            self.head = nn.Linear(16, 3)

        def forward(self, x):  # x: (N, T, 4)
            h = self.proj(x)
            h = h + 1e-2 * torch.tanh(self.pos(h.transpose(1, 2))).transpose(1, 2)
            return self.head(torch.tanh(h).mean(1))

    model = Net().double()
    X = torch.randn(8, 5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    with pytest.raises(dualhess.AsymmetricOperatorError, match=r"pos \(dim 2\)") as info:
        tb.hessian(model, CE, (X, y), method="autograd")
    assert "torch's second derivative is the wrong side" in str(info.value)


def test_symmetric_models_pass_the_probe_in_float32():
    model, X, y = _problem()
    tb.hessian(model.float(), CE, (X.float(), y))
    tb.ggn(model.float(), CE, (X.float(), y))


# ---------------------------------------------------------------------- unclear answers
@errors_table
def test_loss_class_without_parentheses():
    model, X, y = _problem()
    with pytest.raises(TypeError, match=r"loss_fn=CrossEntropyLoss\(\)"):
        tb.hessian(model, nn.CrossEntropyLoss, (X, y))


@errors_table
def test_dtype_given_by_name():
    model, X, y = _problem()
    op = tb.hessian(model.float(), CE, (X.float(), y), dtype="float64")
    assert op.dtype == torch.float64


@errors_table
def test_dtype_that_is_not_a_dtype():
    model, X, y = _problem()
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        tb.hessian(model, CE, (X, y), dtype="double precision")


@errors_table
def test_numpy_batch_for_a_torch_model():
    model, X, y = _problem()
    with pytest.raises(TypeError, match="torch.as_tensor"):
        tb.hessian(model, CE, (X.numpy(), y.numpy()))


@errors_table
def test_numpy_arrays_inside_a_list_of_batches():
    model, X, y = _problem()
    with pytest.raises(TypeError, match="holds a numpy array|hold a numpy array"):
        tb.hessian(model, CE, [(X.numpy(), y), (X, y)])


@errors_table
def test_model_returning_logits_and_aux():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 3)

        def forward(self, x):
            out = self.body(x)
            return out, out.sum()

    _, X, y = _problem()
    with pytest.raises(TypeError, match="the model returns a tuple of 2 values"):
        tb.hessian(TwoHeads().double(), CE, (X, y))


@errors_table
def test_integer_features_for_a_float_model():
    model, X, y = _problem()
    with pytest.raises(TypeError, match="has integer inputs"):
        tb.hessian(model, CE, ((X * 10).long(), y))


@errors_table
def test_class_labels_of_shape_n_by_1():
    model, X, y = _problem()
    with pytest.raises(ValueError, match=r"targets.squeeze\(1\)"):
        tb.hessian(model, CE, (X, y[:, None]))


@errors_table
def test_all_parameters_frozen():
    model, X, y = _problem()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="every parameter of the model is frozen"):
        tb.hessian(model, CE, (X, y))


@errors_table
def test_embedding_bag_has_no_torch_second_derivative():
    model = nn.Sequential(nn.EmbeddingBag(9, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randint(0, 9, (6, 5)), torch.randint(0, 3, (6,))
    with pytest.raises(RuntimeError, match="no second derivative of nn.EmbeddingBag"):
        tb.hessian(model, CE, (x, y))
