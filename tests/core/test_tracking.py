"""The monitors' analyses: the gradient-overlap metric, the 2/eta reference line, and the
Hugging Face ``Trainer`` callback, each against a from-scratch float64 computation."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

import torch_backend as tb  # noqa: E402
from dualhess._trace import trace  # noqa: E402
from torch_backend.examples import load_digits, make_mlp  # noqa: E402
from torch_backend.monitor import HessianMonitor  # noqa: E402

pytestmark = pytest.mark.torch


def dense_overlap(H: np.ndarray, g: np.ndarray, k: int) -> float:
    _, vectors = np.linalg.eigh(H)
    top = vectors[:, ::-1][:, :k]
    return float(np.sum((top.T @ g) ** 2) / (g @ g))


def test_gradient_overlap_metric_and_reference_line():
    import matplotlib

    matplotlib.use("Agg")
    X, y = load_digits(torch.float64, n=48, flat=True)
    model, loss_fn = make_mlp(hidden=2, seed=1), torch.nn.CrossEntropyLoss()
    monitor = HessianMonitor(model, loss_fn, (X, y), every=2, tol=1e-10, method="func",
                             metrics=("top_eigenvalue", "gradient_overlap"), overlap_k=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(3):
        monitor.step(step)
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    record = monitor.history[-1]
    assert record["step"] == 2 and record["overlap_k"] == 3
    # From scratch at the parameters measured at step 2: those after two updates.
    fresh = make_mlp(hidden=2, seed=1)
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.5)
    for _ in range(2):
        opt2.zero_grad()
        loss_fn(fresh(X), y).backward()
        opt2.step()
    opt2.zero_grad()
    loss_fn(fresh(X), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in fresh.parameters()]).numpy()
    H = tb.hessian(fresh, loss_fn, (X, y), method="func").to_dense().numpy()
    assert record["gradient_overlap"] == pytest.approx(dense_overlap(H, g, 3), rel=1e-7)
    assert record["gradient_norm"] == pytest.approx(np.linalg.norm(g), rel=1e-12)
    fig = monitor.plot(reference=2 / 0.5)
    sharp, overlap = fig.axes
    assert sharp.get_xlabel() == "training step" and sharp.get_ylabel()
    labels = [t.get_text() for t in sharp.get_legend().get_texts()]
    assert labels[0] == "measured" and "2/" in labels[1] and "4" in labels[1]
    assert any(np.allclose(line.get_ydata(), 4.0) for line in sharp.get_lines()[1:])
    assert "overlap" in overlap.get_title() and overlap.get_ylabel()


def test_jax_gradient_overlap_metric():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from jax_backend import dense_hessian
    from jax_backend.monitor import HessianMonitor as JaxMonitor

    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((24, 3)), rng.standard_normal((24, 2))
    params = {"w": jnp.asarray(rng.standard_normal((3, 4))),
              "v": jnp.asarray(rng.standard_normal((4, 2)))}

    def loss_fn(p, batch):
        inputs, targets = batch
        return jnp.mean((jnp.tanh(inputs @ p["w"]) @ p["v"] - targets) ** 2)

    monitor = JaxMonitor(loss_fn, (x, t), every=1, tol=1e-10, metrics=("gradient_overlap",),
                         overlap_k=2)
    record = monitor.measure(0, params)
    g = np.asarray(ravel_pytree(jax.grad(loss_fn)(params, (x, t)))[0])
    H = np.asarray(dense_hessian(loss_fn, params, (x, t)))
    assert record["gradient_overlap"] == pytest.approx(dense_overlap(H, g, 2), rel=1e-7)


def test_hugging_face_trainer_callback_logs_from_scratch_values(tmp_path):
    transformers = pytest.importorskip("transformers")
    from torch.utils.data import Dataset

    from torch_backend.monitor import HessianTrainerCallback

    config = transformers.GPT2Config(vocab_size=16, n_positions=8, n_embd=4, n_layer=1,
                                     n_head=1, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    tokens = torch.randint(0, 16, (16, 6))

    class Tokens(Dataset):
        def __len__(self):
            return len(tokens)

        def __getitem__(self, i):
            return {"input_ids": tokens[i], "labels": tokens[i]}

    batch = {"input_ids": tokens[:8], "labels": tokens[:8]}
    start = copy.deepcopy(model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
        learning_rate=0.05, report_to=[], logging_steps=100, save_strategy="no",
        use_cpu=True, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens())
    # One engine on both sides: GPT-2's float32 loss makes engines differ at ~1e-7.
    callback = HessianTrainerCallback(batch, every=3, dtype=torch.float64, tol=1e-9,
                                      trace_matvecs=6, seed=2, method="autograd")
    callback.attach(trainer).train()
    logged = [h for h in trainer.state.log_history if "hessian/top_eigenvalue" in h]
    assert [h["step"] for h in logged] == [0, 3]
    for entry, snapshot in zip(logged, (start, model)):
        fresh = copy.deepcopy(snapshot).double().eval()
        names = [n for n, p in fresh.named_parameters() if p.requires_grad]
        flat0 = torch.cat([p.detach().reshape(-1) for n, p in fresh.named_parameters()
                           if n in names])
        shapes = [(n, p.shape) for n, p in fresh.named_parameters() if n in names]

        def loss_of(flat, fresh=fresh, shapes=shapes):
            parts, at = {}, 0
            for name, shape in shapes:
                size = int(np.prod(shape))
                parts[name] = flat[at:at + size].reshape(shape)
                at += size
            return torch.func.functional_call(fresh, parts, (), dict(batch)).loss

        from torch_backend._data import differentiable_attention  # the math SDPA kernel

        # Double backward (reverse over reverse), independent of the operator's engines.
        # GPT-2's own loss upcasts the logits to float32 (``logits.float()``), so even this
        # float64 Hessian is symmetric only to float32 rounding (~1e-7 here).
        with differentiable_attention():
            H = torch.autograd.functional.hessian(loss_of, flat0, vectorize=True).numpy()
        top = np.linalg.eigvalsh(0.5 * (H + H.T))[-1]
        # |theta - lambda| <= ||r|| <= tol |theta| (tol 1e-9), plus the asymmetry above.
        assert entry["hessian/top_eigenvalue"] == pytest.approx(top, rel=1e-8)
        # the trace: the same probes from (seed, step) on a from-scratch operator
        op = tb.hessian(fresh, None, batch, closure=lambda m, b: m(**b).loss,
                        method="autograd")
        again = trace(op, method="hutchinson", num_matvecs=6,
                      seed=callback.monitor.tracker.trace_rng(entry["step"]))
        assert entry["hessian/trace"] == pytest.approx(again.value, rel=1e-10)
    assert callback.monitor.steps == [0, 3]


@pytest.mark.parametrize("name", ["edge_of_stability", "edge_of_stability_jax"])
def test_edge_of_stability_examples_run(name, monkeypatch):
    """A short run of each example: the sharpness is measured where asked, and GD at
    lr = 0.8 on this MLP starts below 2 / lr = 2.5 and sharpens (progressive sharpening)."""
    import importlib
    from pathlib import Path

    if name.endswith("jax"):
        pytest.importorskip("jax")
        pytest.importorskip("optax")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "examples"))
    example = importlib.import_module(name)
    monitor, losses = example.run(steps=100, every=50)
    assert monitor.steps == [0, 50, 100] and len(losses) == 101
    sharpness = monitor.values("top_eigenvalue")
    assert sharpness[0] < 2 / 0.8 and sharpness[2] > sharpness[0]
    assert all(r["top_converged"] for r in monitor.history)
