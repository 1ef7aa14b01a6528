"""The torch side of a rewritten export: a module whose forward is the exported program.

When the export passes change the function (float32 islands promoted to float64), torch must
differentiate the same program as the twin for a cross-check to mean anything.
:class:`ReferenceModel` holds the model's own parameters under the model's own names (its
children are the model's children), and its forward exports the model for each input
signature with the same passes and evaluates that program with torch
(:func:`jax_backend.twin._export.torch_callable`), reading the parameters at call time, so
``torch.func.functional_call`` and autograd see them (the program itself is exported from a
private copy of the model, once per input signature).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ._export import export_graph, torch_callable

__all__ = ["ReferenceModel"]


class ReferenceModel(torch.nn.Module):
    """``model`` with its forward replaced by its exported, rewritten program.

    Parameters
    ----------
    model : torch.nn.Module
        The (already float64) model; its parameters and submodules are shared, not copied.
    promote : bool
        Promote float32 islands to float64 (see :func:`~jax_backend.twin._export.export_graph`).
    """

    def __init__(self, model: torch.nn.Module, *, promote: bool = True) -> None:
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model._parameters.items():
            self.register_parameter(name, param)
        for name, buf in model._buffers.items():
            self.register_buffer(name, buf, persistent=name not in model._non_persistent_buffers_set)
        self.__dict__["_source"] = model
        # exported from a private copy: while functional_call swaps tensors into the shared
        # submodules, the model itself would not export its parameters as parameters
        self.__dict__["_export_copy"] = copy.deepcopy(model)
        self.__dict__["_promote"] = promote
        self.__dict__["_programs"] = {}
        self._names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
        self.train(model.training)

    def _program(self, inputs: Any) -> Any:
        leaves, spec = pytree.tree_flatten(inputs)
        key = (str(spec), tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else x
                                for x in leaves))
        found = self._programs.get(key)
        if found is None:
            graph = export_graph(self._export_copy, (inputs,), None, promote=self._promote, fold=False)
            found = self._programs[key] = torch_callable(graph)
        return found

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inputs = dict(kwargs) if kwargs else (args[0] if len(args) == 1 else tuple(args))
        with torch.no_grad():
            program = self._program(inputs)
        # the parameters as they are now (swapped in by functional_call, or the real ones)
        current = {n: functools.reduce(getattr, n.split("."), self) for n in self._names}
        return program(current, inputs)

    def __repr__(self) -> str:
        return f"ReferenceModel({type(self._source).__name__}, promote={self._promote})"

