"""closure=fn(model, batch): any loss a researcher writes, against dense float64 references.

Every reference is the double-backward Hessian of the same scalar written out by hand over a
flat parameter vector (for the data-set losses: evaluated on all samples at once, so the
weighting of unequal batches is checked, not reused).
"""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")

import dualhess  # noqa: E402
import torch_backend as tb  # noqa: E402

torch.set_num_threads(1)
F = torch.nn.functional
DT = torch.float64


def rel(A: torch.Tensor, B: torch.Tensor) -> float:
    return float(torch.linalg.norm(A - B) / torch.linalg.norm(B))


def dense_reference(model: torch.nn.Module, scalar) -> torch.Tensor:
    """``d^2 scalar(params) / dtheta^2`` by double backward over the flat parameter vector."""
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    theta = torch.cat([p.reshape(-1) for _, p in named]).clone().requires_grad_(True)

    def params_of(flat):
        out, start = {}, 0
        for n, p in named:
            out[n] = flat[start : start + p.numel()].reshape(p.shape)
            start += p.numel()
        return out

    grad = torch.autograd.grad(scalar(params_of(theta)), theta, create_graph=True)[0]
    rows = [torch.autograd.grad(grad[i], theta, retain_graph=True)[0] for i in range(theta.numel())]
    return torch.stack(rows).detach()


def mlp(sizes, act=torch.nn.Tanh, seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), act()]
    return torch.nn.Sequential(*layers[:-1]).to(DT)


# ---------------------------------------------------------------------- a 1-D Poisson PINN
def poisson_closure(model, batch):
    """mean (u''(x) - f(x))^2 over the collocation points + mean u(boundary)^2."""
    x = batch["interior"].detach().requires_grad_(True)
    u = model(x)
    du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
    d2u = torch.autograd.grad(du.sum(), x, create_graph=True)[0]
    f = -(torch.pi**2) * torch.sin(torch.pi * x)  # u = sin(pi x) solves u'' = f, u(0)=u(1)=0
    return ((d2u - f) ** 2).mean() + (model(batch["boundary"]) ** 2).mean()


def test_poisson_pinn_matches_dense_and_auto_picks_autograd():
    model = mlp([1, 6, 6, 1])
    batch = {
        "interior": torch.linspace(0.05, 0.95, 12, dtype=DT)[:, None],
        "boundary": torch.tensor([[0.0], [1.0]], dtype=DT),
    }
    H = dense_reference(model, lambda p: _poisson_by_hand(model, p, batch))
    op = tb.hessian(model, data=batch, closure=poisson_closure)
    # torch.func cannot run the closure's own torch.autograd.grad: "auto" keeps autograd,
    # either by the CPU rule (func is not probed) or because the func probe failed
    assert op.method == "autograd"
    reason = op.method_failures["func"]
    assert "cannot differentiate this closure" in reason or reason.startswith("skipped: on a CPU")
    err = rel(op.to_dense(), H)
    print(f"Poisson PINN closure vs dense double backward: rel err {err:.2e}")
    assert err <= 1e-10
    for method in ("autograd", "pyhessian"):
        assert rel(tb.hessian(model, data=batch, closure=poisson_closure, method=method)
                   .to_dense(), H) <= 1e-10
    with pytest.raises(RuntimeError, match="method='func' cannot differentiate this closure"):
        tb.hessian(model, data=batch, closure=poisson_closure, method="func")
    # the loss and its gradient at theta (loss landscapes, gradient overlaps) take closures too
    params = list(model.parameters())
    grad = torch.autograd.grad(poisson_closure(model, batch), params, materialize_grads=True)
    assert rel(op.gradient(), torch.cat([g.reshape(-1) for g in grad])) <= 1e-12
    assert op.loss_at(torch.zeros(op.n, dtype=DT)) == op.loss


def _poisson_by_hand(model, params, batch):
    """The same loss with the parameters substituted by hand (functional_call of the model)."""
    x = batch["interior"].detach().requires_grad_(True)
    u = torch.func.functional_call(model, params, (x,))
    du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
    d2u = torch.autograd.grad(du.sum(), x, create_graph=True)[0]
    f = -(torch.pi**2) * torch.sin(torch.pi * x)
    boundary = torch.func.functional_call(model, params, (batch["boundary"],))
    return ((d2u - f) ** 2).mean() + (boundary**2).mean()


# ---------------------------------------------------------------------- a model with its own loss
@dataclasses.dataclass
class Output:
    loss: torch.Tensor | None
    logits: torch.Tensor


class TinyClassifier(torch.nn.Module):
    """Mimics a Hugging Face model: ``model(**batch)`` with labels inside, returns ``.loss``."""

    def __init__(self, features=4, classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = torch.nn.Linear(features, 5)
        self.head = torch.nn.Linear(5, classes)

    def forward(self, features, labels=None, temperature=None):
        logits = self.head(torch.tanh(self.body(features)))
        if temperature is not None:
            logits = logits / temperature[0]
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return Output(loss=loss, logits=logits)


def own_loss(model, batch):
    return model(**batch).loss


def _classification_data(n=13, sizes=(5, 5, 3)):
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(n, 4, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (n,), generator=gen)
    edges = [0]
    for s in sizes:
        edges.append(edges[-1] + s)
    return X, y, [(X[a:b], y[a:b]) for a, b in zip(edges[:-1], edges[1:])]


@pytest.mark.parametrize("method", ["auto", "func", "autograd"])
def test_model_with_own_loss_over_unequal_dict_batches(method):
    model = TinyClassifier().to(DT)
    X, y, pairs = _classification_data()
    batches = [{"features": xb, "labels": yb} for xb, yb in pairs]  # sizes 5, 5, 3
    # reference: the mean over all 13 samples in one evaluation
    H = dense_reference(
        model, lambda p: F.cross_entropy(
            torch.func.functional_call(model, p, (X,)).logits, y
        )
    )
    op = tb.hessian(model, data=batches, closure=own_loss, method=method)
    assert op.num_samples == 13 and op.dataset.batch_sizes == [5, 5, 3]
    err = rel(op.to_dense(), H)
    print(f"model(**batch).loss, batches 5/5/3, method={method}: rel err {err:.2e}")
    assert err <= 1e-10
    full = F.cross_entropy(model(X).logits, y)
    assert abs(op.loss - float(full)) <= 1e-12 * float(full)


def test_batch_size_callable_sets_the_weights():
    """A first tensor without the batch dimension gives the wrong weights; batch_size= fixes it."""
    model = TinyClassifier().to(DT)
    X, y, pairs = _classification_data()
    one = torch.ones(2, dtype=DT)  # first in the dict: leading dimension 2 for every batch
    batches = [{"temperature": one, "features": xb, "labels": yb} for xb, yb in pairs]
    H = dense_reference(
        model, lambda p: F.cross_entropy(torch.func.functional_call(model, p, (X,)).logits, y)
    )
    wrong = tb.hessian(model, data=batches, closure=own_loss, method="func")
    assert wrong.dataset.batch_sizes == [2, 2, 2]
    assert rel(wrong.to_dense(), H) > 1e-3  # a mean of batch means, not the data-set mean
    right = tb.hessian(
        model, data=batches, closure=own_loss, method="func",
        batch_size=lambda b: b["labels"].shape[0],
    )
    assert right.dataset.batch_sizes == [5, 5, 3]
    assert rel(right.to_dense(), H) <= 1e-10


# ---------------------------------------------------------------------- a regularised loss
def test_l2_regularised_loss():
    model = mlp([4, 5, 3])
    X, y, pairs = _classification_data()
    lam = 0.3

    def regularised(m, batch):
        inputs, targets = batch
        penalty = sum((p**2).sum() for p in m.parameters())
        return F.cross_entropy(m(inputs), targets) + lam * penalty

    def by_hand(p):
        out = torch.func.functional_call(model, p, (X,))
        return F.cross_entropy(out, y) + lam * sum((t**2).sum() for t in p.values())

    H = dense_reference(model, by_hand)
    op = tb.hessian(model, data=pairs, closure=regularised)
    err = rel(op.to_dense(), H)
    print(f"CE + lambda |theta|^2 over batches 5/5/3: rel err {err:.2e}")
    assert err <= 1e-10
    plain = tb.hessian(model, torch.nn.CrossEntropyLoss(), pairs, method="func")
    shift = op.to_dense() - plain.to_dense()  # the regulariser's Hessian: 2 lambda I
    assert float((shift - 2 * lam * torch.eye(op.n, dtype=DT)).abs().max()) <= 1e-12


# ---------------------------------------------------------------------- closure == loss_fn
@pytest.mark.parametrize("method", ["func", "autograd"])
def test_closure_agrees_with_outputs_targets_operator(method):
    model = mlp([4, 5, 3])
    _, _, pairs = _classification_data()
    CE = torch.nn.CrossEntropyLoss()
    pair_op = tb.hessian(model, CE, pairs, method=method)
    closure_op = tb.hessian(
        model, data=pairs, closure=lambda m, b: CE(m(b[0]), b[1]), method=method
    )
    A, B = closure_op.to_dense(), pair_op.to_dense()
    err = float((A - B).abs().max() / B.abs().max())
    print(f"closure vs (outputs, targets), method={method}: max rel diff {err:.2e}")
    assert err <= 1e-12
    assert abs(closure_op.loss - pair_op.loss) <= 1e-12 * pair_op.loss
    # reduction="sum": a closure that sums is weighted 1 per batch
    SUM = torch.nn.CrossEntropyLoss(reduction="sum")
    summed = tb.hessian(
        model, data=pairs, closure=lambda m, b: SUM(m(b[0]), b[1]), reduction="sum",
        method=method,
    )
    ref = tb.hessian(model, SUM, pairs, method=method).to_dense()
    assert float((summed.to_dense() - ref).abs().max() / ref.abs().max()) <= 1e-12


def test_dispatch_checkpoint_and_algorithms(tmp_path):
    model = TinyClassifier().to(DT)
    _, _, pairs = _classification_data()
    batches = [{"features": xb, "labels": yb} for xb, yb in pairs]
    op = dualhess.hessian(model, data=batches, closure=own_loss)
    # a mapping that is not a dict (a Hugging Face BatchEncoding is a UserDict) is one batch
    from collections import UserDict

    as_mappings = [UserDict(b) for b in batches]
    same = tb.hessian(model, data=as_mappings, closure=own_loss, method="func")
    assert same.dataset.batch_sizes == [5, 5, 3]
    assert float((same.to_dense() - op.to_dense()).abs().max()) <= 1e-12 * op.to_dense().abs().max()
    dense = torch.linalg.eigvalsh(op.to_dense())
    top = dualhess.eigsh(op, k=2, seed=0, checkpoint=str(tmp_path / "run.npz"))
    assert torch.allclose(torch.as_tensor(top.values[::-1].copy()), dense[-2:], rtol=1e-8)


# ---------------------------------------------------------------------- guarantees and errors
def test_errors_and_refusals():
    model = TinyClassifier().to(DT)
    X, y, pairs = _classification_data()
    batches = [{"features": xb, "labels": yb} for xb, yb in pairs]
    for build in (tb.ggn, tb.fisher):
        with pytest.raises(TypeError, match="a closure cannot define this curvature"):
            build(model, data=batches, closure=own_loss)
    with pytest.raises(TypeError, match="not both"):
        tb.hessian(model, torch.nn.CrossEntropyLoss(), batches, closure=own_loss)
    with pytest.raises(TypeError, match="no loss"):
        tb.hessian(model, data=batches)
    with pytest.raises(ValueError, match="must return a scalar tensor"):
        tb.hessian(model, data=batches, closure=lambda m, b: m(**b).logits)
    with pytest.raises(ValueError, match="reduction must be"):
        tb.hessian(model, data=batches, closure=own_loss, reduction="none")
    bad = [dict(b) for b in batches]
    bad[1]["features"] = bad[1]["features"].clone()
    bad[1]["features"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tb.hessian(model, data=bad, closure=own_loss)
    with pytest.raises(dualhess.ExactUnavailableError, match="closure"):
        tb.hessian(model, data=batches, closure=own_loss).exact_diagonal()

    class Reshuffled:  # a different order in every pass
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            return iter(batches if self.passes % 2 else batches[::-1])

    with pytest.raises(ValueError, match="differ between two passes"):
        tb.hessian(model, data=Reshuffled(), closure=own_loss)
    with pytest.raises(ValueError, match="batch_size"):
        tb.hessian(model, data=[{"x": torch.tensor(1.0, dtype=DT)}], closure=lambda m, b: b["x"])


# ---------------------------------------------------------------------- docs/losses.md runs
def _doc_blocks():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "losses.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.mark.parametrize("index", range(len(_doc_blocks())))
def test_losses_doc_examples_run(index, tmp_path):
    import os
    import subprocess
    import sys

    code = _doc_blocks()[index]
    if "import jax" in code:
        pytest.importorskip("jax")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "False" not in proc.stdout, proc.stdout


# ---------------------------------------------------------------------- torch.distributed
_WORKER = '''
import torch
import torch_backend as tb
from _dist_launch import finish, init  # per-rank result, ordered teardown, os._exit (issue 23)
from test_closure import TinyClassifier, _classification_data, own_loss

rank = init()
X, y, _ = _classification_data()
# uneven shards of dict batches: rank 0 holds 5 + 3 samples, rank 1 the other 5
rows = [slice(0, 5), slice(5, 8)] if rank == 0 else [slice(8, 13)]
shard = [{"features": X[r], "labels": y[r]} for r in rows]
op = tb.hessian(TinyClassifier().double(), data=shard, closure=own_loss, method="func")
v = torch.linspace(-1, 1, op.n, dtype=torch.float64)
finish({"hv": op.matvec(v).tolist(), "loss": op.loss, "num_samples": op.num_samples})
'''


def test_closure_under_torch_distributed(tmp_path):
    import sys
    from pathlib import Path

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from _dist_launch import launch  # a file-store launch that cannot abort at exit (issue 23)

    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    ranks = launch(worker, workdir=tmp_path)
    assert ranks[0] == ranks[1]  # every rank holds the whole-data-set product
    got = ranks[0]
    X, y, pairs = _classification_data()
    batches = [{"features": xb, "labels": yb} for xb, yb in pairs]
    op = tb.hessian(TinyClassifier().to(DT), data=batches, closure=own_loss, method="func")
    ref = op.matvec(torch.linspace(-1, 1, op.n, dtype=DT))
    assert got["num_samples"] == 13
    assert got["loss"] == pytest.approx(op.loss, rel=1e-12)
    assert rel(torch.tensor(got["hv"], dtype=DT), ref) <= 1e-12
