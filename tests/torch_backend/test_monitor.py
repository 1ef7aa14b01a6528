"""HessianMonitor on a short digits training run: logged values equal from-scratch ones."""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

import torch_backend as tb  # noqa: E402
from dualhess._trace import trace  # noqa: E402
from torch_backend.examples import load_digits, make_mlp  # noqa: E402
from torch_backend.monitor import HessianMonitor  # noqa: E402

pytestmark = pytest.mark.torch


def test_monitor_matches_from_scratch(tmp_path):
    X, y = load_digits(torch.float64, n=64, flat=True)
    model, loss_fn = make_mlp(hidden=3, seed=0), torch.nn.CrossEntropyLoss()
    tol = 1e-6
    logged = []
    monitor = HessianMonitor(model, loss_fn, (X, y), every=4, tol=tol, trace_matvecs=8, seed=5,
                             method="func", log_fn=logged.append)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    snapshots = {}
    for step in range(9):
        if monitor.step() is not None:
            snapshots[step] = copy.deepcopy(model.state_dict())
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    assert monitor.steps == [0, 4, 8] == sorted(snapshots) == [r["step"] for r in logged]
    assert [r["warm_started"] for r in monitor.history] == [False, True, True]
    values = monitor.values("top_eigenvalue")
    assert len(set(values)) == 3  # training moved the spectrum
    for record in monitor.history:
        fresh = make_mlp(hidden=3, seed=0)
        fresh.load_state_dict(snapshots[record["step"]])
        op = tb.hessian(fresh, loss_fn, (X, y), method="func")
        exact = np.linalg.eigvalsh(op.to_dense().numpy())[-1]
        # The residual bound: |theta - lambda| <= ||r|| <= tol |theta|.
        assert record["top_converged"]
        assert abs(record["top_eigenvalue"] - exact) <= tol * abs(record["top_eigenvalue"])
        # The trace: the same probes from (seed, step), the same number, exactly.
        again = trace(op, method="hutchinson", num_matvecs=8,
                      seed=monitor.tracker.trace_rng(record["step"]))
        assert record["trace"] == again.value and record["trace_stderr"] == again.stderr
    # Warm starts pay off: later measurements cost no more than the cold one.
    cost = [r["top_matvecs"] for r in monitor.history]
    assert max(cost[1:]) <= cost[0]
    monitor.save(tmp_path / "history.json")
    assert json.loads((tmp_path / "history.json").read_text())["history"] == monitor.history
    import matplotlib

    matplotlib.use("Agg")
    fig = monitor.plot(tmp_path / "history.png")
    assert (tmp_path / "history.png").stat().st_size > 0 and len(fig.axes) == 2


def test_monitor_restores_train_mode_and_checks_input():
    X, y = load_digits(torch.float64, n=32, flat=True)
    model = torch.nn.Sequential(torch.nn.Linear(64, 3), torch.nn.Dropout(0.5),
                                torch.nn.Linear(3, 10)).double()
    model.train()
    monitor = HessianMonitor(model, torch.nn.CrossEntropyLoss(), (X, y), every=2,
                             metrics=("trace",), trace_matvecs=4, method="autograd")
    assert monitor.step(1) is None
    record = monitor.step(2)  # Dropout is off while measuring, the mode is restored
    assert set(record) == {"step", "trace", "trace_stderr", "num_matvecs"}
    assert model.training
    with pytest.raises(ValueError, match="metrics"):
        HessianMonitor(model, torch.nn.CrossEntropyLoss(), (X, y), metrics=("lambda",))
    with pytest.raises(TypeError, match="nn.Module"):
        HessianMonitor(lambda x: x, torch.nn.CrossEntropyLoss(), (X, y))
    with pytest.raises(ValueError, match="empty"):
        HessianMonitor(model, torch.nn.CrossEntropyLoss(), (X, y)).plot()


def _lightning_problem() -> str | None:
    """None when Lightning imports here; else why not. Missing is a reason to skip; installed
    but broken (e.g. a torchvision built for another torch, which `make` removes) is not."""
    import importlib.util

    if importlib.util.find_spec("lightning") is None:
        return "missing"
    try:
        import lightning.pytorch  # noqa: F401
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {err}"
    return None


def test_lightning_callback_logs_from_scratch_values():
    problem = _lightning_problem()
    if problem == "missing":
        pytest.skip("lightning is not installed (pip install lightning; it is in the dev extras)")
    assert problem is None, f"lightning is installed but does not import: {problem}"
    import lightning.pytorch as L
    from lightning.pytorch.loggers import Logger

    from torch_backend.monitor import HessianMonitorCallback

    X, y = load_digits(torch.float64, n=32, flat=True)
    loss_fn = torch.nn.CrossEntropyLoss()
    tol = 1e-6

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_mlp(hidden=3, seed=0)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return loss_fn(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    class Recorder(Logger):
        """A Lightning logger that keeps what it is given."""

        def __init__(self):
            super().__init__()
            self.logged = []

        name = property(lambda self: "recorder")
        version = property(lambda self: 0)

        def log_metrics(self, metrics, step=None):
            self.logged.append((step, dict(metrics)))

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    class Snapshots(L.Callback):
        """The parameters at each global step the monitor measures."""

        def __init__(self):
            self.at = {}

        def on_train_start(self, trainer, pl_module):
            self.at[trainer.global_step] = copy.deepcopy(pl_module.net.state_dict())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.at[trainer.global_step] = copy.deepcopy(pl_module.net.state_dict())

    callback = HessianMonitorCallback(loss_fn, (X, y), every=2, tol=tol, trace_matvecs=4,
                                      seed=3, method="func")
    snapshots, logger = Snapshots(), Recorder()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=8)
    trainer = L.Trainer(max_steps=4, callbacks=[snapshots, callback], logger=logger,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(Module(), loader)

    monitor = callback.monitor
    assert monitor.steps == [0, 2, 4]
    assert [r["warm_started"] for r in monitor.history] == [False, True, True]
    ours = [(step, metrics) for step, metrics in logger.logged
            if any(key.startswith("hessian/") for key in metrics)]
    assert [step for step, _ in ours] == [0, 2, 4]
    for (step, metrics), record in zip(ours, monitor.history):
        assert metrics["hessian/top_eigenvalue"] == record["top_eigenvalue"]
        assert metrics["hessian/trace"] == record["trace"]
        # From scratch: the dense Hessian of the parameters at that global step.
        fresh = make_mlp(hidden=3, seed=0)
        fresh.load_state_dict(snapshots.at[step])
        op = tb.hessian(fresh, loss_fn, (X, y), method="func")
        exact = np.linalg.eigvalsh(op.to_dense().numpy())[-1]
        assert record["top_converged"]
        assert abs(record["top_eigenvalue"] - exact) <= tol * abs(record["top_eigenvalue"])
        again = trace(op, method="hutchinson", num_matvecs=4,
                      seed=monitor.tracker.trace_rng(step))
        assert record["trace"] == again.value
    assert len({r["top_eigenvalue"] for r in monitor.history}) == 3  # training moved it


def test_lightning_missing_is_a_clear_import_error(monkeypatch):
    import torch_backend.monitor as mon

    for name in ("lightning", "lightning.pytorch", "lightning.pytorch.callbacks",
                 "pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    monkeypatch.delitem(mon.__dict__, "HessianMonitorCallback", raising=False)
    with pytest.raises(ImportError, match="pip install lightning"):
        mon.HessianMonitorCallback  # noqa: B018
    assert "HessianMonitorCallback" not in mon.__dict__
