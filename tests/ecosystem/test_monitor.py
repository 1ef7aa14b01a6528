"""HessianMonitor on a short digits training run: logged values equal from-scratch ones."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

import dualhess  # noqa: E402
import torch_backend as tb  # noqa: E402
from dualhess.trace import trace  # noqa: E402
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


def _lightning_usable() -> str | None:
    """None when Lightning imports here, else why not (missing, or a broken install such as a
    torchvision built for another torch)."""
    try:
        import lightning.pytorch  # noqa: F401
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {err}"
    return None


def test_lightning_callback():
    why = _lightning_usable()
    if why is not None:
        pytest.skip(f"lightning is not usable here ({why})")
    import lightning.pytorch as L

    from torch_backend.monitor import HessianMonitorCallback
    X, y = load_digits(torch.float64, n=32, flat=True)
    loss_fn = torch.nn.CrossEntropyLoss()

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

    callback = HessianMonitorCallback(loss_fn, (X, y), every=2, trace_matvecs=4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=8)
    trainer = L.Trainer(max_steps=4, callbacks=[callback], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(Module(), loader)
    assert callback.monitor.steps == [2, 4]
    assert all(np.isfinite(callback.monitor.values("top_eigenvalue")))


def test_lightning_missing_is_a_clear_import_error():
    if _lightning_usable() is None:
        pytest.skip("lightning is installed and works")
    import torch_backend.monitor as mon

    with pytest.raises(ImportError, match="pip install lightning"):
        mon.HessianMonitorCallback  # noqa: B018
    assert isinstance(dualhess.__version__, str)
