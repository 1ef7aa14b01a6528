"""Capture a torch model, optionally together with its loss, as a core-ATen graph.

The model is wrapped in a small module whose ``forward`` is ``(inputs, targets) -> loss``
(or ``inputs -> outputs``), so any Python loss works: a torch loss module, a lambda over
``out.logits``, a causal-LM shift, a Hugging Face ``ModelOutput``. The wrapper is captured
with :func:`torch.export.export` and decomposed with ``run_decompositions()`` to core ATen;
where that decomposition fails (GPT-2's reshapes after attention on torch 2.13: "Cannot view
a tensor with shape ..."), the higher-level operators in :data:`PRESERVED` are kept and get
their own JAX rules. Analyses in another precision export a converted copy of the model;
the user's model is never modified.

Export passes run on the program before it is interpreted:

- **float32 islands** (:func:`find_float32_islands`, :func:`promote_float32_islands`): a
  float64 model that casts part of its computation to float32 (Llama's RMSNorm and rotary
  tables, T5's LayerNorm variance) is only float32-accurate there. The islands are found and
  located (module and source line); with promotion on, every ``float32`` dtype argument of
  the graph becomes ``float64`` before decomposition (which re-traces, so the recorded
  dtypes follow), and *both* sides evaluate that rewritten program (the torch side through
  :func:`torch_callable`).
- **constant folding** (:func:`fold_constants`): nodes that depend on neither parameters nor
  inputs (position buckets, rotary tables, ALiBi slopes, causal masks) are evaluated once by
  torch at export time; the twin embeds their values, so ``jax.jit`` cannot fold them
  differently (DeBERTa-v2's float32 ``ceil(log(d / 2) / log(3.5))`` bucket moved under jit).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dualhess._errors import UnsupportedOpError

__all__ = ["ExportedGraph", "export_graph", "check_eval_mode", "model_in_dtype",
           "call_model", "source_of", "PRESERVED", "Float32Island", "find_float32_islands",
           "promote_float32_islands", "fold_constants", "torch_callable", "KEPT"]

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


def source_of(node: Any, *, with_module: bool = True) -> str:
    """The user's source line of a graph node (from the stack trace torch.export keeps),
    followed by its module (``with_module``)."""
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
    if stack and with_module:
        path, kind = list(stack.values())[-1]
        path = re.sub(r"^(L\['self'\]\.)?model\.?", "", str(path)) or "<root>"
        where += f" (module '{path}', {getattr(kind, '__name__', str(kind).split('.')[-1])})"
    return where


def module_of(node: Any) -> str:
    """The module path and class of a graph node (``"model.layers.0.input_layernorm
    (LlamaRMSNorm)"``), from the ``nn_module_stack`` torch.export keeps."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<unknown module>"
    path, kind = list(stack.values())[-1]
    path = re.sub(r"^(L\['self'\]\.)?model\.?", "", str(path)) or "<root>"
    return f"{path} ({getattr(kind, '__name__', str(kind).split('.')[-1])})"


@dataclass(frozen=True)
class Float32Island:
    """Where a float64 graph computes in float32: a node that makes a float32 tensor from
    float64 (or integer) values.

    Attributes
    ----------
    module : str
        Module path and class (``"model.layers.0.input_layernorm (LlamaRMSNorm)"``).
    source : str
        The source line (file, line, function, code).
    operator : str
        The ATen operator that enters float32 (``"aten.to.dtype"``, ``"aten._to_copy.default"``).
    count : int
        How many graph nodes enter float32 at this source line.
    promoted : bool
        Whether the export computes it in float64 instead.
    """

    module: str
    source: str
    operator: str
    count: int
    promoted: bool

    def __str__(self) -> str:
        state = "promoted to float64" if self.promoted else "kept in float32"
        times = f" ({self.count} nodes)" if self.count > 1 else ""
        return f"{self.module}: {self.operator}{times} at {self.source} [{state}]"


def _tensor_dtype(node: Any) -> Any:
    val = node.meta.get("val") if hasattr(node, "meta") else None
    return getattr(val, "dtype", None) if type(val).__module__.startswith("torch") else None


def find_float32_islands(graph: Any, *, promoted: bool = False) -> tuple[Float32Island, ...]:
    """The float32 islands of a float64 graph: nodes with a float32 result none of whose
    tensor inputs is float32, grouped by source line (empty for a graph without float64)."""
    import torch

    nodes = [n for n in graph.nodes if n.op in ("placeholder", "call_function")]
    if not any(_tensor_dtype(n) == torch.float64 for n in nodes):
        return ()
    found: dict[tuple[str, str], list[Any]] = {}
    for node in nodes:
        if node.op != "call_function" or _tensor_dtype(node) != torch.float32:
            continue
        if any(_tensor_dtype(i) == torch.float32 for i in node.all_input_nodes):
            continue  # inside an island, not its entry
        if not _reaches_floats(node):
            continue  # float32 values that only leave as integers (OPT's positions)
        found.setdefault((module_of(node), source_of(node, with_module=False)), []).append(node)
    return tuple(
        Float32Island(module, source, str(group[0].target), len(group), promoted)
        for (module, source), group in found.items()
    )


def _reaches_floats(entry: Any) -> bool:
    """Whether float32 values from ``entry`` flow into a floating result of another dtype
    (or the output): an island that only ends in integer casts changes no float64 value."""
    import torch

    seen, todo = set(), [entry]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            dtype = _tensor_dtype(user)
            if user.op == "output":
                return True
            if dtype == torch.float32 or (dtype is None and user.op == "call_function"):
                todo.append(user)  # still float32 (or a tuple/getitem)
            elif dtype is not None and dtype.is_floating_point:
                return True
    return False


def promote_float32_islands(program: Any) -> int:
    """Rewrite every ``float32`` dtype argument of the graph's operators to ``float64``, in
    place (casts, ``arange``/``full``/``scalar_tensor`` dtypes); returns how many nodes
    changed. The caller re-traces (``run_decompositions``) so the recorded dtypes follow.
    Float32 that comes from type promotion alone (an integer tensor times a Python float
    under a float32 default dtype) has no argument to rewrite and stays an island."""
    import torch
    from torch.fx.node import map_aggregate

    def widen(a: Any) -> Any:
        return torch.float64 if a is torch.float32 else a

    changed = 0
    for node in list(program.graph.nodes):
        if node.op != "call_function":
            continue
        if str(node.target).startswith("aten._assert_tensor_metadata") and not node.users:
            program.graph.erase_node(node)  # a dtype assertion the rewrite invalidates
            continue
        args, kwargs = map_aggregate(node.args, widen), map_aggregate(node.kwargs, widen)
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs = args, kwargs
            changed += 1
    if changed:
        program.graph_module.recompile()
    return changed


def fold_constants(program: Any) -> tuple[dict[str, Any], frozenset[str]]:
    """Evaluate with torch, once, every node that depends on neither parameters nor user
    inputs (only on buffers, lifted constants and shapes).

    Returns ``(values, constant_nodes)``: ``values`` maps the name of each constant node
    that a non-constant node (or the output) uses to its torch tensor; ``constant_nodes``
    names every constant node (the interpreter skips them and needs no rule for them).
    Random operators are never folded.
    """
    import torch
    from torch.fx.node import map_arg

    state = {**program.state_dict, **program.constants}
    values: dict[Any, Any] = {}
    for spec in program.graph_signature.input_specs:
        if spec.kind.name in ("BUFFER", "CONSTANT_TENSOR"):
            values[spec.arg.name] = state[spec.target]
    env: dict[Any, Any] = {}
    constant: set[Any] = set()
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in values:
            env[node] = values[node.name]
            constant.add(node)
        if node.op != "call_function" or not all(i in constant for i in node.all_input_nodes):
            continue
        target = node.target
        tags = getattr(target, "tags", ())
        if torch.Tag.nondeterministic_seeded in tags:
            continue
        if not isinstance(node.meta.get("val"), (torch.Tensor, tuple, list)):
            continue
        try:
            with torch.no_grad():
                env[node] = target(*map_arg(node.args, env.__getitem__),
                                   **map_arg(node.kwargs, env.__getitem__))
        except Exception:  # noqa: BLE001 - left to the interpreter
            continue
        constant.add(node)
    folded = {}
    for node in constant:
        if node.op != "call_function" or not isinstance(env[node], torch.Tensor):
            continue
        if any(u not in constant for u in node.users):
            folded[node.name] = env[node].detach()
    return folded, frozenset(n.name for n in constant if n.op == "call_function")


def torch_callable(graph: ExportedGraph) -> Callable[..., Any]:
    """``f(parameters, *args)`` evaluating the exported (rewritten) program with torch.

    ``parameters`` maps the *model's* parameter names to tensors (differentiable: the
    products of the torch side are taken on this graph); buffers are the program's own.
    """
    import torch

    module = graph.program.module()
    names = {n for n, _ in module.named_parameters(remove_duplicate=False)}

    def call(parameters: dict[str, Any], *args: Any) -> Any:
        mapped = {f"model.{n}": t for n, t in parameters.items() if f"model.{n}" in names}
        return torch.func.functional_call(module, mapped, args, tie_weights=True)

    return call


@dataclass
class ExportedGraph:
    """A decomposed :class:`torch.export.ExportedProgram` and the module it was taken from.

    ``islands`` are the float32 islands of a float64 export (promoted or kept, see
    :func:`promote_float32_islands`); ``folded`` the constants torch computed at export time
    (node name -> tensor) and ``constant_nodes`` every node they replace.
    """

    program: Any
    wrapper: Any
    decomposition: str
    islands: tuple[Float32Island, ...] = ()
    folded: dict[str, Any] | None = None
    constant_nodes: frozenset[str] = frozenset()


#: Operators never decomposed: their core-ATen decomposition uses an operator the twin has
#: no rule for (Swin's ``AdaptiveAvgPool1d`` on a transposed input became ``as_strided``).
KEPT = ("aten.adaptive_avg_pool1d.default",)


def _table(keep: tuple[str, ...]) -> Any:
    import torch

    table = torch.export.default_decompositions()
    for name in keep:
        _, op, overload = name.split(".")
        table.pop(getattr(getattr(torch.ops.aten, op), overload), None)
    return table


def _decompose(program: Any) -> tuple[Any, str]:
    try:
        return program.run_decompositions(_table(KEPT)), "core ATen"
    except Exception:  # noqa: BLE001 - fall back to keeping higher-level operators
        pass
    try:
        return program.run_decompositions(_table(KEPT + PRESERVED)), "core ATen except " + ", ".join(PRESERVED)
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


def export_graph(model: Any, args: tuple[Any, ...], loss: Callable[..., Any] | None, *,
                 promote: bool = False, fold: bool = True) -> ExportedGraph:
    """Export ``model`` (with ``loss``, when given) on example ``args`` and decompose it.

    ``promote`` computes the float32 islands of a float64 model in float64
    (:func:`promote_float32_islands`); ``fold`` evaluates the constant subgraphs with torch
    (:func:`fold_constants`).
    """
    with warnings.catch_warnings():
        # torch 2.13's own pytree deprecation notice, raised inside torch.export's copies; it
        # says nothing about the user's model and would break the CLI's progress output
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        return _export_graph(model, args, loss, promote, fold)


def _export_graph(model: Any, args: tuple[Any, ...], loss: Callable[..., Any] | None,
                  promote: bool, fold: bool) -> ExportedGraph:
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
    islands = find_float32_islands(program.graph)
    if promote and islands:
        promote_float32_islands(program)
    program, how = _decompose(program)  # re-traces: the recorded dtypes follow the rewrite
    if promote and islands:
        left = {(i.module, i.source) for i in find_float32_islands(program.graph)}
        islands = tuple(dataclasses.replace(i, promoted=(i.module, i.source) not in left)
                        for i in islands)
    folded, constant_nodes = fold_constants(program) if fold else ({}, frozenset())
    return ExportedGraph(program, wrapper, how, islands, folded, constant_nodes)
