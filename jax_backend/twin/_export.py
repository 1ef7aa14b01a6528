"""Capture a torch model, optionally together with its loss, as a core-ATen graph.

The model is wrapped in a small module whose ``forward`` is ``(inputs, targets) -> loss``
(or ``inputs -> outputs``), so any Python loss works: a torch loss module, a lambda over
``out.logits``, a causal-LM shift, a Hugging Face ``ModelOutput``. The wrapper is captured
with :func:`torch.export.export` and decomposed with ``run_decompositions()`` to core ATen;
where that decomposition fails (GPT-2's reshapes after attention on torch 2.13: "Cannot view
a tensor with shape ..."), the higher-level operators in :data:`PRESERVED` are kept and get
their own JAX rules. Analyses in another precision export a converted copy of the model;
the user's model is never modified.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dualhess._errors import UnsupportedOpError

__all__ = ["ExportedGraph", "export_graph", "check_eval_mode", "model_in_dtype",
           "call_model", "source_of", "PRESERVED"]

#: Operators kept (not decomposed) when the full core-ATen decomposition fails.
PRESERVED = (
    "aten.scaled_dot_product_attention.default",
    "aten.linear.default",
    "aten.layer_norm.default",
)


def call_model(model: Any, inputs: Any) -> Any:
    """``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple/list, else ``model(inputs)``."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _wrappers() -> tuple[type, type]:
    import torch.nn as nn

    class Forward(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, inputs: Any) -> Any:
            return call_model(self.model, inputs)

    class WithLoss(nn.Module):
        def __init__(self, model: nn.Module, loss: Callable[..., Any]) -> None:
            super().__init__()
            self.model = model
            if isinstance(loss, nn.Module):
                self.loss = loss  # its buffers (class weights) become graph constants
            else:
                self.__dict__["loss"] = loss

        def forward(self, inputs: Any, targets: Any) -> Any:
            return self.loss(call_model(self.model, inputs), targets)

    return Forward, WithLoss


def check_eval_mode(model: Any) -> None:
    """Refuse Dropout and BatchNorm in training mode (random masks, batch statistics)."""
    import torch.nn as nn

    for path, sub in model.named_modules():
        if not sub.training:
            continue
        where = path or "<root>"
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.track_running_stats:
            raise ValueError(
                f"from_torch: {type(sub).__name__} at '{where}' is in training mode (batch "
                "statistics, running-stat updates); call model.eval() before converting"
            )
        if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.p > 0:
            raise ValueError(
                f"from_torch: {type(sub).__name__} at '{where}' is in training mode (random "
                "masks); call model.eval() before converting"
            )


def model_in_dtype(model: Any, dtype: Any) -> Any:
    """``model`` itself when its floating tensors already have ``dtype``, else a converted copy."""
    floats = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    if all(t.dtype == dtype for t in floats):
        return model
    return copy.deepcopy(model).to(dtype)


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)\n\s*(?P<code>.*)')


def source_of(node: Any) -> str:
    """The user's source line of a graph node (from the stack trace torch.export keeps)."""
    import torch

    trace = node.meta.get("stack_trace") or ""
    frames = list(_FRAME.finditer(trace))
    if not frames:
        return "an unknown source line (torch.export kept no stack trace)"
    torch_dir = torch.__file__.rsplit("/", 1)[0]
    user = [f for f in frames if not f["file"].startswith(torch_dir)
            and not f["file"].endswith("twin/_export.py")]
    frame = (user or frames)[-1]
    where = f'File "{frame["file"]}", line {frame["line"]}, in {frame["func"]}: {frame["code"].strip()}'
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, kind = list(stack.values())[-1]
        path = re.sub(r"^(L\['self'\]\.)?model\.?", "", str(path)) or "<root>"
        where += f" (module '{path}', {getattr(kind, '__name__', str(kind).split('.')[-1])})"
    return where


@dataclass
class ExportedGraph:
    """A decomposed :class:`torch.export.ExportedProgram` and the module it was taken from."""

    program: Any
    wrapper: Any
    decomposition: str


def _decompose(program: Any) -> tuple[Any, str]:
    import torch

    try:
        return program.run_decompositions(), "core ATen"
    except Exception:  # noqa: BLE001 - fall back to keeping higher-level operators
        pass
    table = torch.export.default_decompositions()
    for name in PRESERVED:
        _, op, overload = name.split(".")
        table.pop(getattr(getattr(torch.ops.aten, op), overload), None)
    try:
        return program.run_decompositions(table), "core ATen except " + ", ".join(PRESERVED)
    except Exception:  # noqa: BLE001 - interpret the undecomposed graph
        return program, "not decomposed (torch.export's training IR)"


def _check_random(program: Any) -> None:
    for node in program.graph.nodes:
        name = str(node.target)
        if name in ("aten.dropout.default", "aten.feature_dropout.default",
                    "aten.alpha_dropout.default", "aten.native_dropout.default"):
            p, train = node.args[1], node.args[2] if len(node.args) > 2 else True
            if train and p > 0:
                raise ValueError(
                    f"from_torch: {name.split('.')[1]}(train=True) at {source_of(node)} draws "
                    "random masks; call model.eval() before converting"
                )


def export_graph(model: Any, args: tuple[Any, ...], loss: Callable[..., Any] | None) -> ExportedGraph:
    """Export ``model`` (with ``loss``, when given) on example ``args`` and decompose it."""
    with warnings.catch_warnings():
        # torch 2.13's own pytree deprecation notice, raised inside torch.export's copies; it
        # says nothing about the user's model and would break the CLI's progress output
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        return _export_graph(model, args, loss)


def _export_graph(model: Any, args: tuple[Any, ...], loss: Callable[..., Any] | None) -> ExportedGraph:
    import torch

    forward_cls, loss_cls = _wrappers()
    wrapper = forward_cls(model) if loss is None else loss_cls(model, loss)
    wrapper.train(model.training)
    try:
        program = torch.export.export(wrapper, args, strict=False)
    except Exception as exc:  # noqa: BLE001 - torch.export's reason is the message
        what = type(model).__name__ + (" with its loss" if loss is not None else "")
        raise UnsupportedOpError(
            f"torch.export could not capture {what}: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}. The JAX twin "
            "needs a graph torch.export can capture (no data-dependent Python control flow; "
            "Hugging Face models: use_cache=False)."
        ) from exc
    signature = program.graph_signature
    if signature.buffers_to_mutate or signature.user_inputs_to_mutate:
        mutated = list(signature.buffers_to_mutate.values()) + list(
            signature.user_inputs_to_mutate.values())
        raise ValueError(
            f"from_torch: the forward pass mutates {', '.join(map(str, mutated))} (BatchNorm in "
            "training mode, or an in-place update of a buffer or input); call model.eval() or "
            "remove the mutation before converting"
        )
    _check_random(program)
    program, how = _decompose(program)
    return ExportedGraph(program, wrapper, how)
