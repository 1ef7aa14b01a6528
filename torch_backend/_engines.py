"""Hessian-vector product engines: ``"func"``, ``"autograd"`` and ``"pyhessian"``.

Every engine computes ``H @ V`` for a flat ``(n, k)`` block, where ``H`` is the Hessian of
the whole-data-set loss of an :class:`~torch_backend._data.Objective` with respect to the selected
parameters. They differ only in how the product is formed:

* ``"func"``: forward-over-reverse, ``jvp(grad(loss))`` with :mod:`torch.func`; ``matmat``
  vectorises the columns with ``vmap``.
* ``"autograd"``: double backward (Pearlmutter's trick), ``grad(grad(loss) . v)``; the columns
  of ``matmat`` go through one batched backward (``is_grads_batched=True``) with a
  column-by-column fallback for layers whose batched backward fails (GroupNorm). For a single
  batch the first-order graph is built once and reused.
* ``"pyhessian"``: PyHessian 0.1's own ``pyhessian.utils.hessian_vector_product`` on the
  first-order graph, batches weighted by size as in ``PyHessian.dataloader_hv_product``, so
  PyHessian's numbers are reproduced.

References
----------
B. A. Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 6 (1994).
Z. Yao, A. Gholami, K. Keutzer, M. Mahoney, "PyHessian: Neural networks through the lens of
the Hessian", IEEE BigData (2020).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from dualhess import ParamLayout

from ._data import Batch, Objective, differentiable_attention

__all__ = [
    "ENGINES",
    "FuncEngine",
    "AutogradEngine",
    "PyHessianEngine",
    "ColumnsEngine",
    "TimedMatmatEngine",
    "ChosenEngine",
    "choose_engines",
]

#: The clock ``choose_engines`` times products with (a module attribute, so tests can patch it).
_clock: Callable[[], float] = time.perf_counter

#: ``"func"`` replaces ``"autograd"`` only when its first product takes at most this fraction
#: of autograd's: a margin, so that machine noise does not flip the choice between runs.
FUNC_MARGIN = 0.8

#: A batched product of ``b`` columns is kept for ``matmat`` only when its cost per column is
#: at most this fraction of one single product (same reason).
BATCH_MARGIN = 0.8



class _Engine:
    name = ""

    def __init__(
        self,
        objective: Objective,
        layout: ParamLayout,
        selected: dict[str, torch.Tensor],
        fixed: dict[str, torch.Tensor],
    ) -> None:
        self.objective = objective
        self.layout = layout
        self.selected = selected
        self.fixed = fixed

    def matmat(self, V: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matmat(v.reshape(-1, 1)).reshape(-1)


class FuncEngine(_Engine):
    """Forward-over-reverse HVP with :mod:`torch.func` (``jvp`` of ``grad``), vmapped."""

    name = "func"

    def _hvp(self, batch: Batch, tangents: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        fixed, objective = self.fixed, self.objective

        def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return objective.batch_loss({**fixed, **p}, batch)

        try:
            return torch.func.jvp(torch.func.grad(loss), (self.selected,), (tangents,))[1]
        except RuntimeError as exc:
            if objective.is_closure and "functorch" in str(exc):
                raise RuntimeError(
                    "method='func' cannot differentiate this closure: it runs under torch.func "
                    "transforms, inside which torch.autograd.grad and requires_grad_ (e.g. the "
                    "input derivatives of a physics-informed loss) are not supported. Use "
                    "method='autograd' (double backward), or method='auto', which picks an "
                    f"engine that works. ({str(exc).splitlines()[0][:160]})"
                ) from exc
            raise

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        tangents = self.layout.split(v.contiguous())  # see AutogradEngine.matvec
        out = None
        for weight, batch in self.objective.dataset.batches():
            flat = self.layout.join(self._hvp(batch, tangents)).mul_(weight)
            out = flat if out is None else out.add_(flat)
            del flat
        return torch.zeros_like(v) if out is None else out

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        tangents = self.layout.split_columns(V)
        out = torch.zeros_like(V)
        for weight, batch in self.objective.dataset.batches():
            hv = torch.func.vmap(lambda t, b=batch: self._hvp(b, t))(tangents)
            out += weight * self.layout.join_columns(hv)
        return out


class AutogradEngine(_Engine):
    """Double-backward HVP with :func:`torch.autograd.grad`, batched over columns."""

    name = "autograd"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batched = True
        self._cache: list[Any] | None = None
        if self.objective.dataset.single:
            self._cache = [self._graph(w, b) for w, b in self.objective.dataset.batches()]

    def _graph(self, weight: float, batch: Batch) -> tuple[list[torch.Tensor], list, list[int]]:
        """First-order graph of one batch: leaves, connected gradients and their indices."""
        leaves = [t.detach().requires_grad_(True) for t in self.selected.values()]
        with torch.enable_grad():
            params = {**self.fixed, **dict(zip(self.selected, leaves))}
            loss = self.objective.batch_loss(params, batch) * weight
            # under the forward's attention kernels: an activation-checkpointed block
            # (torch.utils.checkpoint, Hugging Face gradient_checkpointing_enable) recomputes
            # its forward during this backward and must pick the same kernels
            with differentiable_attention():
                grads = torch.autograd.grad(
                    loss, leaves, create_graph=True, allow_unused=True, materialize_grads=True
                )
        used = [i for i, g in enumerate(grads) if g.requires_grad]
        return leaves, [grads[i] for i in used], used

    def _graphs(self):
        if self._cache is not None:
            yield from self._cache
        else:
            for weight, batch in self.objective.dataset.batches():
                yield self._graph(weight, batch)

    def _product(self, graph: Any, parts: list[torch.Tensor], batched: bool) -> list[torch.Tensor]:
        leaves, grads, used = graph
        if not grads:
            return [torch.zeros_like(p) for p in parts]
        with differentiable_attention():  # checkpointed blocks recompute here (see _graph)
            return list(
                torch.autograd.grad(
                    grads,
                    leaves,
                    grad_outputs=[parts[i] for i in used],
                    retain_graph=True,
                    allow_unused=True,
                    materialize_grads=True,
                    is_grads_batched=batched,
                )
            )

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        # A Krylov basis hands over its columns as strided views (stride = basis width); a
        # backward with strided grad_outputs measured 2x the CPU time of a contiguous one
        # (tiny ViT, n = 81,226), so one copy of n numbers first.
        v = v.contiguous()
        parts = list(self.layout.split(v).values())  # each block on its parameter's device
        # No zero vector to accumulate into, and no concatenation beside the blocks: the first
        # batch's blocks are copied into the output one by one, each released once copied
        # (GPT-2 small: a product's peak 3.2 GB -> 2.8 GB -> 2.3 GB, one 475 MB vector each).
        out = None
        for graph in self._graphs():
            blocks = self._product(graph, parts, batched=False)
            if out is None:
                out = self.layout.join_releasing(blocks)
            else:
                out.add_(self.layout.join_releasing(blocks))
        return torch.zeros_like(v) if out is None else out

    def matmat(self, V: torch.Tensor, *, batched: bool | None = None) -> torch.Tensor:
        """``H V``: each batch's first-order graph is built once (or kept) and differentiated
        for every column, in one batched backward (``batched=True``, the default while it
        works) or one backward per column (``batched=False``)."""
        k = V.shape[1]
        parts_dict = self.layout.split_columns(V)
        parts = [parts_dict[e.name] for e in self.layout]
        out = torch.zeros_like(V)
        for graph in self._graphs():
            if self.batched and batched is not False:
                try:
                    hv = self._product(graph, parts, batched=True)
                    out += self.layout.join_columns(dict(zip(self.layout.names, hv)))
                    continue
                except RuntimeError:
                    # batched double backward is not implemented for every layer (GroupNorm
                    # on torch 2.x): fall back to one column at a time from now on
                    self.batched = False
            for j in range(k):
                hv = self._product(graph, [p[j] for p in parts], batched=False)
                out[:, j] += self.layout.join(dict(zip(self.layout.names, hv)))
        return out


class PyHessianEngine(AutogradEngine):
    """PyHessian 0.1's ``hessian_vector_product`` on the first-order graph, column by column."""

    name = "pyhessian"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from pyhessian.utils import hessian_vector_product

        self._pyhessian_hvp = hessian_vector_product
        super().__init__(*args, **kwargs)
        self.batched = False

    def _graph(self, weight: float, batch: Batch) -> tuple[list[torch.Tensor], list, list[int]]:
        # PyHessian differentiates the batch loss and weights the product, not the loss
        leaves, grads, used = super()._graph(1.0, batch)
        return leaves, grads, (used, weight)  # type: ignore[return-value]

    def _product(self, graph: Any, parts: list[torch.Tensor], batched: bool) -> list[torch.Tensor]:
        leaves, grads, (used, weight) = graph
        out = [torch.zeros_like(p) for p in parts]
        if not grads:
            return out
        hv = self._pyhessian_hvp(grads, [leaves[i] for i in used], [parts[i] for i in used])
        for i, h in zip(used, hv):
            out[i] = h * float(weight)
        return out

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        cols = [self.matvec(V[:, j]) for j in range(V.shape[1])]
        return torch.stack(cols, dim=1)


ENGINES = {"func": FuncEngine, "autograd": AutogradEngine, "pyhessian": PyHessianEngine}


class ColumnsEngine:
    """``matmat`` as one ``matvec`` of ``engine`` per column (no vmap, no batched backward)."""

    def __init__(self, engine: _Engine) -> None:
        self.engine = engine
        self.name = f"{engine.name} (columns)"

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.engine.matvec(v)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.engine.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)


class TimedMatmatEngine:
    """``matmat`` of the autograd engine on a CPU when the data come in several batches.

    With several batches no first-order graph is kept, so column by column (``matvec`` per
    column) rebuilds every batch's graph for every column. Two ways build each graph once per
    call: one batched backward for all columns, or one backward per column on the graph. Which
    is faster depends on the layers (measured on 2 cores: an MLP's batched backward costs half
    the per-column one at 32 columns over 4 batches; a ResNet's costs 3.5 single products per
    column). The first ``matmat`` of at least ``2 * PROBE_COLUMNS`` columns runs
    ``PROBE_COLUMNS`` columns each way, times them, and computes the rest (and every later
    call) the faster way: no product is spent on the choice. Until then, batched.
    """

    #: Columns timed each way on the first wide enough ``matmat``.
    PROBE_COLUMNS = 4

    def __init__(self, engine: AutogradEngine) -> None:
        self.engine = engine
        self.batched: bool | None = None  # not decided yet
        self.timings: dict[str, float] = {}
        self.report: Callable[[str, dict[str, float]], None] | None = None

    @property
    def name(self) -> str:
        if self.batched is None:
            return "autograd (batched; timed against columns per graph on the first matmat)"
        return "autograd (batched)" if self.batched else "autograd (columns per graph)"

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.engine.matvec(v)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        probe = self.PROBE_COLUMNS
        if self.batched is not None or V.shape[1] < 2 * probe:
            return self.engine.matmat(V, batched=self.batched is not False)
        device = V.device
        first, batched_seconds = _timed(lambda: self.engine.matmat(V[:, :probe], batched=True),
                                        device)
        second, column_seconds = _timed(
            lambda: self.engine.matmat(V[:, probe : 2 * probe], batched=False), device)
        self.batched = batched_seconds <= column_seconds
        self.timings = {"autograd (batched, per column)": batched_seconds / probe,
                        "autograd (columns per graph, per column)": column_seconds / probe}
        if self.report is not None:
            self.report(self.name, self.timings)
        parts = [first, second]
        if V.shape[1] > 2 * probe:
            parts.append(self.engine.matmat(V[:, 2 * probe :], batched=self.batched))
        return torch.cat(parts, dim=1)


class ChosenEngine:
    """The engines ``method="auto"`` kept: one for ``matvec``, one for ``matmat``."""

    def __init__(self, matvec_engine: Any, matmat_engine: Any) -> None:
        self.matvec_engine = matvec_engine
        self.matmat_engine = matmat_engine

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec_engine.matvec(v)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.matmat_engine.matmat(V)


def _timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = _clock()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, _clock() - start


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def choose_engines(
    objective: Objective,
    layout: ParamLayout,
    selected: dict[str, torch.Tensor],
    fixed: dict[str, torch.Tensor],
    v: torch.Tensor,
    *,
    device_type: str | None = None,
) -> tuple[str, str, ChosenEngine, dict[str, float], dict[str, str], tuple]:
    """``method="auto"``: pick the ``matvec`` and ``matmat`` engines for a few products' worth.

    The rule, in this order (every product is of the same vector ``v``, so the products made
    here double as the operator's determinism check):

    1. ``autograd`` is built (its first-order graph, about one gradient, is kept for a single
       batch) and its first product of ``v`` is timed: ``t_autograd``.
    2. Off the CPU, one ``func`` product of ``v`` (forward-over-reverse, no graph to keep)
       is timed, ``t_func``. It replaces ``autograd`` for ``matvec`` only when
       ``t_func <= FUNC_MARGIN * t_autograd``: near a tie the default stays, so machine noise
       cannot flip the choice. The probe is skipped when ``t_autograd`` is below the time the
       graph took to build: a ``func`` product recomputes that gradient every time, so it
       cannot be faster. On a CPU there is no ``func`` probe (a rule, measured): with its
       graph kept, a double-backward product is one backward pass, while ``func`` recomputes
       forward and gradient with dual tensors every time; on the ResNet-18-layout network
       (2 cores) a ``func`` product took 0.93 s against 0.058 s, and its probe alone cost 16
       products' worth of construction. ``func`` is still tried on a CPU when ``autograd``
       fails (a model whose double backward is not implemented).
    3. ``matmat``: on a CPU, one vectorised product of ``b`` columns costs about ``b`` single
       ones or more (measured: the batched double backward of the ResNet-18-layout network
       3.5x the single product per column on 2 cores), so it is the ``matvec`` engine column
       by column, without a probe, where the graph is kept (one batch). With several batches
       the autograd engine keeps no graph and column by column would rebuild it per column:
       :class:`TimedMatmatEngine` times a batched backward against one backward per column
       on each graph during the first wide ``matmat`` and keeps the faster. On other devices (GPUs), where the reverse holds, one
       two-column batched product of the ``matvec`` engine is timed and kept when its cost per
       column is at most ``BATCH_MARGIN`` times one single product.

    Returns
    -------
    tuple
        ``(matvec name, matmat name, engine, timings, failures, (v, first, second))`` with the
        seconds per product by probe (``"func"``, ``"autograd"``, ``"<name> (batched, per
        column)"``), the reason each probe failed or was skipped, and two products of ``v``
        (``second`` is None when only one was made).
    """
    device = v.device
    device_type = device.type if device_type is None else device_type
    timings: dict[str, float] = {}
    failures: dict[str, str] = {}
    engines: dict[str, _Engine] = {}
    products: dict[str, torch.Tensor] = {}
    graph_time = None
    for name in ("autograd", "func"):
        if name == "func" and "autograd" in timings and device_type == "cpu":
            failures["func"] = (
                "skipped: on a CPU a double-backward product with a kept graph is the faster "
                "engine (the documented rule of choose_engines)"
            )
            continue
        if name == "func" and "autograd" in timings and graph_time is not None:
            if timings["autograd"] <= graph_time:
                failures["func"] = (
                    f"skipped: one autograd product ({timings['autograd']:.3g} s) costs less "
                    f"than building the gradient graph ({graph_time:.3g} s), which every func "
                    "product recomputes"
                )
                continue
        try:
            engine, seconds = _timed(
                lambda name=name: ENGINES[name](objective, layout, selected, fixed), device
            )
            if name == "autograd" and engine._cache is not None:
                graph_time = seconds
            products[name], timings[name] = _timed(lambda e=engine: e.matvec(v), device)
        except (RuntimeError, NotImplementedError) as exc:  # e.g. no forward-mode rule
            failures[name] = _first_line(exc)
            continue
        engines[name] = engine
    if not engines:
        hint = ""
        if any("_embedding_bag" in msg for msg in failures.values()):
            hint = (". PyTorch has no second derivative of nn.EmbeddingBag: write the bags "
                    "with nn.functional.embedding and a sum or mean, or analyse the JAX twin "
                    "(jax_backend.from_torch), which differentiates it")
        raise RuntimeError(
            "no HVP method works for this model: "
            + "; ".join(f"{k}: {msg}" for k, msg in failures.items()) + hint
        )
    if "autograd" in engines and "func" in engines:
        best = "func" if timings["func"] <= FUNC_MARGIN * timings["autograd"] else "autograd"
    else:
        best = next(iter(engines))
    first = products[best]
    others = [products[k] for k in products if k != best]
    second = others[0] if others else None
    matvec_engine = engines[best]
    matmat_engine: Any = ColumnsEngine(matvec_engine)
    if device_type != "cpu":
        V = torch.stack([v, v.flip(0)], dim=1)
        try:
            _, seconds = _timed(lambda: matvec_engine.matmat(V), device)
        except (RuntimeError, NotImplementedError) as exc:
            failures[f"{best} (batched)"] = _first_line(exc)
        else:
            timings[f"{best} (batched, per column)"] = seconds / 2
            if seconds / 2 <= BATCH_MARGIN * timings[best]:
                matmat_engine = matvec_engine
    elif best == "autograd" and matvec_engine._cache is None:
        matmat_engine = TimedMatmatEngine(matvec_engine)
    matmat_name = getattr(matmat_engine, "name", best)
    if matmat_engine is matvec_engine:
        matmat_name = f"{best} (batched)"
    return best, matmat_name, ChosenEngine(matvec_engine, matmat_engine), timings, failures, (
        v,
        first,
        second,
    )
