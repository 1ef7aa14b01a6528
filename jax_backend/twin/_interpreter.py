"""Interpret an exported ATen graph with ``jax.numpy`` / ``jax.lax`` as a pure function.

:class:`GraphFunction` walks the nodes of a decomposed :class:`torch.export.ExportedProgram`
once per call (that is, once per ``jax.jit`` trace): placeholders are the trainable
parameters (looked up by their torch name in ``params``), constants (buffers such as
BatchNorm running statistics and position ids, frozen parameters, lifted tensor constants)
and the user's inputs, flattened by the program's own input spec; each ``call_function``
node is evaluated by its rule from :data:`jax_backend.twin._registry.RULES` and cast to
the dtype torch recorded for it (so torch's type promotion holds without each rule
reproducing it); the shapes are checked against torch's as the graph is traced. Nodes that
depend on neither parameters nor inputs were evaluated by torch at export time
(:func:`jax_backend.twin._export.fold_constants`): their values are constants here, and
the nodes that only feed them are skipped (they need no rule).
"""

from __future__ import annotations

import operator
from typing import Any

import jax.numpy as jnp

from dualhess._errors import UnsupportedOpError

from ._common import jax_dtype
from ._export import ExportedGraph, source_of
from ._registry import RULES, RuleError, lookup

__all__ = ["GraphFunction", "unsupported_message"]

_REPORT = (
    "Supported operators are listed in docs/twin-operators.md. If your model needs this one, "
    "please report it on the dualhess issue tracker with this message and a small model that "
    "shows it (a rule is one function in jax_backend/twin/_ops_<family>.py)."
)


def unsupported_message(name: str, nodes: list[Any]) -> str:
    lines = [source_of(n) for n in nodes[:3]]
    more = f" and {len(nodes) - 3} more" if len(nodes) > 3 else ""
    return (
        f"the JAX twin has no rule for the ATen operator {name}, used at "
        + "; ".join(lines) + more + f". {_REPORT}"
    )


def _to_jax_constant(t: Any) -> Any:
    import torch

    if not isinstance(t, torch.Tensor):
        raise UnsupportedOpError(
            f"the exported graph holds a constant of type {type(t).__name__} (a script object); "
            "the JAX twin supports tensor constants only"
        )
    t = t.detach().cpu()
    if t.is_complex():
        raise UnsupportedOpError("complex tensors are not supported by the JAX twin")
    if t.dtype in (torch.bfloat16, torch.float16):
        return jnp.asarray(t.to(torch.float32).numpy(), dtype=jax_dtype(t.dtype))
    return jnp.asarray(t.numpy().copy())


class GraphFunction:
    """``f(params, *args) -> outputs`` of one exported graph (one input signature).

    Parameters
    ----------
    graph : ExportedGraph
        From :func:`jax_backend.twin._export.export_graph`.
    canonical : dict
        Exported parameter name (``"model.lm_head.weight"``) -> the model's own parameter
        name in ``named_parameters()`` (``"transformer.wte.weight"`` for a tied weight).
    trainable : set of str
        Canonical names that are looked up in ``params``; every other parameter is a
        constant of the function.
    """

    def __init__(self, graph: ExportedGraph, canonical: dict[str, str], trainable: set[str]) -> None:
        program = graph.program
        self.graph = program.graph
        self.in_spec = program.call_spec.in_spec
        self.out_spec = program.call_spec.out_spec
        self.decomposition = graph.decomposition
        self.islands = graph.islands
        self.exported = graph
        self._folded = {name: _to_jax_constant(t) for name, t in (graph.folded or {}).items()}
        self._skipped = graph.constant_nodes
        state = {**program.state_dict, **program.constants}
        self._sources: dict[str, tuple[str, Any]] = {}
        user = 0
        for spec in program.graph_signature.input_specs:
            name, kind = spec.arg.name, spec.kind.name
            if kind == "PARAMETER":
                canon = canonical[spec.target]
                if canon in trainable:
                    self._sources[name] = ("param", canon)
                else:
                    self._sources[name] = ("const", _to_jax_constant(state[spec.target]))
            elif kind in ("BUFFER", "CONSTANT_TENSOR"):
                self._sources[name] = ("const", _to_jax_constant(state[spec.target]))
            elif kind == "USER_INPUT":
                self._sources[name] = ("input", user)
                user += 1
            else:
                raise UnsupportedOpError(
                    f"the exported graph has a {kind} input ({spec.target}); the JAX twin "
                    "supports parameters, buffers, tensor constants and tensor inputs"
                )
        self.num_user_inputs = user
        self._user_outputs = [
            i for i, spec in enumerate(program.graph_signature.output_specs)
            if spec.kind.name == "USER_OUTPUT"
        ]
        self.operators = self._check_rules()

    def _check_rules(self) -> tuple[str, ...]:
        missing: dict[str, list[Any]] = {}
        used = set()
        for node in self.graph.nodes:
            if node.op == "get_attr":
                raise UnsupportedOpError(
                    f"the exported graph calls a submodule ({node.target}, a higher-order "
                    f"operator such as torch.cond) at {source_of(node)}; the JAX twin supports "
                    "straight-line ATen graphs"
                )
            if node.op != "call_function" or node.target is operator.getitem:
                continue
            if node.name in self._skipped:
                continue  # computed by torch at export time
            name = str(node.target)
            if lookup(name) is None:
                missing.setdefault(name, []).append(node)
            used.add(name)
        if missing:
            name, nodes = next(iter(missing.items()))
            others = [n for n in missing if n != name]
            message = unsupported_message(name, nodes)
            if others:
                message += " Also without a rule: " + ", ".join(others) + "."
            raise UnsupportedOpError(message)
        return tuple(sorted(used))

    def flatten_inputs(self, args: tuple[Any, ...]) -> list[Any]:
        """The user-input leaves of ``args`` in the graph's order (dicts by key, not position)."""
        from torch.fx._pytree import tree_flatten_spec

        leaves = tree_flatten_spec((tuple(args), {}), self.in_spec)
        tensors = [jnp.asarray(leaf) for leaf in leaves if hasattr(leaf, "shape")]
        if len(tensors) != self.num_user_inputs:
            raise ValueError(
                f"the twin's graph takes {self.num_user_inputs} input arrays, got {len(tensors)}"
            )
        return tensors

    def __call__(self, params: Any, *args: Any) -> Any:
        leaves = self.flatten_inputs(args)
        env: dict[Any, Any] = {}
        outputs = None
        for node in self.graph.nodes:
            if node.op == "placeholder":
                kind, what = self._sources[node.name]
                if kind == "param":
                    env[node] = params[what]
                elif kind == "const":
                    env[node] = what
                else:
                    env[node] = leaves[what]
            elif node.op == "call_function":
                if node.name in self._folded:
                    env[node] = self._folded[node.name]
                elif node.name not in self._skipped:
                    env[node] = self._evaluate(node, env)
            elif node.op == "output":
                flat = node.args[0]
                outputs = [self._lookup(flat[i], env) for i in self._user_outputs]
        return outputs

    @staticmethod
    def _lookup(value: Any, env: dict[Any, Any]) -> Any:
        from torch.fx.node import map_arg

        return map_arg(value, lambda n: env[n])

    def _evaluate(self, node: Any, env: dict[Any, Any]) -> Any:
        args = self._lookup(node.args, env)
        kwargs = self._lookup(node.kwargs, env)
        if node.target is operator.getitem:
            return args[0][args[1]]
        name = str(node.target)
        try:
            out = RULES[name].fn(*args, **kwargs)
            return _conform(out, node.meta.get("val"), name)
        except RuleError as exc:
            raise UnsupportedOpError(
                f"the JAX rule for {name} does not support these arguments ({exc}), used at "
                f"{source_of(node)}. {_REPORT}"
            ) from exc
        except ValueError as exc:
            if "model.eval()" in str(exc):
                raise ValueError(f"from_torch: {exc} (at {source_of(node)})") from exc
            exc.add_note(f"while evaluating {name} at {source_of(node)}")
            raise
        except Exception as exc:
            exc.add_note(f"while evaluating {name} at {source_of(node)}")
            raise


def _conform(value: Any, meta: Any, name: str) -> Any:
    """Cast ``value`` to the dtype torch recorded and check its shape."""
    import torch

    if isinstance(meta, torch.Tensor):
        if value is None or not hasattr(value, "dtype") and not isinstance(value, (int, float, bool)):
            return value
        value = jnp.asarray(value) if not hasattr(value, "dtype") else value
        if value.dtype is None:
            return value
        want = jax_dtype(meta.dtype)
        if value.dtype != want:
            value = value.astype(want)
        shape = tuple(meta.shape)
        if all(isinstance(s, int) for s in shape) and tuple(value.shape) != shape:
            raise AssertionError(
                f"internal error: the JAX rule for {name} returned shape {tuple(value.shape)}, "
                f"torch's is {shape}; please report it"
            )
        return value
    if isinstance(meta, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(value)(_conform(v, m, name) for v, m in zip(value, meta))
    return value



