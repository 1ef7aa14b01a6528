"""Parameters on several devices (issue 25): the layout places blocks, the model stays put.

A model whose layers live on several devices (Hugging Face ``device_map="auto"``, accelerate
dispatch, model code that moves activations with ``.to``) is analysed where it is: the layout
(:class:`dualhess.ParamLayout`) names each parameter's device and the home device of the flat
vectors; ``split`` hands out blocks on the parameters' devices, ``join`` gathers them home.

Without two real devices the placement logic is exercised with the ``meta`` device (a real
second device on any machine) and with a recorder in place of the layout's one device move
(``dualhess._operator._to_device``), so these tests fail if a block is not sent to its
entry's device or a result is not gathered onto the home device.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import dualhess  # noqa: E402
import dualhess._operator as operator_module  # noqa: E402
import torch_backend as tb  # noqa: E402
from dualhess import ParamEntry, ParamLayout  # noqa: E402
from torch_backend._params import parameter_devices, prepare_model, select_params  # noqa: E402

errors_table = pytest.mark.errors_table
nn = torch.nn
CE = nn.CrossEntropyLoss()
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


# ---------------------------------------------------------------------- a model on two devices
class TwoDevices(nn.Module):
    """An MLP whose first layer lives on ``first`` and second on ``second``; the forward moves
    the activations between them and returns the outputs on the inputs' device (as
    accelerate's dispatch hooks do)."""

    def __init__(self, first: str, second: str, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.first_device, self.second_device = torch.device(first), torch.device(second)
        self.inner = nn.Linear(3, 5).to(dtype=torch.float64, device=self.first_device)
        self.outer = nn.Linear(5, 4).to(dtype=torch.float64, device=self.second_device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inner(x.to(self.first_device)))
        return self.outer(h.to(self.second_device)).to(x.device)


def _data(device: str = "cpu"):
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (12,), generator=gen)
    return X.to(device), y.to(device)


def _twin_on(model: TwoDevices, device: str) -> TwoDevices:
    """The same weights with both halves on ``device``."""
    twin = TwoDevices(device, device)
    twin.load_state_dict({k: v.to(device) for k, v in model.state_dict().items()})
    return twin


def _probes(n: int, device: str, k: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    return torch.randn(n, k, generator=gen, dtype=torch.float64).to(device)


class MoveRecorder:
    """Stands in for the layout's device move: records ``(shape, device)`` and returns the
    block unchanged (every tensor here is really on the CPU)."""

    def __init__(self) -> None:
        self.moves: list[tuple[tuple[int, ...], str]] = []

    def __call__(self, x, where):
        self.moves.append((tuple(x.shape), str(where)))
        return x


@pytest.fixture
def recorder(monkeypatch):
    record = MoveRecorder()
    monkeypatch.setattr(operator_module, "_to_device", record)
    return record


# ---------------------------------------------------------------------- (a) the layout
def _placed_layout(home="cpu") -> ParamLayout:
    return ParamLayout.from_shapes(
        [("inner.weight", (5, 3)), ("inner.bias", (5,)), ("outer.weight", (4, 5))],
        devices={"inner.weight": "cpu", "inner.bias": "cpu", "outer.weight": "cuda:1"},
        home=home,
    )


def test_layout_records_devices_and_home():
    layout = _placed_layout()
    assert [e.device for e in layout] == ["cpu", "cpu", "cuda:1"]
    assert layout.home == "cpu"
    assert layout.devices == ("cpu", "cuda:1")
    assert layout.spans_devices
    assert layout.to_dict()[2]["device"] == "cuda:1"
    assert "devices=['cpu', 'cuda:1']" in repr(layout)
    single = ParamLayout.from_shapes([("w", (2,))], devices={"w": "cpu"}, home="cpu")
    assert not single.spans_devices
    # the parameters on one device, the flat vectors on another: blocks move too
    assert ParamLayout.from_shapes([("w", (2,))], devices={"w": "cuda:0"}, home="cpu").spans_devices


def test_layout_without_devices_is_unchanged():
    """The layout API before placement: positional entries, no device, nothing moved."""
    layout = ParamLayout([ParamEntry("w", (2, 3), 0, 6), ParamEntry("b", (2,), 6, 8)])
    assert layout.home is None and layout.devices == () and not layout.spans_devices
    assert layout.to_dict() == [
        {"name": "w", "shape": [2, 3], "start": 0, "stop": 6},
        {"name": "b", "shape": [2], "start": 6, "stop": 8},
    ]
    flat = np.arange(8.0)
    np.testing.assert_array_equal(layout.join(layout.split(flat)), flat)
    block = np.arange(16.0).reshape(8, 2)
    parts = layout.split_columns(block)
    assert parts["w"].shape == (2, 2, 3)
    np.testing.assert_array_equal(parts["w"][1], block[:6, 1].reshape(2, 3))
    np.testing.assert_array_equal(layout.join_columns(parts), block)


def test_split_sends_each_block_to_its_entry_device(recorder):
    layout = _placed_layout()
    flat = torch.arange(40.0, dtype=torch.float64)
    parts = layout.split(flat)
    # only the block whose parameter lives elsewhere than the flat vector moves, to its device
    assert recorder.moves == [((4, 5), "cuda:1")]
    assert torch.equal(parts["outer.weight"], flat[20:40].reshape(4, 5))
    recorder.moves.clear()
    columns = layout.split_columns(torch.stack([flat, -flat], dim=1))
    assert recorder.moves == [((2, 4, 5), "cuda:1")]
    assert torch.equal(columns["outer.weight"][1], -flat[20:40].reshape(4, 5))


def test_split_places_blocks_on_a_real_second_device():
    """``meta`` is a second device on every machine: the block really lands there."""
    layout = ParamLayout.from_shapes(
        [("a", (2, 2)), ("b", (3,))], devices={"a": torch.device("cpu"), "b": torch.device("meta")},
        home=torch.device("cpu"),
    )
    parts = layout.split(torch.arange(7.0))
    assert parts["a"].device.type == "cpu" and parts["b"].device.type == "meta"
    assert parts["b"].shape == (3,)
    columns = layout.split_columns(torch.ones(7, 2))
    assert columns["a"].device.type == "cpu" and columns["b"].device.type == "meta"
    assert columns["b"].shape == (2, 3)


def test_join_gathers_every_block_onto_home(recorder):
    """Home is another device than the blocks': every block is sent there, in layout order."""
    layout = _placed_layout(home="cuda:0")
    parts = {
        "inner.weight": torch.full((5, 3), 1.0),
        "inner.bias": torch.full((5,), 2.0),
        "outer.weight": torch.full((4, 5), 3.0),
    }
    flat = layout.join(parts)
    assert recorder.moves == [((5, 3), "cuda:0"), ((5,), "cuda:0"), ((4, 5), "cuda:0")]
    assert torch.equal(flat, torch.cat([p.reshape(-1) for p in parts.values()]))
    recorder.moves.clear()
    block = layout.join_columns({name: torch.stack([p, 2 * p]) for name, p in parts.items()})
    assert [where for _, where in recorder.moves] == ["cuda:0"] * 3
    assert block.shape == (40, 2) and torch.equal(block[:, 1], 2 * flat)


def test_join_leaves_blocks_already_at_home(recorder):
    layout = _placed_layout(home="cpu")
    flat = torch.randn(40, dtype=torch.float64)
    assert torch.equal(layout.join(layout.split(flat)), flat)
    # split moved the cuda:1 block (recorded); join found every block "on" the cpu
    assert recorder.moves == [((4, 5), "cuda:1")]


def test_select_params_names_each_parameter_device():
    model = TwoDevices("cpu", "cpu")
    layout, selected, fixed = select_params(model, None)
    assert layout.home == torch.device("cpu")
    assert [e.device for e in layout] == [p.device for p in model.parameters()]
    assert not layout.spans_devices and fixed == {}
    assert all(selected[n].data_ptr() == p.data_ptr() for n, p in model.named_parameters())


# ---------------------------------------------------------------------- prepare_model
def _half_on_meta() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[2].to("meta")
    return model


def test_a_model_on_several_devices_is_not_copied():
    model = _half_on_meta()
    assert parameter_devices(model) == {torch.device("cpu"): 2, torch.device("meta"): 2}
    work, dtype, home, converted = prepare_model(model, None, None)
    assert work is model and dtype == torch.float32 and home == torch.device("cpu")
    assert not converted


def test_a_dtype_copy_keeps_every_parameter_on_its_device():
    model = _half_on_meta()
    work, dtype, home, converted = prepare_model(model, torch.float64, None)
    assert work is not model and converted and home == torch.device("cpu")
    assert [p.device.type for p in work.parameters()] == ["cpu", "cpu", "meta", "meta"]
    assert all(p.dtype == torch.float64 for p in work.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the user's, untouched


@errors_table
def test_device_for_a_model_on_several_devices_is_refused():
    model = _half_on_meta()
    with pytest.raises(ValueError, match="for a model whose parameters and buffers live on"):
        prepare_model(model, None, "cpu")
    X, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match="several devices .cpu: 2 tensors, meta: 2 tensors."):
        tb.hessian(model, CE, (X, y), device="cpu")
    assert [p.device.type for p in model.parameters()] == ["cpu", "cpu", "meta", "meta"]


# ---------------------------------------------------------------------- the operators route
def _relabelled(op, second: str, home: str = "cpu") -> ParamLayout:
    """``op.layout`` with the ``outer`` parameters claimed by device ``second``."""
    devices = {e.name: (second if e.name.startswith("outer") else e.device) for e in op.layout}
    return ParamLayout.from_shapes(
        [(e.name, e.shape) for e in op.layout], devices=devices, home=home
    )


@pytest.mark.parametrize("build", ["ggn", "fisher"])
def test_curvature_products_split_and_join_through_the_layout(build, recorder):
    """GGN and Fisher products take their blocks from ``op.layout``: relabel the second
    layer's device and its blocks are sent there (the recorder leaves them on the CPU)."""
    model = TwoDevices("cpu", "cpu")
    X, y = _data()
    op = getattr(tb, build)(model, CE, (X, y))
    V = _probes(op.n, "cpu")
    expected_vec, expected_mat = op.matvec(V[:, 0]), op.matmat(V)
    op.layout = _relabelled(op, "cuda:1", home="cuda:0")
    recorder.moves.clear()
    torch.testing.assert_close(op.matvec(V[:, 0]), expected_vec, rtol=0, atol=1e-12)
    torch.testing.assert_close(op.matmat(V), expected_mat, rtol=0, atol=1e-12)
    targets = {where for _, where in recorder.moves}
    # the GGN places its tangents (J v per block); the Fisher's per-sample gradients are
    # taken at the parameters themselves and only gathered home
    assert targets == ({"cuda:0", "cuda:1"} if build == "ggn" else {"cuda:0"})
    if build == "ggn":  # the tangents of the second layer went to its device
        assert ((4, 5), "cuda:1") in recorder.moves and ((3, 4, 5), "cuda:1") in recorder.moves


def test_gradient_and_shift_go_through_the_layout(recorder):
    model = TwoDevices("cpu", "cpu")
    X, y = _data()
    op = tb.hessian(model, CE, (X, y))
    grad, shifted = op.gradient(), op.loss_at(1e-3 * _probes(op.n, "cpu")[:, 0])
    op.layout = _relabelled(op, "cuda:1", home="cuda:0")
    recorder.moves.clear()
    torch.testing.assert_close(op.gradient(), grad, rtol=0, atol=1e-14)
    assert {where for _, where in recorder.moves} == {"cuda:0"}  # the gradient gathered home
    recorder.moves.clear()
    assert op.loss_at(1e-3 * _probes(op.n, "cpu")[:, 0]) == pytest.approx(shifted, abs=1e-14)
    assert {where for _, where in recorder.moves} == {"cuda:1"}  # the shift placed per block


@pytest.mark.parametrize("method", ["autograd", "func"])
def test_hessian_products_split_and_join_through_the_layout(method, recorder):
    model = TwoDevices("cpu", "cpu")
    X, y = _data()
    op = tb.hessian(model, CE, (X, y), method=method)
    v = _probes(op.n, "cpu")[:, 0]
    expected = op.matvec(v)
    op._engine.layout = op.layout = _relabelled(op, "cuda:1", home="cuda:0")
    recorder.moves.clear()
    torch.testing.assert_close(op.matvec(v), expected, rtol=0, atol=1e-12)
    assert ((4, 5), "cuda:1") in recorder.moves and ((4, 5), "cuda:0") in recorder.moves


# ---------------------------------------------------------------------- (b) end to end
def _check_against_one_device(first: str, second: str) -> None:
    """Hessian (both engines, auto), GGN and Fisher products of the split model equal those
    of the same weights on ``first`` alone, to 1e-12 in float64; the model is not moved."""
    model = TwoDevices(first, second)
    twin = _twin_on(model, first)
    X, y = _data(first)
    devices_before = [p.device for p in model.parameters()]
    V = _probes(sum(p.numel() for p in model.parameters()), first)
    builds = [(tb.hessian, {"method": m}) for m in ("autograd", "func", "auto")]
    builds += [(tb.ggn, {}), (tb.fisher, {})]
    for build, kwargs in builds:
        op = build(model, CE, (X, y), **kwargs)
        ref = build(twin, CE, (X, y), **kwargs)
        assert op.objective.model is model  # analysed in place, never copied
        assert str(op.device) == str(torch.device(first)) == str(op.layout.home)
        assert [str(e.device) for e in op.layout] == [str(d) for d in devices_before]
        assert op.layout.spans_devices == (torch.device(first) != torch.device(second))
        torch.testing.assert_close(op.matvec(V[:, 0]), ref.matvec(V[:, 0]), rtol=0, atol=1e-12)
        torch.testing.assert_close(op.matmat(V), ref.matmat(V), rtol=0, atol=1e-12)
        torch.testing.assert_close(op.gradient(), ref.gradient(), rtol=0, atol=1e-12)
    # the core's algorithms run unchanged on the flat vectors
    op = tb.hessian(model, CE, (X, y))
    ref = tb.hessian(twin, CE, (X, y))
    np.testing.assert_allclose(
        dualhess.eigsh(op, k=2, seed=0).values, dualhess.eigsh(ref, k=2, seed=0).values,
        rtol=1e-10,
    )
    assert [p.device for p in model.parameters()] == devices_before


def test_a_forward_that_moves_activations_matches_one_device_on_cpu():
    """The code path of a split model (the forward moves activations with ``.to``), with
    "cpu" for both halves, so it runs on every machine."""
    _check_against_one_device("cpu", "cpu")


@TWO_GPUS
def test_layers_on_two_gpus_match_one_gpu():
    _check_against_one_device("cuda:0", "cuda:1")


@TWO_GPUS
def test_layers_on_two_gpus_with_flat_vectors_on_the_second():
    """Home is the first parameter's device: put the first layer on cuda:1."""
    model = TwoDevices("cuda:1", "cuda:0")
    X, y = _data("cuda:1")
    op = tb.hessian(model, CE, (X, y), method="autograd")
    ref = tb.hessian(_twin_on(model, "cpu"), CE, (X.cpu(), y.cpu()), method="autograd")
    assert op.device == torch.device("cuda:1") and op.layout.spans_devices
    v = _probes(op.n, "cuda:1")[:, 0]
    torch.testing.assert_close(op.matvec(v).cpu(), ref.matvec(v.cpu()), rtol=0, atol=1e-12)


@TWO_GPUS
def test_dtype_copy_of_a_model_on_two_gpus_keeps_its_placement():
    model = TwoDevices("cuda:0", "cuda:1").float()
    X, y = _data("cuda:0")
    op = tb.hessian(model, CE, (X.float(), y), dtype=torch.float64, method="autograd")
    assert op.objective.model is not model and op.dtype == torch.float64
    assert [e.device.index for e in op.layout] == [0, 0, 1, 1]
    ref = tb.hessian(_twin_on(copy.deepcopy(model).double(), "cuda:0"), CE, (X, y),
                     method="autograd")
    v = _probes(op.n, "cuda:0")[:, 0]
    torch.testing.assert_close(op.matvec(v), ref.matvec(v), rtol=0, atol=1e-12)
