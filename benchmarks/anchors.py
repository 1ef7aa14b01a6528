"""The anchors: PyHessian, curvlinops, hessian-eigenthings, BackPACK and scipy on a plain HVP.

Each anchor runs on a deep copy of the task's float64 model (PyHessian and BackPACK modify
the model: ``.grad`` with a graph, hooks), and counts its own Hessian-vector products:

- PyHessian 0.1: a counting wrapper around ``pyhessian.hessian.hessian_vector_product``;
  PyHessian draws probes with ``torch.randn(p.size())`` in the *default* dtype, so it runs
  under ``torch.set_default_dtype(torch.float64)`` (float64 like everyone else);
- curvlinops: a counting wrapper around the operator's ``_matmat`` (columns);
- hessian-eigenthings: a counting ``LambdaOperator`` around its ``HessianOperator``;
- scipy: a ``LinearOperator`` whose matvec is one plain double-backward HVP through the
  gradient graph built once (``retain_graph=True``, PyHessian's product).

Every function returns ``(value, num_matvecs, operator_calls)`` or raises; the suite records
a raised exception as a failure of that anchor, with its message.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
from collections.abc import Iterator
from typing import Any

import numpy as np

from .models import Task

__all__ = ["available", "Counter", "plain_hvp_operator"]

PACKAGES = {
    "pyhessian": "pyhessian",
    "curvlinops": "curvlinops",
    "hessian-eigenthings": "hessian_eigenthings",
    "backpack": "backpack",
    "scipy": "scipy",
}


def available(tool: str) -> bool:
    """Whether the anchor's package is importable (without importing it)."""
    return importlib.util.find_spec(PACKAGES[tool]) is not None


class Counter:
    """Counts operator calls and the vectors (columns) they multiplied."""

    def __init__(self) -> None:
        self.calls = 0
        self.vectors = 0

    def add(self, vectors: int) -> None:
        self.calls += 1
        self.vectors += int(vectors)


# ---------------------------------------------------------------------- scipy on a plain HVP
def plain_hvp_operator(task: Task, counter: Counter) -> Any:
    """A scipy ``LinearOperator`` on numpy float64 vectors: one double-backward HVP per matvec."""
    import torch
    from scipy.sparse.linalg import LinearOperator

    model = copy.deepcopy(task.model)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = task.loss_fn(model(task.X), task.y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    sizes = [p.numel() for p in params]
    n = sum(sizes)

    def matvec(v: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64).reshape(-1))
        parts = [t.reshape(p.shape) for t, p in zip(torch.split(v, sizes), params)]
        Hv = torch.autograd.grad(grads, params, parts, retain_graph=True)
        counter.add(1)
        return torch.cat([h.reshape(-1) for h in Hv]).numpy()

    return LinearOperator((n, n), matvec=matvec, rmatvec=matvec, dtype=np.float64)


def scipy_top(task: Task, k: int, tol: float) -> tuple[np.ndarray, int, int]:
    """scipy ``eigsh(which="LA")`` (ARPACK) on the plain HVP, start vector from seed 0."""
    from scipy.sparse.linalg import eigsh

    counter = Counter()
    op = plain_hvp_operator(task, counter)
    v0 = np.random.default_rng(0).standard_normal(op.shape[0])
    values = eigsh(op, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    return np.sort(values)[::-1], counter.vectors, counter.calls


# ---------------------------------------------------------------------- PyHessian
@contextlib.contextmanager
def _pyhessian(task: Task) -> Iterator[tuple[Any, Counter]]:
    import importlib

    import torch

    ph = importlib.import_module("pyhessian.hessian")  # the module (the package re-exports the class)

    counter = Counter()
    original = ph.hessian_vector_product

    def counted(gradsH: Any, params: Any, v: Any) -> Any:
        counter.add(1)
        return original(gradsH, params, v)

    old_dtype = torch.get_default_dtype()
    # PyHessian draws its probes in the default dtype: make it the model's (float64 here,
    # float32 in the realistic part)
    torch.set_default_dtype(next(task.model.parameters()).dtype)
    ph.hessian_vector_product = counted
    try:
        model = copy.deepcopy(task.model)
        yield ph.hessian(model, task.loss_fn, data=(task.X, task.y), cuda=False), counter
    finally:
        ph.hessian_vector_product = original
        torch.set_default_dtype(old_dtype)


def pyhessian_top(task: Task, k: int, tol: float = 1e-3) -> tuple[np.ndarray, int, int]:
    """PyHessian's deflated power iteration (``eigenvalues(top_n=k, tol=tol)``, maxIter 100)."""
    import torch

    torch.manual_seed(0)
    with _pyhessian(task) as (h, counter):
        values, _ = h.eigenvalues(top_n=k, tol=tol)
    return np.asarray(values, dtype=np.float64), counter.vectors, counter.calls


def pyhessian_trace(task: Task, num_matvecs: int) -> tuple[float, int, int]:
    """PyHessian's Hutchinson trace, ``num_matvecs`` probes (``tol=0``: no early stop)."""
    import torch

    torch.manual_seed(0)
    with _pyhessian(task) as (h, counter):
        samples = h.trace(maxIter=num_matvecs, tol=0.0)
    return float(np.mean(samples)), counter.vectors, counter.calls


def pyhessian_density(task: Task, num_probes: int, num_steps: int) -> tuple[Any, int, int]:
    """PyHessian's SLQ ``density(iter, n_v)``; returns ``(nodes, weights)`` per probe."""
    import torch

    torch.manual_seed(0)
    with _pyhessian(task) as (h, counter):
        nodes, weights = h.density(iter=num_steps, n_v=num_probes)
    return (np.asarray(nodes), np.asarray(weights)), counter.vectors, counter.calls


# ---------------------------------------------------------------------- curvlinops
def _curvlinops(task: Task) -> tuple[Any, Counter]:
    from curvlinops import HessianLinearOperator

    model = copy.deepcopy(task.model)
    params = [p for p in model.parameters() if p.requires_grad]
    op = HessianLinearOperator(
        model, task.loss_fn, params, [(task.X, task.y)], check_deterministic=False
    )
    counter = Counter()
    original = op._matmat

    def counted(M: list[Any]) -> list[Any]:
        counter.add(M[0].shape[-1])
        return original(M)

    op._matmat = counted  # instance attribute: __matmul__ calls self._matmat
    return op, counter


def curvlinops_top(task: Task, k: int, tol: float) -> tuple[np.ndarray, int, int]:
    """scipy ``eigsh(which="LA")`` on curvlinops' ``HessianLinearOperator.to_scipy()``."""
    from scipy.sparse.linalg import eigsh

    op, counter = _curvlinops(task)
    v0 = np.random.default_rng(0).standard_normal(op.shape[0])
    values = eigsh(op.to_scipy(), k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    return np.sort(values)[::-1], counter.vectors, counter.calls


def curvlinops_trace(task: Task, num_matvecs: int) -> tuple[float, int, int]:
    """curvlinops' ``xtrace(A, num_matvecs)``."""
    import torch
    from curvlinops import xtrace

    torch.manual_seed(0)
    op, counter = _curvlinops(task)
    return float(xtrace(op, num_matvecs)), counter.vectors, counter.calls


def curvlinops_diagonal(task: Task, num_matvecs: int) -> tuple[np.ndarray, int, int]:
    """curvlinops' ``xdiag(A, num_matvecs)``."""
    import torch
    from curvlinops import xdiag

    torch.manual_seed(0)
    op, counter = _curvlinops(task)
    return xdiag(op, num_matvecs).detach().numpy(), counter.vectors, counter.calls


def curvlinops_density(task: Task, num_probes: int, num_steps: int) -> tuple[Any, int, int]:
    """curvlinops' ``lanczos_approximate_spectrum`` (Papyan 2020; boundaries by scipy eigsh)."""
    import torch
    from curvlinops import lanczos_approximate_spectrum

    torch.manual_seed(0)
    op, counter = _curvlinops(task)
    grid, values = lanczos_approximate_spectrum(op, num_steps, num_repeats=num_probes)
    return (grid.numpy(), values.numpy()), counter.vectors, counter.calls


# ---------------------------------------------------------------------- hessian-eigenthings
def _eigenthings(task: Task) -> tuple[Any, Counter]:
    import hessian_eigenthings as he

    model = copy.deepcopy(task.model)
    inner = he.HessianOperator(
        model, [(task.X, task.y)], he.supervised_loss(task.loss_fn), full_dataset=True
    )
    counter = Counter()

    def matvec(v: Any) -> Any:
        counter.add(1)
        return inner.matvec(v)

    op = he.LambdaOperator(matvec, inner.size, device=inner.device, dtype=inner.dtype)
    return op, counter


def eigenthings_top(task: Task, k: int, tol: float, max_iter: int = 50) -> tuple[np.ndarray, int, int]:
    """hessian-eigenthings' ``lanczos(k, which="LA", max_iter, tol)`` (one Lanczos run)."""
    import hessian_eigenthings as he

    op, counter = _eigenthings(task)
    result = he.lanczos(op, k=k, max_iter=max_iter, tol=tol, which="LA", seed=0)
    values = np.sort(result.eigenvalues.detach().numpy())[::-1]
    return values, counter.vectors, counter.calls


def eigenthings_trace(task: Task, num_matvecs: int) -> tuple[float, int, int]:
    """hessian-eigenthings' ``trace(num_matvecs, method="hutch++")``."""
    import hessian_eigenthings as he

    op, counter = _eigenthings(task)
    result = he.trace(op, num_matvecs=num_matvecs, method="hutch++", seed=0)
    return float(result.estimate), counter.vectors, counter.calls


def eigenthings_density(task: Task, num_probes: int, num_steps: int) -> tuple[Any, int, int]:
    """hessian-eigenthings' ``spectral_density(num_runs, lanczos_steps)``."""
    import hessian_eigenthings as he

    op, counter = _eigenthings(task)
    result = he.spectral_density(op, num_runs=num_probes, lanczos_steps=num_steps, seed=0)
    return (result.grid.numpy(), result.density.numpy()), counter.vectors, counter.calls


# ---------------------------------------------------------------------- BackPACK
def backpack_diagonal(task: Task) -> tuple[np.ndarray, int, int]:
    """BackPACK's exact ``DiagHessian`` (one extended backward pass, no HVPs)."""
    from backpack import backpack, extend
    from backpack.extensions import DiagHessian

    model = extend(copy.deepcopy(task.model))
    loss_fn = extend(copy.deepcopy(task.loss_fn))
    loss = loss_fn(model(task.X), task.y)
    with backpack(DiagHessian()):
        loss.backward()
    diag = np.concatenate([p.diag_h.detach().numpy().reshape(-1) for p in model.parameters()])
    return diag, 0, 0
