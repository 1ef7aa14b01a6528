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

from typing import Any

import torch

from dualhess import ParamLayout

from ._data import Batch, Objective

__all__ = ["ENGINES", "FuncEngine", "AutogradEngine", "PyHessianEngine", "columns_to_dict"]


def columns_to_dict(layout: ParamLayout, V: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split a flat ``(n, k)`` block into ``{name: (k, *shape)}``."""
    k = V.shape[1]
    return {e.name: V[e.start : e.stop].T.reshape((k, *e.shape)) for e in layout}


def dict_to_columns(layout: ParamLayout, parts: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    """Join ``{name: (k, *shape)}`` into a flat ``(n, k)`` block."""
    return torch.cat([parts[e.name].reshape(k, -1) for e in layout], dim=1).T


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
        tangents = self.layout.split(v)
        out = torch.zeros_like(v)
        for weight, batch in self.objective.dataset.batches():
            hv = self._hvp(batch, tangents)
            out += weight * torch.cat([hv[e.name].reshape(-1) for e in self.layout])
        return out

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        k = V.shape[1]
        tangents = columns_to_dict(self.layout, V)
        out = torch.zeros_like(V)
        for weight, batch in self.objective.dataset.batches():
            hv = torch.func.vmap(lambda t, b=batch: self._hvp(b, t))(tangents)
            out += weight * dict_to_columns(self.layout, hv, k)
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
        parts = [v[e.start : e.stop].reshape(e.shape) for e in self.layout]
        out = torch.zeros_like(v)
        for graph in self._graphs():
            hv = self._product(graph, parts, batched=False)
            out += torch.cat([h.reshape(-1) for h in hv])
        return out

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        k = V.shape[1]
        parts_dict = columns_to_dict(self.layout, V)
        parts = [parts_dict[e.name] for e in self.layout]
        out = torch.zeros_like(V)
        for graph in self._graphs():
            if self.batched:
                try:
                    hv = self._product(graph, parts, batched=True)
                    out += torch.cat([h.reshape(k, -1) for h in hv], dim=1).T
                    continue
                except RuntimeError:
                    # batched double backward is not implemented for every layer (GroupNorm
                    # on torch 2.x): fall back to one column at a time from now on
                    self.batched = False
            for j in range(k):
                hv = self._product(graph, [p[j] for p in parts], batched=False)
                out[:, j] += torch.cat([h.reshape(-1) for h in hv])
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
