"""torch -> JAX twin (torch.export): outputs, dense Hessians under the alignment, losses, errors.

Everything runs in float64 (jax x64 is enabled in conftest.py). References are exact: torch's
own outputs and its dense Hessian (``torch.autograd.functional.hessian``, double backward).
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
pytest.importorskip("sklearn")

import crosscheck_models as models  # noqa: E402  (registered by conftest.py)
import jax.numpy as jnp  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from jax_backend.twin import (  # noqa: E402
    Twin,
    UnsupportedOpError,
    batch_from_torch,
    from_torch,
    loss_from_torch,
)

pytestmark = pytest.mark.both

OUTPUT_RTOL = 1e-12
HESSIAN_RTOL = 1e-10


def _rel_err(reference: np.ndarray, value: np.ndarray) -> float:
    reference, value = np.asarray(reference, np.float64), np.asarray(value, np.float64)
    assert reference.shape == value.shape
    return float(np.max(np.abs(reference - value)) / np.max(np.abs(reference)))


@cache
def _converted(name: str) -> tuple[models.ModelCase, Twin]:
    case = models.build(name)
    return case, from_torch(case.model, case.inputs)


@cache
def _hessians(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(torch dense Hessian in torch order, JAX dense Hessian in ravel_pytree order)."""
    case = models.build(name)
    twin = from_torch(case.model, case.inputs, loss=case.loss, example_targets=case.targets)
    h_torch = models.torch_dense_hessian(case).numpy()
    flat, unravel = ravel_pytree(twin.params)
    inputs = tuple(x.numpy() for x in case.inputs)
    targets = case.targets.numpy()

    def loss_of_flat(v):
        return twin.loss(unravel(v), inputs, targets)

    # XLA optimisation level 0: same arithmetic, half the compile time of these one-off programs
    compiled = jax.jit(jax.hessian(loss_of_flat)).lower(flat).compile(
        compiler_options={"xla_backend_optimization_level": 0}
    )
    h_jax = np.asarray(compiled(flat))
    return h_torch, h_jax


# ------------------------------------------------------------------------- model zoo


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_twin_outputs_match_torch(name):
    case, twin = _converted(name)
    with torch.no_grad():
        expected = case.model(*case.inputs).numpy()
    got = np.asarray(twin(*[x.numpy() for x in case.inputs]))
    assert got.dtype == np.float64
    assert _rel_err(expected, got) <= OUTPUT_RTOL
    assert twin.check_error is not None and twin.check_error <= OUTPUT_RTOL
    # torch tensors are accepted as inputs too
    np.testing.assert_array_equal(np.asarray(twin(*case.inputs)), got)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_dense_hessian_matches_torch_under_alignment(name):
    case, twin = _converted(name)
    h_torch, h_jax = _hessians(name)
    n = twin.align.n
    assert h_torch.shape == h_jax.shape == (n, n)
    # parameters keep torch's names, order and layouts: the alignment is the identity
    np.testing.assert_array_equal(twin.align.perm, np.arange(n))
    assert _rel_err(h_torch, h_jax) <= HESSIAN_RTOL
    # and the loss values agree
    loss = loss_from_torch(case.loss)
    value = float(loss(twin(*[x.numpy() for x in case.inputs]), case.targets.numpy()))
    with torch.no_grad():
        expected = float(case.loss_value())
    assert abs(value - expected) <= OUTPUT_RTOL * abs(expected)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_alignment_maps_torch_params_onto_ravelled_twin_params(name):
    case, twin = _converted(name)
    names, tensors = models.flat_trainable(case.model)
    theta_torch = torch.cat([t.detach().reshape(-1) for t in tensors]).numpy()
    theta_jax = np.asarray(ravel_pytree(twin.params)[0])
    np.testing.assert_array_equal(twin.torch_to_jax(theta_torch), theta_jax)
    np.testing.assert_array_equal(twin.jax_to_torch(theta_jax), theta_torch)
    # round trips for vectors and (n, k) blocks
    rng = np.random.default_rng(0)
    v = rng.standard_normal(twin.align.n)
    np.testing.assert_array_equal(twin.jax_to_torch(twin.torch_to_jax(v)), v)
    block = rng.standard_normal((twin.align.n, 3))
    np.testing.assert_array_equal(twin.torch_to_jax(twin.jax_to_torch(block)), block)
    # one block per trainable torch parameter, named by its torch name, in torch order
    assert [b for b, _ in twin.align.blocks] == names
    assert twin.torch_layout.names == names
    start = 0
    for (_, idx), tensor in zip(twin.align.blocks, tensors):
        np.testing.assert_array_equal(idx, np.arange(start, start + tensor.numel()))
        start += tensor.numel()
    assert start == twin.align.n
    assert sorted(twin.jax_layout.names) == sorted(names)


def test_params_keep_torch_names_order_and_layouts():
    case, twin = _converted("resnet")
    names, tensors = models.flat_trainable(case.model)
    assert list(twin.params) == names  # named_parameters() order, flattened in that order
    for name, tensor in zip(names, tensors):
        np.testing.assert_array_equal(np.asarray(twin.params[name]), tensor.detach().numpy())
    assert twin.params["layer2.0.conv2.weight"].dtype == jnp.float64
    assert twin.params["fc.weight"].shape == (10, 3)  # Linear keeps (out, in)
    assert not any("running" in n for n in twin.params)  # buffers are constants

    case, twin = _converted("functional")
    assert "frozen" not in twin.params and "offset" not in twin.params
    assert twin.params["conv_weight"].shape == (5, 1, 3, 3)
    assert twin.params["proj.weight"].shape == (6, 12)


def test_embedding_padding_row_gets_no_curvature_on_both_sides():
    case, twin = _converted("embedding")
    h_torch, h_jax = _hessians("embedding")
    dim = case.model.embed.embedding_dim
    pad_rows = np.arange(0, dim)  # "embed.weight" is the first torch block; row 0 pads
    assert np.all(h_torch[pad_rows] == 0)
    jax_pad = np.flatnonzero(np.isin(twin.align.perm, pad_rows))  # the same entries, JAX order
    assert len(jax_pad) == dim
    assert np.all(h_jax[jax_pad] == 0)
    assert np.abs(h_jax).max() > 0


def test_linen_module_is_the_same_function():
    pytest.importorskip("flax")
    case, twin = _converted("resnet")
    module = twin.linen_module()
    x = case.inputs[0].numpy()
    variables = module.init(jax.random.key(0), x)
    assert set(variables["params"]) == set(twin.params)
    for name, value in twin.params.items():
        np.testing.assert_array_equal(np.asarray(variables["params"][name]), np.asarray(value))
    np.testing.assert_array_equal(np.asarray(module.apply(variables, x)), np.asarray(twin(x)))


def test_float32_twin():
    case = models.mlp()
    twin = from_torch(case.model, case.inputs, dtype=np.float32)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(twin.params))
    got = np.asarray(twin(case.inputs[0].numpy()))
    assert got.dtype == np.float32
    with torch.no_grad():
        expected = case.model(*case.inputs).numpy()
    assert _rel_err(expected, got) <= 1e-5


# ------------------------------------------------------------------------- op coverage


def _check_outputs(module, *inputs):
    module = module.to(torch.float64).eval()
    twin = from_torch(module, inputs)
    with torch.no_grad():
        expected = module(*inputs).numpy()
    got = np.asarray(twin(*[x.numpy() for x in inputs]))
    assert _rel_err(expected, got) <= OUTPUT_RTOL
    return twin


class _PoolZoo(nn.Module):
    def forward(self, x):
        a = F.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True)  # 7x7 -> 4x4
        b = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)  # -> 4x4
        c = F.adaptive_avg_pool2d(x, (4, None))[..., :4]  # 7 -> 4 overlapping bins
        d = F.avg_pool2d(F.pad(x, (1, 0, 0, 1), mode="replicate"), 2)  # 8x8 -> 4x4
        e = F.max_pool2d(x[:, :, :6, :6], 2, dilation=2)  # 6x6 -> 2x2
        return torch.cat([a, b, c, d], dim=1).sum(dim=(2, 3)) + e.mean()


class _ActivationZoo(nn.Module):
    def forward(self, x):
        parts = [
            F.relu6(3 * x), F.elu(x, 0.5), F.softplus(5 * x, beta=2.0, threshold=4.0),
            torch.softmax(x, dim=-1), F.log_softmax(x, dim=1), x.sigmoid() * x.tanh(),
            F.gelu(x, approximate="tanh"), x.exp().sqrt().log(), torch.square(x).abs(),
        ]
        y = torch.stack(parts, dim=0).sum(0)
        return y.unsqueeze(1).squeeze(1).flatten(1) - 2.0 ** x.view_as(x) / x.size(-1)


def test_op_coverage_pools_and_activations():
    gen = torch.Generator().manual_seed(0)
    _check_outputs(_PoolZoo(), torch.randn(2, 3, 7, 7, generator=gen, dtype=torch.float64))
    _check_outputs(_ActivationZoo(), torch.randn(4, 5, generator=gen, dtype=torch.float64))


def test_batchnorm_without_running_stats_and_conv_padding_modes():
    gen = torch.Generator().manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=2, padding_mode="circular"),
        nn.BatchNorm2d(4, track_running_stats=False),  # uses batch statistics in eval too
        nn.Conv2d(4, 2, (2, 3), stride=(1, 2), padding=(1, 0), padding_mode="replicate"),
        nn.Unflatten(1, (1, 2)),
    )
    _check_outputs(net, torch.randn(3, 2, 5, 6, generator=gen, dtype=torch.float64))


# ------------------------------------------------------------------------- errors


class _Spectral(nn.Module):
    def forward(self, x):
        return torch.fft.fft(x).real  # the line the error names


class _WithSpectral(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.block = nn.Sequential(nn.Tanh(), _Spectral())

    def forward(self, x):
        return self.block(self.lin(x))


def test_unsupported_operator_names_op_source_line_and_how_to_report():
    assert issubclass(UnsupportedOpError, NotImplementedError)
    with pytest.raises(UnsupportedOpError) as info:
        from_torch(_WithSpectral().double(), torch.zeros(2, 4, dtype=torch.float64))
    message = str(info.value)
    assert "aten._fft_" in message  # the ATen operator
    assert "test_convert.py" in message and "torch.fft.fft(x).real" in message  # the line
    assert "module 'block.1'" in message
    assert "docs/twin-operators.md" in message and "report" in message


class _LastState(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 3, batch_first=True)

    def forward(self, x):
        return self.lstm(x)[0][:, -1]


class _Sorted(nn.Module):
    def forward(self, x):
        return x.sort(dim=-1).values


def test_unsupported_operator_in_a_submodule_names_it():
    net = nn.Sequential(nn.Linear(4, 4), nn.Sequential(_Sorted()))
    with pytest.raises(UnsupportedOpError, match=r"aten\.sort\.\S+.*module '1\.0', _Sorted"):
        from_torch(net, torch.zeros(2, 4))


def test_lstm_decomposes_to_supported_operators():
    _check_outputs(_LastState(), torch.randn(2, 5, 4, dtype=torch.float64))


class _Branchy(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_unexportable_model_gives_torch_export_reason():
    with pytest.raises(UnsupportedOpError, match="torch.export could not capture _Branchy"):
        from_torch(_Branchy(), torch.zeros(2, 3))


class _FunctionalDropout(nn.Module):
    def forward(self, x):
        return F.dropout(x, 0.2, training=self.training)


def test_train_mode_dropout_and_batchnorm_ask_for_eval():
    with pytest.raises(ValueError, match=r"Dropout at '1'.*model\.eval\(\)"):
        from_torch(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)).train(), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"BatchNorm1d at '0'.*model\.eval\(\)"):
        from_torch(nn.Sequential(nn.BatchNorm1d(3)).train(), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"dropout\(train=True\).*model\.eval\(\)"):
        from_torch(_FunctionalDropout().train(), torch.zeros(2, 3))
    twin = from_torch(_FunctionalDropout().eval(), torch.ones(2, 3))  # identity in eval
    np.testing.assert_array_equal(np.asarray(twin(np.ones((2, 3)))), np.ones((2, 3)))


class _AliasedInplace(nn.Module):
    def forward(self, x):
        y = x * 2
        z = F.relu(y, inplace=True)  # y is relu'd too: torch.export keeps that meaning
        return y + z


def test_inplace_op_on_shared_tensor_keeps_torch_semantics():
    _check_outputs(_AliasedInplace(), torch.randn(2, 3, dtype=torch.float64))


def test_bad_arguments():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        from_torch(lambda x: x, torch.zeros(1))
    with pytest.raises(ValueError, match="float32 or float64"):
        from_torch(nn.Linear(2, 2), torch.zeros(1, 2), dtype=np.int32)
    with pytest.raises(ValueError, match="example_targets"):
        from_torch(nn.Linear(2, 2), torch.zeros(1, 2), loss=nn.MSELoss())


# ------------------------------------------------------------------------- losses

_N, _C = 6, 4


def _loss_cases():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(_N, _C, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, _C, (_N,), generator=gen)
    labels[2] = 1  # ignore_index below
    probs = torch.softmax(torch.randn(_N, _C, generator=gen, dtype=torch.float64), 1)
    weight = torch.rand(_C, generator=gen, dtype=torch.float64) + 0.5
    binary = torch.randint(0, 2, (_N, _C), generator=gen).to(torch.float64)
    spatial = torch.randn(_N, _C, 3, generator=gen, dtype=torch.float64)
    spatial_labels = torch.randint(0, _C, (_N, 3), generator=gen)
    real = torch.randn(_N, _C, generator=gen, dtype=torch.float64)
    return [
        ("ce", nn.CrossEntropyLoss(), logits, labels),
        ("ce_sum", nn.CrossEntropyLoss(reduction="sum"), logits, labels),
        ("ce_weighted_smooth_ignore",
         nn.CrossEntropyLoss(weight=weight, ignore_index=1, label_smoothing=0.2), logits, labels),
        ("ce_smooth_sum", nn.CrossEntropyLoss(label_smoothing=0.1, reduction="sum"), logits,
         labels),
        ("ce_probs_weighted_smooth", nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1),
         logits, probs),
        ("ce_spatial", nn.CrossEntropyLoss(weight=weight), spatial, spatial_labels),
        ("nll_weighted_ignore", nn.NLLLoss(weight=weight, ignore_index=1),
         torch.log_softmax(logits, 1), labels),
        ("mse", nn.MSELoss(), logits, real),
        ("mse_sum", nn.MSELoss(reduction="sum"), logits, real),
        ("l1", nn.L1Loss(), logits, real),
        ("bce_logits", nn.BCEWithLogitsLoss(weight=weight, pos_weight=2 * weight), 3 * logits,
         binary),
        ("bce_logits_sum", nn.BCEWithLogitsLoss(reduction="sum"), logits, probs),
        ("bce", nn.BCELoss(weight=weight), torch.sigmoid(logits), probs),
        ("huber", nn.HuberLoss(delta=0.5), logits, real),
        ("smooth_l1", nn.SmoothL1Loss(beta=0.7, reduction="sum"), logits, real),
    ]


_LOSS_CASES = _loss_cases()


@pytest.mark.parametrize("case", _LOSS_CASES, ids=[c[0] for c in _LOSS_CASES])
def test_loss_value_and_output_hessian_match_torch(case):
    _, module, outputs, targets = case
    loss = loss_from_torch(module)
    value = float(loss(jnp.asarray(outputs.numpy()), targets.numpy()))
    expected = float(module(outputs, targets))
    assert abs(value - expected) <= OUTPUT_RTOL * abs(expected)
    # curvature w.r.t. the outputs (what a Hessian through the model sees)
    h_torch = torch.autograd.functional.hessian(lambda o: module(o, targets), outputs)
    h_jax = jax.jit(jax.hessian(lambda o: loss(o, targets.numpy())))(jnp.asarray(outputs.numpy()))
    h_torch = h_torch.reshape(outputs.numel(), -1).numpy()
    h_jax = np.asarray(h_jax).reshape(outputs.numel(), -1)
    scale = max(np.abs(h_torch).max(), 1.0)  # zero for L1: then absolute
    assert np.max(np.abs(h_torch - h_jax)) <= HESSIAN_RTOL * scale


def test_loss_errors():
    with pytest.raises(UnsupportedOpError, match="KLDivLoss"):
        loss_from_torch(nn.KLDivLoss(reduction="batchmean"))
    with pytest.raises(ValueError, match="reduction='none'"):
        loss_from_torch(nn.MSELoss(reduction="none"))
    with pytest.raises(TypeError, match="torch loss module"):
        loss_from_torch(F.cross_entropy)


# ------------------------------------------------------------------------- batches


def test_batch_from_torch_converts_nested_batches():
    x = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    y = torch.tensor([0, 1])
    bx, by = batch_from_torch((x, y))
    assert isinstance(bx, np.ndarray) and bx.dtype == np.float64 and by.dtype == np.int64
    np.testing.assert_array_equal(bx, x.numpy())
    nested = batch_from_torch({"inputs": [x, 3], "targets": y, "name": "b"})
    assert isinstance(nested["inputs"], list) and nested["inputs"][1] == 3
    assert nested["name"] == "b"
    np.testing.assert_array_equal(nested["targets"], [0, 1])
    as_jax = batch_from_torch(x, as_jax=True)
    assert isinstance(as_jax, jax.Array) and as_jax.dtype == jnp.float64
