"""The Hessian of a PyTorch model's loss over a whole data set, as a :class:`dualhess.Operator`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import dualhess

from ._data import Problem, resolve_reduction
from ._distributed import all_reduce_sum, unwrap_ddp
from ._engines import ENGINES, choose_engines
from ._memory import resolve_auto_chunk
from ._params import ParamSpec, check_model_mode, prepare_model, select_params

__all__ = ["hessian", "HessianOperator", "TorchCurvatureOperator", "build_problem"]

METHODS = ("auto", "func", "autograd", "pyhessian")


def build_problem(
    model: torch.nn.Module,
    loss_fn: Callable[..., Any],
    data: Any,
    *,
    params: ParamSpec,
    dtype: torch.dtype | None,
    device: Any,
    reduction: str | None,
    check_deterministic: bool,
) -> tuple[Problem, dualhess.ParamLayout, dict, dict]:
    """Shared construction of every torch curvature operator (see :func:`hessian`)."""
    reduction = resolve_reduction(loss_fn, reduction)
    model = unwrap_ddp(model)
    work, dtype_, device_, converted = prepare_model(model, dtype, device)
    check_model_mode(work)
    layout, selected, fixed = select_params(work, params)
    problem = Problem(
        work,
        loss_fn,
        data,
        reduction=reduction,
        dtype=dtype_,
        device=device_,
        convert=converted,
        check_deterministic=check_deterministic,
    )
    problem.loss_value = problem.total_loss({**fixed, **selected})
    return problem, layout, selected, fixed


def _reduced(local: Callable[..., torch.Tensor], group: Any) -> Callable[..., torch.Tensor]:
    def reduced(*args: Any) -> torch.Tensor:
        return all_reduce_sum(local(*args).contiguous(), group)

    return reduced


class TorchCurvatureOperator(dualhess.Operator):
    """Base class of the torch curvature operators (flat torch vectors on the model's device).

    Attributes
    ----------
    layout : dualhess.ParamLayout
        Names (from ``model.named_parameters()``), shapes and slices of the flat vector.
    problem : torch_backend.data.Problem
        Model, loss and data.
    loss : float
        The whole-data-set loss at the current parameters.
    num_samples : int
        ``N``, the number of samples.
    """

    curvature = ""

    def __init__(
        self,
        problem: Problem,
        layout: dualhess.ParamLayout,
        selected: dict[str, torch.Tensor],
        fixed: dict[str, torch.Tensor],
        chunk_size: int | None,
    ) -> None:
        self.problem = problem
        self.layout = layout
        self.selected = selected
        self.fixed = fixed
        super().__init__(
            (layout.size, layout.size),
            problem.dtype,
            like=torch.zeros(0, dtype=problem.dtype, device=problem.device),
            chunk_size=chunk_size,
        )
        if problem.group is not None:
            self._reduce_over_ranks(problem.group)

    def _reduce_over_ranks(self, group: Any) -> None:
        """Under torch.distributed: every product (and exact diagonal) is summed over ranks.

        The subclass's own local products are wrapped on the instance, so each rank computes
        its shard's weighted contribution and ``all_reduce`` makes the whole-data-set result.
        """
        cls = type(self)
        for name in ("_matvec", "_matmat", "exact_diagonal"):
            if getattr(cls, name) is getattr(dualhess.Operator, name):
                continue  # inherited default: it calls a wrapped method already

            setattr(self, name, _reduced(getattr(self, name), group))

    @property
    def loss(self) -> float:
        return self.problem.loss_value

    @property
    def num_samples(self) -> int:
        return self.problem.num_samples

    @property
    def reduction(self) -> str:
        return self.problem.reduction

    @property
    def params_flat(self) -> torch.Tensor:
        """The selected parameters the curvature is taken at, as one flat vector."""
        return self.layout.join(self.selected)

    def _shifted(self, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        shape = tuple(getattr(delta, "shape", ()))
        if shape != (self.n,):
            raise dualhess.OperatorError(
                f"{type(self).__name__}: expected a flat shift of shape ({self.n},) in the "
                f"order of op.layout, got shape {shape}"
            )
        delta = delta.detach().to(dtype=self.dtype, device=self.problem.device)
        parts = self.layout.split(delta)
        moved = {name: value + parts[name] for name, value in self.selected.items()}
        return {**self.fixed, **moved}

    def loss_at(self, delta: torch.Tensor) -> float:
        """The whole-data-set loss at ``theta + delta`` (same data and weights as the products).

        Parameters
        ----------
        delta : torch.Tensor, shape (n,)
            The shift of the selected parameters, in the order of ``op.layout``.

        Examples
        --------
        >>> import torch
        >>> from torch_backend import hessian
        >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> op = hessian(torch.nn.Linear(3, 2), torch.nn.CrossEntropyLoss(), (X, y))
        >>> op.loss_at(torch.zeros(op.n)) == op.loss
        True
        """
        return float(self.problem.total_loss(self._shifted(delta)))

    def gradient(self) -> torch.Tensor:
        """The gradient of the whole-data-set loss at ``theta``, a flat ``(n,)`` tensor.

        Each batch's gradient is weighted as in the products (exact per-sample mean over
        unequal batches); under ``torch.distributed`` it is summed over the ranks.
        """
        names = list(self.selected)
        total = torch.zeros(self.n, dtype=self.dtype, device=self.problem.device)
        for weight, batch in self.problem.batches():
            leaves = {name: self.selected[name].detach().requires_grad_(True) for name in names}
            with torch.enable_grad():
                loss = self.problem.batch_loss({**self.fixed, **leaves}, batch)
                grads = torch.autograd.grad(loss, [leaves[name] for name in names],
                                            allow_unused=True)
            flat = torch.cat([
                torch.zeros(leaves[name].numel(), dtype=self.dtype, device=total.device)
                if g is None else g.reshape(-1) for name, g in zip(names, grads)
            ])
            total = total + weight * flat.detach()
        return all_reduce_sum(total, self.problem.group)

    def split(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector into ``{parameter name: tensor of the parameter's shape}``."""
        return self.layout.split(vec)

    def join(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Join ``{parameter name: tensor}`` into a flat vector (layout order)."""
        return self.layout.join(parts)

    def _check_deterministic(self, seed: int = 0) -> None:
        """Two products of the same vector must agree; raise with the likely causes otherwise."""
        rng = np.random.default_rng(seed)
        v = self.asarray(rng.standard_normal(self.n))
        first, second = self._matvec(v), self._matvec(v)
        scale = float(torch.linalg.vector_norm(first))
        diff = float(torch.linalg.vector_norm(first - second))
        tol = float(torch.finfo(self.dtype).eps) ** 0.5 * max(scale, 1e-30)
        if not diff <= tol:
            raise ValueError(
                f"{type(self).__name__}: two products of the same vector differ "
                f"(relative difference {diff / max(scale, 1e-300):.2e}), so the operator is not "
                "fixed. Likely causes: a shuffled DataLoader (shuffle=True) or random data "
                "augmentation, Dropout or other randomness in the forward pass (call "
                "model.eval()), or non-deterministic kernels (torch.use_deterministic_algorithms"
                "(True)). Pass check_deterministic=False to skip this check."
            )

    def _exact(self, curvature: str) -> torch.Tensor:
        from ._backpack import backpack_diagonal

        return backpack_diagonal(self.problem, self.layout, curvature)


class HessianOperator(TorchCurvatureOperator):
    """The Hessian of the whole-data-set loss with respect to the selected parameters.

    Build it with :func:`hessian`. ``method`` records the HVP engine of ``matvec`` (the one
    chosen by ``"auto"``), ``matmat_method`` that of ``matmat`` (``"autograd (columns)"``: one
    product per column), ``method_timings`` the seconds per product measured by ``"auto"`` and
    ``method_failures`` why a probe failed or was skipped.
    """

    curvature = "hessian"

    def __init__(self, problem, layout, selected, fixed, *, method, chunk_size) -> None:
        super().__init__(problem, layout, selected, fixed, chunk_size)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method_timings: dict[str, float] = {}
        self.method_failures: dict[str, str] = {}
        self.matmat_method = method
        if method == "auto":
            method, self._engine = self._choose_method()
        else:
            self._engine = ENGINES[method](problem, layout, selected, fixed)
        self.method = method

    def _choose_method(self) -> tuple[str, Any]:
        """Pick the ``matvec`` and ``matmat`` engines from single products (see
        :func:`torch_backend._engines.choose_engines`: a few products' worth, with a margin).
        The products made double as the determinism check."""
        v = self.asarray(np.random.default_rng(0).standard_normal(self.n))
        best, self.matmat_method, engine, timings, failures, probe = choose_engines(
            self.problem, self.layout, self.selected, self.fixed, v
        )
        self.method_timings.update(timings)
        self.method_failures.update(failures)
        self._probe = probe
        return best, engine

    def _check_deterministic(self, seed: int = 0) -> None:
        """Reuse the two products ``"auto"`` made of one vector (two engines, same matrix);
        where they differ, or only one was made, compare two products of the chosen one."""
        probe, self._probe = getattr(self, "_probe", None), None
        if seed == 0 and probe is not None and probe[2] is not None:
            _, first, second = probe
            scale = float(torch.linalg.vector_norm(first))
            diff = float(torch.linalg.vector_norm(first - second))
            if diff <= float(torch.finfo(self.dtype).eps) ** 0.5 * max(scale, 1e-30):
                return
        super()._check_deterministic(seed)

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self._engine.matvec(v)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self._engine.matmat(V)

    def exact_diagonal(self) -> torch.Tensor:
        """The exact Hessian diagonal with BackPACK's ``DiagHessian`` (whole data set).

        Raises
        ------
        dualhess.ExactUnavailableError
            When BackPACK cannot handle the model or the loss.
        """
        return self._exact("hessian")

    def __repr__(self) -> str:
        return (
            f"HessianOperator(n={self.n}, dtype={self.dtype}, method={self.method!r}, "
            f"num_samples={self.num_samples}, num_matvecs={self.num_matvecs})"
        )


def hessian(
    model: torch.nn.Module,
    loss_fn: Callable[..., Any],
    data: Any,
    *,
    params: ParamSpec = None,
    method: str = "auto",
    chunk_size: int | str | None = None,
    dtype: torch.dtype | None = None,
    device: Any = None,
    reduction: str | None = None,
    check_deterministic: bool = True,
) -> HessianOperator:
    """The Hessian of a model's loss over a whole data set, as a matrix-free operator.

    Parameters
    ----------
    model : torch.nn.Module
        Any module. It is evaluated with :func:`torch.func.functional_call` on detached copies
        of its parameters: its parameters, ``.grad``, hooks and train/eval mode are never
        changed. BatchNorm or Dropout in train mode is refused with an error asking for
        ``model.eval()`` (batch statistics and random masks do not define a fixed operator).
    loss_fn : callable
        An ``nn`` loss module (its ``reduction`` is read) or any callable
        ``(outputs, targets) -> scalar``.
    data : (inputs, targets) or iterable of batches
        One batch (inputs a tensor, a tuple or a dict of tensors) or e.g. a ``DataLoader``
        with ``shuffle=False``. The operator is the Hessian of the loss of the whole data set,
        each batch weighted by its size (exact with an unequal last batch).
    params : list of str or callable, optional
        Parameter names, or a predicate on names: the Hessian block of those parameters.
        Default: all parameters with ``requires_grad``.
    method : {"auto", "func", "autograd", "pyhessian"}
        HVP engine (see :mod:`torch_backend.engines`). ``"auto"`` times ``func`` and
        ``autograd`` at construction and keeps the faster (``op.method``).
    chunk_size : int or "auto", optional
        Columns per vectorised call in ``matmat``: peak memory is about ``chunk_size`` x one
        product. ``"auto"`` measures one product's memory and picks the largest chunk that
        fits in the free device memory (:mod:`torch_backend.memory`).
    dtype : torch.dtype, optional
        Analyse a copy of the model and data in this dtype (e.g. ``torch.float64``).
    device : torch.device or str, optional
        Analyse a copy of the model, and the data, on this device.
    reduction : {"mean", "sum"}, optional
        For a plain callable ``loss_fn`` only (default ``"mean"``): whether it averages or
        sums over the samples of a batch. Read from ``loss_fn.reduction`` for loss modules.
    check_deterministic : bool
        At construction, iterate the data twice and compare, and compare two products of
        the same vector (default True). Costs one data pass and two products.

    Returns
    -------
    HessianOperator
        ``op.matvec``/``op.matmat`` on flat tensors; ``op.layout``, ``op.split``,
        ``op.join``; ``op.exact_diagonal()`` through BackPACK where possible.

    Examples
    --------
    >>> import torch, dualhess
    >>> from torch_backend import hessian
    >>> model = torch.nn.Linear(3, 2)
    >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> op = hessian(model, torch.nn.CrossEntropyLoss(), (X, y), dtype=torch.float64)
    >>> op.shape
    (8, 8)
    """
    problem, layout, selected, fixed = build_problem(
        model,
        loss_fn,
        data,
        params=params,
        dtype=dtype,
        device=device,
        reduction=reduction,
        check_deterministic=check_deterministic,
    )
    auto = chunk_size == "auto"
    op = HessianOperator(
        problem, layout, selected, fixed, method=method, chunk_size=None if auto else chunk_size
    )
    resolve_auto_chunk(op, chunk_size)
    if check_deterministic:
        op._check_deterministic()
    return op
