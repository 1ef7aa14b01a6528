"""dualhess.crosscheck_model and dualhess.crosscheck on torch operators vs their JAX twins."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")

import crosscheck_models as cm  # noqa: E402  (registered by conftest.py)
import jax.numpy as jnp  # noqa: E402

import dualhess  # noqa: E402
import jax_backend  # noqa: E402
import torch_backend  # noqa: E402

pytestmark = pytest.mark.both

MODELS = ["mlp", "cnn", "bn_cnn", "layernorm_mlp", "resnet", "embedding"]


def _data(case):
    inputs = case.inputs[0] if len(case.inputs) == 1 else case.inputs
    return inputs, case.targets


@pytest.mark.parametrize("name", MODELS)
def test_crosscheck_model_passes_at_float64_rtol(name):
    case = cm.build(name)
    report = dualhess.crosscheck_model(case.model, case.loss, _data(case), k=2, num_probes=4)
    assert report.passed, str(report)
    assert report.rtol == 1e-10
    assert report.max_rel_diff <= 1e-10
    assert report.labels == ("torch", "jax")
    assert [b.name for b in report.blocks] == [n for n, p in case.model.named_parameters() if p.requires_grad]


def test_dualhess_hessian_dispatches_on_the_framework():
    case = cm.build("mlp")
    op = dualhess.hessian(case.model, case.loss, _data(case), method="func")
    assert isinstance(op, torch_backend.HessianOperator)
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    x, y = np.ones((4, 3)), np.array([0, 1, 1, 0])

    def loss(out, t):
        return jnp.mean((out - jax.nn.one_hot(t, 2)) ** 2)

    op = dualhess.hessian(model, loss, (x, y))
    assert op.framework == "jax" and op.n == 8
    with pytest.raises(TypeError, match="cannot tell which framework"):
        dualhess.hessian(object(), loss, (x, y))


def _twin_operator(case, penalty=None):
    inputs, targets = _data(case)
    twin = jax_backend.from_torch(case.model, inputs, loss=case.loss, example_targets=targets)
    batch = jax_backend.batch_from_torch((inputs, targets))

    def loss_fn(params, b):
        value = twin.loss(params, *b)
        if penalty is not None:
            value = value + penalty(params)
        return value

    return jax_backend.hessian(loss_fn, twin.params, batch), twin


def test_perturbed_twin_weight_fails():
    case = cm.build("cnn")
    op_t = torch_backend.hessian(case.model, case.loss, _data(case), method="func")
    op_j, twin = _twin_operator(case)
    assert dualhess.crosscheck(op_t, op_j, align=twin.align, k=0, num_probes=4).passed
    # move one weight of the twin by 1e-6: the Hessians now differ far above 1e-10
    leaves, treedef = jax.tree_util.tree_flatten(twin.params)
    leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].add(1e-6)
    perturbed = jax.tree_util.tree_unflatten(treedef, leaves)
    batch = jax_backend.batch_from_torch(_data(case))
    op_p = jax_backend.hessian(lambda p, b: twin.loss(p, *b), perturbed, batch)
    report = dualhess.crosscheck(op_t, op_p, align=twin.align, k=2, num_probes=4)
    assert not report.passed
    assert report.max_rel_diff > 1e-10


def test_difference_confined_to_one_block_is_named():
    case = cm.build("mlp")
    op_t = torch_backend.hessian(case.model, case.loss, _data(case), method="func")
    # an L2 penalty on the last layer's weight, on the JAX side only
    op_j, twin = _twin_operator(case, penalty=lambda p: 1e-4 * jnp.sum(p["2.weight"] ** 2))
    report = dualhess.crosscheck(op_t, op_j, align=twin.align, k=2, num_probes=6)
    assert not report.passed
    assert report.failing_blocks == ["2.weight"]
    assert "disagreeing blocks: 2.weight" in str(report)


def test_parameter_block_crosscheck():
    case = cm.build("cnn")
    names = [n for n, _ in case.model.named_parameters()][-2:]
    report = dualhess.crosscheck_model(case.model, case.loss, _data(case), k=1, num_probes=3, params=names)
    assert report.passed, str(report)
    assert [b.name for b in report.blocks] == names


def test_sum_reduction_and_several_batches():
    case = cm.build("mlp")
    x, y = _data(case)
    loss = torch.nn.CrossEntropyLoss(reduction="sum")
    data = [(x[:7], y[:7]), (x[7:], y[7:])]
    report = dualhess.crosscheck_model(case.model, loss, data, k=1, num_probes=3)
    assert report.passed, str(report)


class _TopValue(torch.nn.Module):
    def forward(self, x):
        return x.sort(dim=-1).values  # aten.sort: no JAX rule


def test_unsupported_op_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), _TopValue()).double().eval()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.long)
    with pytest.raises(NotImplementedError, match=r"aten\.sort.*test_crosscheck_model\.py"):
        dualhess.crosscheck_model(model, torch.nn.CrossEntropyLoss(), (x, y))


def test_referee_names_torch_when_its_weight_norm_double_backward_is_wrong():
    """PyTorch's double backward of ``_weight_norm`` is wrong on this build (gradgradcheck
    fails): the products disagree, and finite differences of each side's own loss say torch
    is the wrong side, not the twin."""
    from torch.nn.utils.parametrizations import weight_norm

    x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    linear = torch.nn.Linear(4, 5).double()
    if torch.autograd.gradgradcheck(lambda v, g: torch._weight_norm(v, g, 0),
                                    (linear.weight.detach().clone().requires_grad_(),
                                     torch.rand(5, 1, dtype=torch.float64).requires_grad_()),
                                    raise_exception=False):
        pytest.skip("this torch build's double backward of _weight_norm is right")
    torch.manual_seed(0)
    model = torch.nn.Sequential(weight_norm(torch.nn.Linear(4, 5), dim=0), torch.nn.Tanh(),
                                torch.nn.Linear(5, 3)).double().eval()
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    report = dualhess.crosscheck_model(model, torch.nn.CrossEntropyLoss(), (x, y), k=2,
                                       num_probes=3, check_symmetric=False)
    assert not report.passed
    assert report.failing_blocks == ["0.parametrizations.weight.original1"]
    verdict = report.verdict
    assert verdict.wrong == "torch", str(report)
    assert verdict.rel_err_a > 0.1 and verdict.rel_err_b < 1e-6
    assert "torch is the wrong side" in str(report)
    # a pair that cannot agree does not spend the eigensolver's budget
    assert report.eig_a == [] and report.num_matvecs == (3, 3)


def test_referee_says_when_both_sides_compute_different_functions():
    case = cm.build("mlp")
    op_t = torch_backend.hessian(case.model, case.loss, _data(case), method="func")
    op_j, twin = _twin_operator(case, penalty=lambda p: 1e-2 * jnp.sum(p["2.weight"] ** 2))
    report = dualhess.crosscheck(op_t, op_j, align=twin.align, k=2, num_probes=4)
    assert not report.passed and report.verdict.wrong is None
    assert "different functions" in report.verdict.message
    assert report.verdict.loss_rel_diff > 1e-6
