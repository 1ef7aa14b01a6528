"""Build the JAX twin of a PyTorch model: same outputs, same weights, aligned parameters.

:func:`from_torch` traces a ``torch.nn.Module`` with ``torch.fx`` and turns the graph into a
pure JAX function ``apply(params, *inputs)`` over a params pytree keyed by the torch module
paths. The returned :class:`Twin` also carries the :class:`dualhess.alignment.Alignment`
between the torch operator's flat parameter order (``module.named_parameters()``, trainable
only, each tensor flattened row-major in torch layout) and the flat order of
``jax.flatten_util.ravel_pytree(twin.params)``.

Layouts: ``Linear.weight`` ``(out, in)`` is stored as ``(in, out)`` (Flax ``Dense``), convolution
kernels ``O I *spatial`` as ``*spatial I O`` (Flax ``Conv``, e.g. OIHW -> HWIO); everything
else keeps its torch shape. Activations stay in torch's layout (NCHW) inside the JAX function,
so flatten orders after convolutions agree with torch without any reindexing and the same
numpy batch feeds both sides.

This module reads torch modules with torch itself (imported lazily); it never imports
``torch_backend``.
"""

from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dualhess._alignment import Alignment
from dualhess._errors import UnsupportedOpError
from dualhess._operator import ParamLayout

__all__ = [
    "Twin",
    "UnsupportedOpError",
    "from_torch",
    "loss_from_torch",
    "batch_from_torch",
]

_HIGHEST = lax.Precision.HIGHEST
_ROOT = "<root>"



class _OpError(Exception):
    """Raised inside a handler; the interpreter adds the op and module path."""


# ----------------------------------------------------------------------------------------
# Layouts of stored parameters
# ----------------------------------------------------------------------------------------

_TORCH, _LINEAR, _CONV = "torch", "linear", "conv"


def _from_torch_layout(x: Any, layout: str) -> Any:
    """Torch layout -> stored layout (works on numpy and jax arrays)."""
    if layout == _LINEAR:
        return x.T
    if layout == _CONV:
        return x.transpose(tuple(range(2, x.ndim)) + (1, 0))
    return x


def _to_torch_layout(x: Any, layout: str) -> Any:
    """Stored layout -> torch layout."""
    if layout == _LINEAR:
        return x.T
    if layout == _CONV:
        return x.transpose((x.ndim - 1, x.ndim - 2) + tuple(range(x.ndim - 2)))
    return x


def _convert_layout(x: Any, stored: str, wanted: str) -> Any:
    if stored == wanted:
        return x
    return _from_torch_layout(_to_torch_layout(x, stored), wanted)


# ----------------------------------------------------------------------------------------
# The Twin
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Twin:
    """The JAX twin of a torch module, with the parameter alignment between the two.

    Attributes
    ----------
    apply : callable
        Pure JAX function ``apply(params, *inputs)``; inputs in torch's layout (NCHW).
        Floating inputs are cast to the twin's dtype.
    params : dict
        Nested dict keyed by torch module paths (``params["block"]["conv2"]["weight"]``),
        trainable parameters only, in JAX layouts (Linear ``(in, out)``, Conv HWIO).
    align : dualhess.alignment.Alignment
        ``v_jax = v_torch[align.perm]``; one block per torch parameter, named by its torch
        name, given as indices in torch order.
    torch_layout, jax_layout : dualhess.ParamLayout
        Names, shapes and slices of the two flat orders.
    dtype : numpy dtype
        Floating dtype of ``params`` and of the computation.
    check_error : float or None
        Largest relative difference between twin and torch outputs on ``example_inputs``
        (``None`` when ``from_torch(..., check=False)``).
    graph_code : str
        The ``torch.fx`` code that was converted (for debugging).

    Examples
    --------
    >>> import jax, torch
    >>> from jax_backend import from_torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh())
    >>> twin = from_torch(net, torch.zeros(1, 3))
    >>> twin.params["0"]["weight"].shape
    (3, 2)
    >>> twin.align.n
    8
    """

    apply: Callable[..., Any]
    params: dict[str, Any]
    align: Alignment
    torch_layout: ParamLayout
    jax_layout: ParamLayout
    dtype: Any
    check_error: float | None = None
    graph_code: str = field(default="", repr=False)

    def __call__(self, *inputs: Any) -> Any:
        """``apply(params, *inputs)`` with the converted weights."""
        return self.apply(self.params, *inputs)

    def torch_to_jax(self, v: Any) -> np.ndarray:
        """Reorder a flat vector (or ``(n, k)`` matrix) from torch order to JAX order."""
        return self.align.a_to_b(np.asarray(v))

    def jax_to_torch(self, v: Any) -> np.ndarray:
        """Reorder a flat vector (or ``(n, k)`` matrix) from JAX order to torch order."""
        return self.align.b_to_a(np.asarray(v))

    def linen_module(self) -> Any:
        """An equivalent Flax linen module: ``init`` returns ``{"params": twin.params}``.

        ``module.apply({"params": params}, *inputs)`` equals ``twin.apply(params, *inputs)``,
        so ``twin.align`` holds for ``ravel_pytree(variables["params"])`` as well.

        Examples
        --------
        >>> import jax, numpy as np, torch
        >>> from jax_backend import from_torch
        >>> twin = from_torch(torch.nn.Linear(3, 2), torch.zeros(1, 3))
        >>> module = twin.linen_module()
        >>> variables = module.init(jax.random.key(0), np.zeros((1, 3), np.float32))
        >>> variables["params"]["weight"].shape
        (3, 2)
        """
        return _linen_class()(twin=self)

    def __repr__(self) -> str:
        return (
            f"Twin(num_params={self.align.n}, tensors={len(self.torch_layout.entries)}, "
            f"dtype={np.dtype(self.dtype).name}, check_error={self.check_error})"
        )


def _linen_class() -> type:
    cls = _CACHE.get("linen")
    if cls is None:
        import flax.linen as nn

        class TorchTwin(nn.Module):
            """Flax linen wrapper of a :class:`Twin` (params initialised to the torch weights)."""

            twin: Twin

            @nn.compact
            def __call__(self, *inputs: Any) -> Any:
                params = {
                    key: self.param(key, lambda rng, value=value: value)
                    for key, value in self.twin.params.items()
                }
                return self.twin.apply(params, *inputs)

        cls = _CACHE["linen"] = TorchTwin
    return cls


# ----------------------------------------------------------------------------------------
# from_torch
# ----------------------------------------------------------------------------------------


def _default_dtype(dtype: Any) -> np.dtype:
    x64 = bool(jax.config.jax_enable_x64)
    if dtype is None:
        return np.dtype(np.float64 if x64 else np.float32)
    if type(dtype).__module__ == "torch":  # torch.float64 -> "float64"
        dtype = str(dtype).replace("torch.", "")
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"from_torch: dtype must be float32 or float64, got {dtype!r}") from None
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"from_torch: dtype must be float32 or float64, got {dtype}")
    if dtype == np.float64 and not x64:
        raise ValueError(
            "from_torch: dtype float64 needs jax x64; call "
            "jax.config.update('jax_enable_x64', True) before creating arrays"
        )
    return dtype


def _tensor_to_numpy(t: Any, dtype: np.dtype) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.is_floating_point():
        return t.to(torch.float64).numpy().astype(dtype)
    if t.is_complex():
        raise UnsupportedOpError("complex tensors are not supported by the JAX twin")
    return t.numpy().copy()


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


def _set_nested(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def _get_nested(tree: dict[str, Any], path: Sequence[str]) -> Any:
    node = tree
    for key in path:
        node = node[key]
    return node


def from_torch(
    module: Any,
    example_inputs: Any,
    *,
    dtype: Any = None,
    check: bool = True,
    check_rtol: float | None = None,
) -> Twin:
    """Convert a torch module into a pure JAX function with identical weights.

    Parameters
    ----------
    module : torch.nn.Module
        A module that ``torch.fx.symbolic_trace`` can trace, in eval mode if it holds
        Dropout or BatchNorm layers.
    example_inputs : tensor or tuple of tensors
        Inputs for one forward pass (torch tensors or numpy arrays, torch layout). Used to
        check the twin against torch (and to fail early on unsupported ops).
    dtype : float32 or float64, optional
        Dtype of the twin's params; default float64 when jax x64 is on, else float32.
    check : bool
        Run both models on ``example_inputs`` and raise ``ValueError`` when the outputs
        disagree by more than ``check_rtol`` (default ``1e-8`` in float64, ``1e-3`` when
        either side is float32).
    check_rtol : float, optional
        Tolerance of that check (relative to the largest output magnitude).

    Returns
    -------
    Twin

    Raises
    ------
    UnsupportedOpError
        For an op the converter does not support (the message names the op and the
        module path), or a graph ``torch.fx`` cannot trace.
    ValueError
        For a module in train mode with Dropout or BatchNorm (call ``model.eval()``).

    Notes
    -----
    Only parameters with ``requires_grad=True`` go into ``Twin.params``; buffers (BatchNorm
    running statistics) and frozen parameters become constants of the function.
    Supported ops: Linear, Conv1d/2d/3d (stride, padding incl. ``'same'``, dilation,
    groups, padding modes), BatchNorm1d/2d/3d (eval), LayerNorm, GroupNorm, Embedding,
    Dropout (eval), Identity, Flatten, ReLU/ReLU6/GELU/SiLU/Tanh/Sigmoid/Softplus/ELU/
    LeakyReLU/Softmax/LogSoftmax, Max/AvgPool1d/2d, AdaptiveAvgPool1d/2d, their
    ``torch.nn.functional`` forms, and the tensor ops of typical ``forward`` code
    (arithmetic, matmul, cat/stack, mean/sum, view/reshape/flatten/permute/transpose,
    size/shape, indexing with slices).

    Examples
    --------
    >>> import jax, torch
    >>> from jax_backend import from_torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.ReLU(),
    ...                           torch.nn.Flatten(), torch.nn.Linear(32, 3))
    >>> x = torch.randn(5, 1, 4, 4)
    >>> twin = from_torch(net, x)
    >>> twin.params["0"]["weight"].shape    # OIHW (2, 1, 3, 3) -> HWIO
    (3, 3, 1, 2)
    >>> twin(x.numpy()).shape
    (5, 3)
    """
    import torch
    import torch.fx

    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"from_torch: expected a torch.nn.Module, got {type(module).__name__}")
    np_dtype = _default_dtype(dtype)
    try:
        graph_module = torch.fx.symbolic_trace(module)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is reported the same way
        raise UnsupportedOpError(
            f"torch.fx could not trace {type(module).__name__}: {type(exc).__name__}: {exc}. "
            "The JAX twin needs a module without data-dependent control flow."
        ) from exc

    converter = _Converter(module, graph_module, np_dtype)
    inputs = _as_tuple(example_inputs)
    np_inputs = tuple(
        _tensor_to_numpy(x, np_dtype) if isinstance(x, torch.Tensor) else np.asarray(x)
        for x in inputs
    )
    check_error = None
    if not check:
        # abstract run: surfaces unsupported ops and shape errors without computing anything
        jax.eval_shape(converter.apply, converter.params, *np_inputs)
    else:
        torch_inputs = tuple(x if isinstance(x, torch.Tensor) else torch.as_tensor(x) for x in inputs)
        with torch.no_grad():
            expected = module(*torch_inputs)
        got = converter.apply(converter.params, *np_inputs)
        check_error = _max_rel_error(expected, got)
        float32 = np_dtype == np.float32 or any(
            p.dtype != torch.float64 for p in module.parameters()
        )
        rtol = check_rtol if check_rtol is not None else (1e-3 if float32 else 1e-8)
        if not check_error <= rtol:
            raise ValueError(
                f"from_torch: the JAX twin of {type(module).__name__} differs from torch by "
                f"{check_error:.3g} (relative, tolerance {rtol:.1g}) on example_inputs"
            )

    return Twin(
        apply=converter.apply,
        params=converter.params,
        align=converter.alignment(),
        torch_layout=converter.torch_layout,
        jax_layout=converter.jax_layout(),
        dtype=np_dtype,
        check_error=check_error,
        graph_code=graph_module.code,
    )


def _max_rel_error(expected: Any, got: Any) -> float:
    import torch

    exp_leaves = []

    def collect(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            exp_leaves.append(x.detach().cpu().to(torch.float64).numpy()
                              if x.is_floating_point() else x.detach().cpu().numpy())
        elif isinstance(x, (tuple, list)):
            for item in x:
                collect(item)
        elif isinstance(x, dict):
            for key in sorted(x):
                collect(x[key])
        else:
            exp_leaves.append(np.asarray(x))

    collect(expected)
    got_leaves = []

    def collect_got(x: Any) -> None:
        if isinstance(x, (tuple, list)):
            for item in x:
                collect_got(item)
        elif isinstance(x, dict):
            for key in sorted(x):
                collect_got(x[key])
        else:
            got_leaves.append(np.asarray(x))

    collect_got(got)
    if len(exp_leaves) != len(got_leaves):
        raise ValueError("from_torch: the twin returns a different output structure than torch")
    worst = 0.0
    for a, b in zip(exp_leaves, got_leaves):
        if a.shape != b.shape:
            raise ValueError(f"from_torch: output shape {b.shape} differs from torch's {a.shape}")
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        scale = float(np.max(np.abs(a64))) if a64.size else 0.0
        diff = float(np.max(np.abs(a64 - b64))) if a64.size else 0.0
        if not np.isfinite(diff):
            return math.inf
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


# ----------------------------------------------------------------------------------------
# The graph interpreter
# ----------------------------------------------------------------------------------------


class _Context:
    """What a module handler sees: its path, and access to tensors of the current params."""

    def __init__(self, converter: _Converter, params: dict[str, Any], path: str) -> None:
        self.converter = converter
        self.params = params
        self.path = path

    def tensor(self, owner: Any, attr: str, layout: str = _TORCH) -> Any:
        """``owner.<attr>`` as a JAX array in ``layout`` (``None`` if the attribute is None)."""
        t = getattr(owner, attr, None)
        if t is None:
            return None
        return self.converter.lookup(self.params, t, layout)


class _Converter:
    def __init__(self, module: Any, graph_module: Any, dtype: np.dtype) -> None:
        import torch

        self.module = module
        self.graph_module = graph_module
        self.dtype = dtype
        self.modules = dict(module.named_modules(remove_duplicate=False))
        self.nodes = list(graph_module.graph.nodes)

        # trainable parameters, in named_parameters() order (shared ones listed once)
        owners: dict[str, Any] = {}
        for name, sub in self.modules.items():
            for pname, _ in sub.named_parameters(recurse=False):
                owners.setdefault(f"{name}.{pname}" if name else pname, sub)
        self.trainable: dict[int, tuple[str, str]] = {}  # id(tensor) -> (name, layout)
        entries: list[tuple[str, tuple[int, ...]]] = []
        params: dict[str, Any] = {}
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            attr = name.rsplit(".", 1)[-1]
            layout = _layout_for(owners.get(name), attr)
            self.trainable[id(p)] = (name, layout)
            entries.append((name, tuple(p.shape)))
            value = _from_torch_layout(_tensor_to_numpy(p, dtype), layout)
            _set_nested(params, name.split("."), jnp.asarray(value, dtype=dtype))
        self.params = params
        self.torch_layout = ParamLayout.from_shapes(entries)
        self._constants: dict[int, np.ndarray] = {}
        self._keepalive: list[Any] = []
        self._torch = torch
        self._validate()

    # ------------------------------------------------------------------ tensors
    def lookup(self, params: dict[str, Any], t: Any, layout: str) -> Any:
        entry = self.trainable.get(id(t))
        if entry is not None:
            name, stored = entry
            return _convert_layout(_get_nested(params, name.split(".")), stored, layout)
        key = id(t)
        if key not in self._constants:
            self._constants[key] = _tensor_to_numpy(t, self.dtype)
            self._keepalive.append(t)
        return _from_torch_layout(jnp.asarray(self._constants[key]), layout)

    # ------------------------------------------------------------------ alignment
    def jax_layout(self) -> ParamLayout:
        paths = jax.tree_util.tree_flatten_with_path(self.params)[0]
        entries = []
        for keypath, leaf in paths:
            name = ".".join(str(k.key) for k in keypath)
            entries.append((name, tuple(leaf.shape)))
        return ParamLayout.from_shapes(entries)

    def alignment(self) -> Alignment:
        index_tree: dict[str, Any] = {}
        blocks = []
        for entry in self.torch_layout.entries:
            _, layout = next(v for v in self.trainable.values() if v[0] == entry.name)
            idx = np.arange(entry.start, entry.stop, dtype=np.int64).reshape(entry.shape)
            _set_nested(index_tree, entry.name.split("."), _from_torch_layout(idx, layout))
            blocks.append((entry.name, np.arange(entry.start, entry.stop, dtype=np.int64)))
        leaves = jax.tree_util.tree_leaves(index_tree)
        perm = (
            np.concatenate([np.asarray(leaf).reshape(-1) for leaf in leaves])
            if leaves
            else np.zeros(0, dtype=np.int64)
        )
        return Alignment(perm, blocks)

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        """Fail at conversion time (not first call) on unsupported ops and unsafe in-place ops."""
        for node in self.nodes:
            where = _node_path(node)
            if node.op == "call_module":
                sub = self.modules[node.target]
                if type(sub) not in _module_table():
                    raise UnsupportedOpError(
                        f"unsupported module torch.nn.{type(sub).__name__} at '{node.target}'"
                    )
                _check_mode(sub, node.target)
                inplace = bool(getattr(sub, "inplace", False))
            elif node.op == "call_function":
                if node.target not in _function_table():
                    raise UnsupportedOpError(
                        f"unsupported function {_callable_name(node.target)} at '{where}'"
                    )
                inplace = bool(node.kwargs.get("inplace", False)) or node.target in _INPLACE_FUNCS
            elif node.op == "call_method":
                if node.target not in _METHODS:
                    raise UnsupportedOpError(
                        f"unsupported tensor method .{node.target}() at '{where}'"
                    )
                inplace = node.target.endswith("_")
            else:
                continue
            if inplace and node.args:
                base = node.args[0]
                if (
                    hasattr(base, "users")
                    and (len(base.users) > 1 or _is_view_node(base))
                ):
                    raise UnsupportedOpError(
                        f"in-place op {_node_op_name(node, self.modules)} at '{where}' modifies "
                        "a tensor that is used elsewhere (or a view of one); the functional JAX "
                        "twin cannot reproduce that aliasing. Use the out-of-place form."
                    )

    # ------------------------------------------------------------------ running
    def apply(self, params: dict[str, Any], *inputs: Any) -> Any:
        from torch.fx.node import map_aggregate

        env: dict[Any, Any] = {}

        def load(a: Any) -> Any:
            return map_aggregate(a, lambda x: env[x] if _is_node(x) else x)

        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(inputs) > len(placeholders):
            raise TypeError(
                f"twin takes {len(placeholders)} inputs ({[p.target for p in placeholders]}), "
                f"got {len(inputs)}"
            )
        position = 0
        for node in self.nodes:
            try:
                if node.op == "placeholder":
                    if position < len(inputs):
                        env[node] = self._input(inputs[position])
                    elif node.args:
                        env[node] = node.args[0]
                    else:
                        raise TypeError(f"twin: missing input '{node.target}'")
                    position += 1
                elif node.op == "get_attr":
                    env[node] = self._get_attr(params, node.target)
                elif node.op == "call_module":
                    sub = self.modules[node.target]
                    handler = _module_table()[type(sub)]
                    ctx = _Context(self, params, node.target)
                    env[node] = handler(ctx, sub, *load(node.args), **load(node.kwargs))
                elif node.op == "call_function":
                    handler = _function_table()[node.target]
                    env[node] = handler(*load(node.args), **load(node.kwargs))
                elif node.op == "call_method":
                    env[node] = _METHODS[node.target](*load(node.args), **load(node.kwargs))
                elif node.op == "output":
                    return load(node.args[0])
            except _OpError as exc:
                raise UnsupportedOpError(
                    f"{_node_op_name(node, self.modules)} at '{_node_path(node)}': {exc}"
                ) from None
        raise RuntimeError("torch.fx graph without output node")  # pragma: no cover

    def _input(self, x: Any) -> Any:
        if hasattr(x, "detach") and hasattr(x, "numpy"):  # a torch tensor
            x = _tensor_to_numpy(x, self.dtype)
        x = jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(self.dtype)
        return x

    def _get_attr(self, params: dict[str, Any], target: str) -> Any:
        obj: Any = self.module
        for part in target.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, self._torch.Tensor):
            return self.lookup(params, obj, _TORCH)
        return obj


def _is_node(x: Any) -> bool:
    import torch.fx

    return isinstance(x, torch.fx.Node)


def _node_path(node: Any) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        return str(list(stack.values())[-1][0]) or _ROOT
    return _ROOT


def _callable_name(fn: Any) -> str:
    """Public dotted name of a torch callable (``torch.fft.fft``, not ``torch._C._fft.fft_fft``)."""
    names = _CACHE.get("names")
    if names is None:
        names = {}
        for prefix, ns in _torch_namespaces():
            for attr in dir(ns):
                if attr.startswith("_"):
                    continue
                try:
                    obj = getattr(ns, attr)
                except Exception:  # noqa: BLE001 - lazy attributes may fail to load
                    continue
                if callable(obj):
                    names.setdefault(id(obj), f"{prefix}.{attr}")
        _CACHE["names"] = names
    if id(fn) in names:
        return names[id(fn)]
    mod = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", repr(fn))
    return f"{mod}.{name}" if mod else str(name)


def _torch_namespaces() -> list[tuple[str, Any]]:
    import torch
    import torch.nn.functional as F

    spaces = [("torch.nn.functional", F)]
    for sub in ("fft", "linalg", "special"):
        ns = getattr(torch, sub, None)
        if ns is not None:
            spaces.append((f"torch.{sub}", ns))
    spaces += [("torch", torch), ("operator", operator)]
    return spaces


def _node_op_name(node: Any, modules: dict[str, Any]) -> str:
    if node.op == "call_module":
        return f"torch.nn.{type(modules[node.target]).__name__}"
    if node.op == "call_method":
        return f"Tensor.{node.target}()"
    if node.op == "call_function":
        return _callable_name(node.target)
    return str(node.op)


_VIEW_METHODS = {
    "view", "reshape", "flatten", "permute", "transpose", "t", "squeeze", "unsqueeze",
    "view_as", "reshape_as", "contiguous", "expand", "__getitem__",
}


def _is_view_node(node: Any) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return name in _VIEW_METHODS or node.target is operator.getitem
    return False


def _layout_for(owner: Any, attr: str) -> str:
    import torch.nn as nn

    if owner is None or attr != "weight":
        return _TORCH
    if type(owner) is nn.Linear:
        return _LINEAR
    if type(owner) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return _CONV
    return _TORCH


def _check_mode(sub: Any, path: str) -> None:
    import torch.nn as nn

    if not sub.training:
        return
    if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.track_running_stats:
        raise ValueError(
            f"from_torch: {type(sub).__name__} at '{path}' is in training mode (batch statistics, "
            "running-stat updates); call model.eval() before converting"
        )
    if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.p > 0:
        raise ValueError(
            f"from_torch: {type(sub).__name__} at '{path}' is in training mode (random masks); "
            "call model.eval() before converting"
        )


# ----------------------------------------------------------------------------------------
# Op implementations (pure JAX)
# ----------------------------------------------------------------------------------------


def _ntuple(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, (tuple, list)):
        if len(value) == 1 and n > 1:
            return tuple(int(value[0]) for _ in range(n))
        if len(value) != n:
            raise _OpError(f"expected {n} values, got {tuple(value)}")
        return tuple(int(v) for v in value)
    return (int(value),) * n


_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def _conv(
    x: Any,
    kernel: Any,
    bias: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
    groups: int,
    kernel_layout: str,
    padding_mode: str = "zeros",
) -> Any:
    nd = kernel.ndim - 2
    unbatched = x.ndim == nd + 1
    if unbatched:
        x = x[None]
    if x.ndim != nd + 2:
        raise _OpError(f"expected a {nd + 2}-D input (N, C, *spatial), got shape {x.shape}")
    stride = _ntuple(stride, nd)
    dilation = _ntuple(dilation, nd)
    spatial_kernel = kernel.shape[2:] if kernel_layout == _TORCH else kernel.shape[:nd]
    if isinstance(padding, str):
        if padding == "valid":
            pads = [(0, 0)] * nd
        elif padding == "same":
            pads = []
            for k, d in zip(spatial_kernel, dilation):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
        else:
            raise _OpError(f"unknown padding {padding!r}")
    else:
        pads = [(p, p) for p in _ntuple(padding, nd)]
    if padding_mode != "zeros":
        if padding_mode not in _PAD_MODES:
            raise _OpError(f"unsupported padding_mode {padding_mode!r}")
        x = jnp.pad(x, [(0, 0), (0, 0), *pads], mode=_PAD_MODES[padding_mode])
        pads = [(0, 0)] * nd
    letters = "DHW"[3 - nd:] if nd <= 3 else None
    if letters is None:
        raise _OpError(f"{nd}-D convolutions are not supported")
    lhs = "NC" + letters
    rhs = "OI" + letters if kernel_layout == _TORCH else letters + "IO"
    y = lax.conv_general_dilated(
        x,
        kernel,
        window_strides=stride,
        padding=pads,
        rhs_dilation=dilation,
        dimension_numbers=(lhs, rhs, lhs),
        feature_group_count=int(groups),
        precision=_HIGHEST,
    )
    if bias is not None:
        y = y + bias.reshape((1, -1) + (1,) * nd)
    return y[0] if unbatched else y


def _linear(x: Any, kernel_in_out: Any, bias: Any) -> Any:
    y = jnp.matmul(x, kernel_in_out, precision=_HIGHEST)
    return y if bias is None else y + bias


def _batch_norm(
    x: Any, mean: Any, var: Any, weight: Any, bias: Any, eps: float, use_batch_stats: bool
) -> Any:
    if x.ndim < 2:
        raise _OpError(f"expected input of at least 2 dims (N, C, ...), got shape {x.shape}")
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if use_batch_stats:
        axes = (0,) + tuple(range(2, x.ndim))
        mean = jnp.mean(x, axis=axes)
        var = jnp.mean(jnp.square(x - mean.reshape(shape)), axis=axes)
    y = (x - mean.reshape(shape)) / jnp.sqrt(var.reshape(shape) + eps)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _layer_norm(x: Any, normalized_shape: Any, weight: Any, bias: Any, eps: float) -> Any:
    nd = len(_shape_tuple(normalized_shape))
    axes = tuple(range(x.ndim - nd, x.ndim))
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
    y = (x - mean) / jnp.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _group_norm(x: Any, num_groups: int, weight: Any, bias: Any, eps: float) -> Any:
    n, c = x.shape[0], x.shape[1]
    if c % num_groups:
        raise _OpError(f"{c} channels are not divisible by num_groups={num_groups}")
    grouped = x.reshape(n, num_groups, -1)
    mean = jnp.mean(grouped, axis=2, keepdims=True)
    var = jnp.mean(jnp.square(grouped - mean), axis=2, keepdims=True)
    y = ((grouped - mean) / jnp.sqrt(var + eps)).reshape(x.shape)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _embedding(indices: Any, weight: Any, padding_idx: Any, max_norm: Any, scale_grad: bool) -> Any:
    if max_norm is not None:
        raise _OpError("max_norm renormalises the weights in place; not supported")
    if scale_grad:
        raise _OpError("scale_grad_by_freq changes the gradient; not supported")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise _OpError(f"embedding indices must be integers, got {indices.dtype}")
    if padding_idx is not None:
        # torch never propagates gradient into the padding row: mirror that exactly
        if padding_idx < 0:
            padding_idx += weight.shape[0]
        row = jnp.arange(weight.shape[0]) == padding_idx
        weight = jnp.where(row[:, None], lax.stop_gradient(weight), weight)
    return jnp.take(weight, indices, axis=0)


def _softplus(x: Any, beta: float = 1.0, threshold: float = 20.0) -> Any:
    z = x * beta
    soft = jnp.log1p(jnp.exp(jnp.minimum(z, threshold))) / beta
    return jnp.where(z > threshold, x, soft)


def _elu(x: Any, alpha: float = 1.0) -> Any:
    return jnp.where(x > 0, x, alpha * jnp.expm1(jnp.minimum(x, 0)))


def _leaky_relu(x: Any, negative_slope: float = 0.01) -> Any:
    return jnp.where(x > 0, x, x * negative_slope)


def _gelu(x: Any, approximate: str = "none") -> Any:
    if approximate not in ("none", "tanh"):
        raise _OpError(f"unknown GELU approximation {approximate!r}")
    return jax.nn.gelu(x, approximate=approximate == "tanh")


def _softmax_dim(dim: Any, what: str) -> int:
    if dim is None:
        raise _OpError(f"{what} needs an explicit dim")
    return int(dim)


def _window_pads(padding: Any, nd: int) -> list[tuple[int, int]]:
    return [(p, p) for p in _ntuple(padding, nd)]


def _pool_nd(x: Any, nd: int) -> tuple[Any, bool]:
    if x.ndim == nd + 1:
        return x[None], True
    if x.ndim != nd + 2:
        raise _OpError(f"expected a {nd + 2}-D input (N, C, *spatial), got shape {x.shape}")
    return x, False


def _max_pool(
    x: Any, nd: int, kernel_size: Any, stride: Any, padding: Any, dilation: Any,
    ceil_mode: bool, return_indices: bool,
) -> Any:
    if return_indices:
        raise _OpError("return_indices=True is not supported")
    x, unbatched = _pool_nd(x, nd)
    k = _ntuple(kernel_size, nd)
    s = _ntuple(stride if stride is not None and stride != [] else kernel_size, nd)
    d = _ntuple(dilation, nd)
    pads = _window_pads(padding, nd)
    if ceil_mode:
        new_pads = []
        for size, kk, ss, dd, (lo, hi) in zip(x.shape[2:], k, s, d, pads):
            span = size + lo + hi - dd * (kk - 1) - 1
            out = -(-span // ss) + 1
            if (out - 1) * ss >= size + lo:
                out -= 1
            extra = max((out - 1) * ss + dd * (kk - 1) + 1 - (size + lo + hi), 0)
            new_pads.append((lo, hi + extra))
        pads = new_pads
    y = lax.reduce_window(
        x, -jnp.inf, lax.max, (1, 1, *k), (1, 1, *s), [(0, 0), (0, 0), *pads],
        window_dilation=(1, 1, *d),
    )
    return y[0] if unbatched else y


def _avg_pool(
    x: Any, nd: int, kernel_size: Any, stride: Any, padding: Any, ceil_mode: bool,
    count_include_pad: bool, divisor_override: Any,
) -> Any:
    if ceil_mode:
        raise _OpError("ceil_mode=True is not supported for average pooling")
    x, unbatched = _pool_nd(x, nd)
    k = _ntuple(kernel_size, nd)
    s = _ntuple(stride if stride is not None and stride != [] else kernel_size, nd)
    pads = [(0, 0), (0, 0), *_window_pads(padding, nd)]
    total = lax.reduce_window(x, 0.0, lax.add, (1, 1, *k), (1, 1, *s), pads)
    if divisor_override:
        y = total / divisor_override
    elif count_include_pad:
        y = total / math.prod(k)
    else:
        ones = jnp.ones((1, 1, *x.shape[2:]), x.dtype)
        counts = lax.reduce_window(
            ones, 0.0, lax.add, (1, 1, *k), (1, 1, *s), pads
        )
        y = total / counts
    return y[0] if unbatched else y


def _adaptive_matrix(size_in: int, size_out: int, dtype: Any) -> np.ndarray:
    """Averaging matrix of torch's adaptive pooling: bins [floor(i*L/o), ceil((i+1)*L/o))."""
    mat = np.zeros((size_out, size_in), dtype=dtype)
    for i in range(size_out):
        start = (i * size_in) // size_out
        stop = -(-((i + 1) * size_in) // size_out)
        mat[i, start:stop] = 1.0 / (stop - start)
    return mat


def _adaptive_avg_pool(x: Any, nd: int, output_size: Any) -> Any:
    x, unbatched = _pool_nd(x, nd)
    sizes = output_size if isinstance(output_size, (tuple, list)) else (output_size,) * nd
    if len(sizes) != nd:
        raise _OpError(f"output_size {output_size} does not have {nd} entries")
    y = x
    for axis, out in enumerate(sizes):
        dim = 2 + axis
        size_in = y.shape[dim]
        out = size_in if out is None else int(out)
        if out == size_in:
            continue
        if size_in % out == 0:
            shape = y.shape[:dim] + (out, size_in // out) + y.shape[dim + 1:]
            y = jnp.mean(y.reshape(shape), axis=dim + 1)
        else:
            mat = jnp.asarray(_adaptive_matrix(size_in, out, np.dtype(y.dtype)))
            y = jnp.moveaxis(
                jnp.tensordot(y, mat, axes=([dim], [1]), precision=_HIGHEST), -1, dim
            )
    return y[0] if unbatched else y


# ---------------------------------------------------------------- tensor-level helpers


def _shape_tuple(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, (tuple, list)):
        return tuple(int(s) for s in shape)
    return (int(shape),)


def _shape_args(shape: tuple[Any, ...]) -> tuple[int, ...]:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return tuple(int(s) for s in shape)


def _axes(dim: Any) -> Any:
    if dim is None:
        return None
    if isinstance(dim, (tuple, list)):
        return tuple(int(d) for d in dim) if len(dim) else None
    return int(dim)


def _reduce(fn: Callable[..., Any]) -> Callable[..., Any]:
    def reduce(input: Any, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Any:
        if dtype is not None:
            raise _OpError("dtype= casts are not supported")
        return fn(input, axis=_axes(dim), keepdims=bool(keepdim))

    return reduce


def _flatten(input: Any, start_dim: int = 0, end_dim: int = -1) -> Any:
    if input.ndim == 0:
        return input.reshape(1)
    start = start_dim % input.ndim
    end = end_dim % input.ndim
    return input.reshape(input.shape[:start] + (-1,) + input.shape[end + 1:])


def _squeeze(input: Any, dim: Any = None) -> Any:
    if dim is None:
        return jnp.squeeze(input)
    dims = _axes(dim)
    dims = (dims,) if isinstance(dims, int) else dims
    keep = tuple(d % input.ndim for d in dims if input.shape[d] == 1)
    return jnp.squeeze(input, axis=keep) if keep else input


def _matmul(a: Any, b: Any) -> Any:
    return jnp.matmul(a, b, precision=_HIGHEST)


def _getitem(obj: Any, index: Any) -> Any:
    if isinstance(obj, (tuple, list, dict)):
        return obj[index]
    items = index if isinstance(index, tuple) else (index,)
    for item in items:
        if isinstance(item, (int, np.integer, slice, type(None), type(Ellipsis))):
            continue
        if hasattr(item, "dtype") and jnp.issubdtype(item.dtype, jnp.integer):
            continue
        raise _OpError(f"indexing with {type(item).__name__} is not supported")
    return obj[index]


_TENSOR_ATTRS = {
    "shape": lambda x: tuple(x.shape),
    "ndim": lambda x: x.ndim,
    "T": lambda x: x.T,
    "mT": lambda x: jnp.swapaxes(x, -1, -2),
}


def _getattr(obj: Any, name: str, *default: Any) -> Any:
    if isinstance(obj, jax.Array) or hasattr(obj, "aval"):
        if name not in _TENSOR_ATTRS:
            raise _OpError(f"tensor attribute .{name} is not supported")
        return _TENSOR_ATTRS[name](obj)
    return builtins.getattr(obj, name, *default)


def _size(input: Any, dim: Any = None) -> Any:
    return tuple(input.shape) if dim is None else int(input.shape[dim])


def _add(input: Any, other: Any, *, alpha: Any = 1) -> Any:
    return input + other if alpha == 1 else input + alpha * other


def _sub(input: Any, other: Any, *, alpha: Any = 1) -> Any:
    return input - other if alpha == 1 else input - alpha * other


def _div(input: Any, other: Any, *, rounding_mode: Any = None) -> Any:
    if rounding_mode is not None:
        raise _OpError(f"rounding_mode={rounding_mode!r} is not supported")
    return input / other


def _cat(tensors: Sequence[Any], dim: int = 0, *, axis: Any = None) -> Any:
    return jnp.concatenate(list(tensors), axis=int(dim if axis is None else axis))


def _stack(tensors: Sequence[Any], dim: int = 0) -> Any:
    return jnp.stack(list(tensors), axis=int(dim))


def _view(input: Any, *shape: Any) -> Any:
    if len(shape) == 1 and not isinstance(shape[0], (tuple, list, int, np.integer)):
        raise _OpError("view(dtype) is not supported")
    return input.reshape(_shape_args(shape))


def _transpose(input: Any, dim0: int, dim1: int) -> Any:
    return jnp.swapaxes(input, dim0, dim1)


def _permute(input: Any, *dims: Any) -> Any:
    return jnp.transpose(input, _shape_args(dims))


def _pad(input: Any, pad: Sequence[int], mode: str = "constant", value: Any = None) -> Any:
    pad = [int(p) for p in pad]
    if len(pad) % 2 or len(pad) // 2 > input.ndim:
        raise _OpError(f"invalid pad {pad}")
    widths = [(0, 0)] * input.ndim
    for i in range(len(pad) // 2):
        widths[input.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1])
    if any(lo < 0 or hi < 0 for lo, hi in widths):
        raise _OpError("negative padding is not supported")
    if mode == "constant":
        return jnp.pad(input, widths, constant_values=0.0 if value is None else value)
    if mode not in _PAD_MODES:
        raise _OpError(f"pad mode {mode!r} is not supported")
    return jnp.pad(input, widths, mode=_PAD_MODES[mode])


def _dropout_fn(name: str) -> Callable[..., Any]:
    def dropout(input: Any, p: float = 0.5, training: bool = True, inplace: bool = False) -> Any:
        if training and p > 0:
            raise ValueError(
                f"from_torch: {name}(training=True) draws random masks; call model.eval() "
                "before converting"
            )
        return input

    return dropout


def _unary(fn: Callable[[Any], Any]) -> Callable[..., Any]:
    def unary(input: Any, inplace: bool = False) -> Any:
        return fn(input)

    return unary


def _relu6(x: Any) -> Any:
    return jnp.clip(x, 0.0, 6.0)


def _pow(input: Any, exponent: Any) -> Any:
    return input**exponent


def _softmax_fn(log: bool) -> Callable[..., Any]:
    fn = jax.nn.log_softmax if log else jax.nn.softmax
    what = "log_softmax" if log else "softmax"

    def softmax(input: Any, dim: Any = None, _stacklevel: int = 3, dtype: Any = None) -> Any:
        if dtype is not None:
            raise _OpError("dtype= casts are not supported")
        return fn(input, axis=_softmax_dim(dim, what))

    return softmax


# ---------------------------------------------------------------- torch.nn.functional forms


def _f_linear(input: Any, weight: Any, bias: Any = None) -> Any:
    return _linear(input, weight.T, bias)


def _f_conv(input: Any, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0,
            dilation: Any = 1, groups: int = 1) -> Any:
    return _conv(input, weight, bias, stride, padding, dilation, groups, _TORCH)


def _f_batch_norm(input: Any, running_mean: Any, running_var: Any, weight: Any = None,
                  bias: Any = None, training: bool = False, momentum: float = 0.1,
                  eps: float = 1e-5) -> Any:
    if training and running_mean is not None:
        raise ValueError(
            "from_torch: batch_norm(training=True) updates running statistics; call "
            "model.eval() before converting"
        )
    return _batch_norm(input, running_mean, running_var, weight, bias, eps,
                       use_batch_stats=training or running_mean is None)


def _f_layer_norm(input: Any, normalized_shape: Any, weight: Any = None, bias: Any = None,
                  eps: float = 1e-5) -> Any:
    return _layer_norm(input, normalized_shape, weight, bias, eps)


def _f_group_norm(input: Any, num_groups: int, weight: Any = None, bias: Any = None,
                  eps: float = 1e-5) -> Any:
    return _group_norm(input, num_groups, weight, bias, eps)


def _f_embedding(input: Any, weight: Any, padding_idx: Any = None, max_norm: Any = None,
                 norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = False) -> Any:
    return _embedding(input, weight, padding_idx, max_norm, scale_grad_by_freq)


def _f_max_pool(nd: int) -> Callable[..., Any]:
    def max_pool(input: Any, kernel_size: Any, stride: Any = None, padding: Any = 0,
                 dilation: Any = 1, ceil_mode: bool = False, return_indices: bool = False) -> Any:
        return _max_pool(input, nd, kernel_size, stride, padding, dilation, ceil_mode,
                         return_indices)

    return max_pool


def _f_avg_pool(nd: int) -> Callable[..., Any]:
    def avg_pool(input: Any, kernel_size: Any, stride: Any = None, padding: Any = 0,
                 ceil_mode: bool = False, count_include_pad: bool = True,
                 divisor_override: Any = None) -> Any:
        return _avg_pool(input, nd, kernel_size, stride, padding, ceil_mode, count_include_pad,
                         divisor_override)

    return avg_pool


def _f_adaptive_avg_pool(nd: int) -> Callable[..., Any]:
    def adaptive_avg_pool(input: Any, output_size: Any) -> Any:
        return _adaptive_avg_pool(input, nd, output_size)

    return adaptive_avg_pool


def _f_softplus(input: Any, beta: float = 1.0, threshold: float = 20.0) -> Any:
    return _softplus(input, beta, threshold)


def _f_elu(input: Any, alpha: float = 1.0, inplace: bool = False) -> Any:
    return _elu(input, alpha)


def _f_leaky_relu(input: Any, negative_slope: float = 0.01, inplace: bool = False) -> Any:
    return _leaky_relu(input, negative_slope)


def _f_gelu(input: Any, approximate: str = "none") -> Any:
    return _gelu(input, approximate)


_INPLACE_FUNCS: set[Any] = set()
_CACHE: dict[str, Any] = {}


def _function_table() -> dict[Any, Callable[..., Any]]:
    table = _CACHE.get("functions")
    if table is not None:
        return table
    import torch
    import torch.nn.functional as F

    relu = _unary(jax.nn.relu)
    table = {
        # python operators (as fx records them)
        operator.add: operator.add,
        operator.sub: operator.sub,
        operator.mul: operator.mul,
        operator.truediv: operator.truediv,
        operator.floordiv: operator.floordiv,
        operator.neg: operator.neg,
        operator.pos: operator.pos,
        operator.pow: operator.pow,
        operator.matmul: _matmul,
        operator.getitem: _getitem,
        builtins.getattr: _getattr,
        # torch namespace
        torch.add: _add,
        torch.sub: _sub,
        torch.subtract: _sub,
        torch.mul: lambda input, other: input * other,
        torch.multiply: lambda input, other: input * other,
        torch.div: _div,
        torch.divide: _div,
        torch.true_divide: lambda input, other: input / other,
        torch.neg: lambda input: -input,
        torch.pow: _pow,
        torch.square: jnp.square,
        torch.matmul: _matmul,
        torch.mm: _matmul,
        torch.bmm: _matmul,
        torch.cat: _cat,
        torch.concat: _cat,
        torch.concatenate: _cat,
        torch.stack: _stack,
        torch.mean: _reduce(jnp.mean),
        torch.sum: _reduce(jnp.sum),
        torch.flatten: _flatten,
        torch.reshape: lambda input, shape: input.reshape(_shape_tuple(shape)),
        torch.permute: lambda input, dims: jnp.transpose(input, _shape_tuple(dims)),
        torch.transpose: _transpose,
        torch.swapaxes: _transpose,
        torch.squeeze: _squeeze,
        torch.unsqueeze: lambda input, dim: jnp.expand_dims(input, int(dim)),
        torch.relu: jax.nn.relu,
        torch.tanh: jnp.tanh,
        torch.sigmoid: jax.nn.sigmoid,
        torch.exp: jnp.exp,
        torch.log: jnp.log,
        torch.sqrt: jnp.sqrt,
        torch.abs: jnp.abs,
        torch.softmax: _softmax_fn(False),
        torch.log_softmax: _softmax_fn(True),
        # torch.nn.functional
        F.linear: _f_linear,
        F.conv1d: _f_conv,
        F.conv2d: _f_conv,
        F.conv3d: _f_conv,
        F.batch_norm: _f_batch_norm,
        F.layer_norm: _f_layer_norm,
        F.group_norm: _f_group_norm,
        F.embedding: _f_embedding,
        F.dropout: _dropout_fn("dropout"),
        F.dropout1d: _dropout_fn("dropout1d"),
        F.dropout2d: _dropout_fn("dropout2d"),
        F.dropout3d: _dropout_fn("dropout3d"),
        F.alpha_dropout: _dropout_fn("alpha_dropout"),
        F.relu: relu,
        F.relu6: _unary(_relu6),
        F.gelu: _f_gelu,
        F.silu: _unary(jax.nn.silu),
        F.tanh: jnp.tanh,
        F.sigmoid: jax.nn.sigmoid,
        F.softplus: _f_softplus,
        F.elu: _f_elu,
        F.leaky_relu: _f_leaky_relu,
        F.softmax: _softmax_fn(False),
        F.log_softmax: _softmax_fn(True),
        F.max_pool1d: _f_max_pool(1),
        F.max_pool2d: _f_max_pool(2),
        F.avg_pool1d: _f_avg_pool(1),
        F.avg_pool2d: _f_avg_pool(2),
        F.adaptive_avg_pool1d: _f_adaptive_avg_pool(1),
        F.adaptive_avg_pool2d: _f_adaptive_avg_pool(2),
        F.pad: _pad,
    }
    _INPLACE_FUNCS.update({torch.relu_} if hasattr(torch, "relu_") else set())
    _CACHE["functions"] = table
    return table


# ---------------------------------------------------------------- Tensor methods


def _m_reshape_as(input: Any, other: Any) -> Any:
    return input.reshape(other.shape)


def _m_contiguous(input: Any, *args: Any, **kwargs: Any) -> Any:
    return input


def _m_expand(input: Any, *sizes: Any) -> Any:
    sizes = _shape_args(sizes)
    lead = len(sizes) - input.ndim
    shape = tuple(
        input.shape[i - lead] if s == -1 else s for i, s in enumerate(sizes)
    )
    return jnp.broadcast_to(input, shape)


_METHODS: dict[str, Callable[..., Any]] = {
    "add": _add,
    "add_": _add,
    "sub": _sub,
    "sub_": _sub,
    "mul": lambda input, other: input * other,
    "mul_": lambda input, other: input * other,
    "div": _div,
    "div_": _div,
    "neg": lambda input: -input,
    "pow": _pow,
    "square": jnp.square,
    "matmul": _matmul,
    "mm": _matmul,
    "bmm": _matmul,
    "mean": _reduce(jnp.mean),
    "sum": _reduce(jnp.sum),
    "view": _view,
    "reshape": _view,
    "view_as": _m_reshape_as,
    "reshape_as": _m_reshape_as,
    "expand": _m_expand,
    "flatten": _flatten,
    "permute": _permute,
    "transpose": _transpose,
    "t": lambda input: input.T,
    "size": _size,
    "dim": lambda input: input.ndim,
    "numel": lambda input: int(input.size),
    "contiguous": _m_contiguous,
    "unsqueeze": lambda input, dim: jnp.expand_dims(input, int(dim)),
    "squeeze": _squeeze,
    "relu": jax.nn.relu,
    "relu_": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "exp": jnp.exp,
    "log": jnp.log,
    "sqrt": jnp.sqrt,
    "abs": jnp.abs,
    "softmax": _softmax_fn(False),
    "log_softmax": _softmax_fn(True),
}


# ---------------------------------------------------------------- nn.Module handlers


def _mod_linear(ctx: _Context, m: Any, x: Any) -> Any:
    return _linear(x, ctx.tensor(m, "weight", _LINEAR), ctx.tensor(m, "bias"))


def _mod_conv(ctx: _Context, m: Any, x: Any) -> Any:
    return _conv(
        x, ctx.tensor(m, "weight", _CONV), ctx.tensor(m, "bias"), m.stride, m.padding,
        m.dilation, m.groups, _CONV, m.padding_mode,
    )


def _mod_batch_norm(ctx: _Context, m: Any, x: Any) -> Any:
    use_batch = m.running_mean is None  # track_running_stats=False: batch statistics
    return _batch_norm(
        x, ctx.tensor(m, "running_mean"), ctx.tensor(m, "running_var"),
        ctx.tensor(m, "weight"), ctx.tensor(m, "bias"), m.eps, use_batch,
    )


def _mod_layer_norm(ctx: _Context, m: Any, x: Any) -> Any:
    return _layer_norm(x, m.normalized_shape, ctx.tensor(m, "weight"), ctx.tensor(m, "bias"),
                       m.eps)


def _mod_group_norm(ctx: _Context, m: Any, x: Any) -> Any:
    return _group_norm(x, m.num_groups, ctx.tensor(m, "weight"), ctx.tensor(m, "bias"), m.eps)


def _mod_embedding(ctx: _Context, m: Any, x: Any) -> Any:
    return _embedding(x, ctx.tensor(m, "weight"), m.padding_idx, m.max_norm,
                      m.scale_grad_by_freq)


def _mod_identity(ctx: _Context, m: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    return x


def _mod_dropout(ctx: _Context, m: Any, x: Any) -> Any:
    _check_mode(m, ctx.path)
    return x


def _mod_flatten(ctx: _Context, m: Any, x: Any) -> Any:
    return _flatten(x, m.start_dim, m.end_dim)


def _mod_unflatten(ctx: _Context, m: Any, x: Any) -> Any:
    dim = m.dim % x.ndim
    return x.reshape(x.shape[:dim] + tuple(m.unflattened_size) + x.shape[dim + 1:])


def _mod_max_pool(nd: int) -> Callable[..., Any]:
    def handler(ctx: _Context, m: Any, x: Any) -> Any:
        return _max_pool(x, nd, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                         m.return_indices)

    return handler


def _mod_avg_pool(nd: int) -> Callable[..., Any]:
    def handler(ctx: _Context, m: Any, x: Any) -> Any:
        return _avg_pool(x, nd, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                         m.count_include_pad, getattr(m, "divisor_override", None))

    return handler


def _mod_adaptive_avg_pool(nd: int) -> Callable[..., Any]:
    def handler(ctx: _Context, m: Any, x: Any) -> Any:
        return _adaptive_avg_pool(x, nd, m.output_size)

    return handler


def _mod_fn(fn: Callable[..., Any], *attrs: str) -> Callable[..., Any]:
    def handler(ctx: _Context, m: Any, x: Any) -> Any:
        return fn(x, *(getattr(m, a) for a in attrs))

    return handler


def _module_table() -> dict[type, Callable[..., Any]]:
    table = _CACHE.get("modules")
    if table is not None:
        return table
    import torch.nn as nn

    table = {
        nn.Linear: _mod_linear,
        nn.Conv1d: _mod_conv,
        nn.Conv2d: _mod_conv,
        nn.Conv3d: _mod_conv,
        nn.BatchNorm1d: _mod_batch_norm,
        nn.BatchNorm2d: _mod_batch_norm,
        nn.BatchNorm3d: _mod_batch_norm,
        nn.LayerNorm: _mod_layer_norm,
        nn.GroupNorm: _mod_group_norm,
        nn.Embedding: _mod_embedding,
        nn.Identity: _mod_identity,
        nn.Dropout: _mod_dropout,
        nn.Dropout1d: _mod_dropout,
        nn.Dropout2d: _mod_dropout,
        nn.Dropout3d: _mod_dropout,
        nn.AlphaDropout: _mod_dropout,
        nn.Flatten: _mod_flatten,
        nn.Unflatten: _mod_unflatten,
        nn.ReLU: _mod_fn(jax.nn.relu),
        nn.ReLU6: _mod_fn(_relu6),
        nn.GELU: _mod_fn(_gelu, "approximate"),
        nn.SiLU: _mod_fn(jax.nn.silu),
        nn.Tanh: _mod_fn(jnp.tanh),
        nn.Sigmoid: _mod_fn(jax.nn.sigmoid),
        nn.Softplus: _mod_fn(_softplus, "beta", "threshold"),
        nn.ELU: _mod_fn(_elu, "alpha"),
        nn.LeakyReLU: _mod_fn(_leaky_relu, "negative_slope"),
        nn.Softmax: _mod_fn(lambda x, dim: jax.nn.softmax(x, axis=_softmax_dim(dim, "Softmax")),
                            "dim"),
        nn.LogSoftmax: _mod_fn(
            lambda x, dim: jax.nn.log_softmax(x, axis=_softmax_dim(dim, "LogSoftmax")), "dim"
        ),
        nn.MaxPool1d: _mod_max_pool(1),
        nn.MaxPool2d: _mod_max_pool(2),
        nn.AvgPool1d: _mod_avg_pool(1),
        nn.AvgPool2d: _mod_avg_pool(2),
        nn.AdaptiveAvgPool1d: _mod_adaptive_avg_pool(1),
        nn.AdaptiveAvgPool2d: _mod_adaptive_avg_pool(2),
    }
    _CACHE["modules"] = table
    return table


# ----------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------


def _reduce_loss(values: Any, reduction: str) -> Any:
    return jnp.mean(values) if reduction == "mean" else jnp.sum(values)


def _cross_entropy(
    outputs: Any, targets: Any, weight: Any, ignore_index: int, reduction: str,
    label_smoothing: float,
) -> Any:
    if outputs.ndim == 1:
        outputs, targets = outputs[None], jnp.asarray(targets)[None]
    logp = jax.nn.log_softmax(outputs, axis=1)
    num_classes = outputs.shape[1]
    targets = jnp.asarray(targets)
    w = None if weight is None else jnp.asarray(weight, outputs.dtype)
    wshape = (1, -1) + (1,) * (outputs.ndim - 2)
    if jnp.issubdtype(targets.dtype, jnp.floating):  # class probabilities
        if targets.shape != outputs.shape:
            raise ValueError(
                f"CrossEntropyLoss: probability targets must have the outputs' shape "
                f"{outputs.shape}, got {targets.shape}"
            )
        probs = targets * (1 - label_smoothing) + label_smoothing / num_classes
        terms = logp * probs if w is None else logp * probs * w.reshape(wshape)
        per_sample = -jnp.sum(terms, axis=1)
        if reduction == "mean":
            return jnp.sum(per_sample) / (per_sample.size)
        return jnp.sum(per_sample)
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(f"CrossEntropyLoss: targets must be integers or probabilities, "
                        f"got {targets.dtype}")
    mask = targets != ignore_index
    safe = jnp.where(mask, targets, 0)
    picked = jnp.take_along_axis(logp, jnp.expand_dims(safe, 1), axis=1).squeeze(1)
    wt = mask.astype(outputs.dtype) if w is None else w[safe] * mask
    nll_sum = -jnp.sum(picked * wt)
    nll = nll_sum / jnp.sum(wt) if reduction == "mean" else nll_sum
    if label_smoothing <= 0:
        return nll
    smooth = -jnp.sum(logp if w is None else logp * w.reshape(wshape), axis=1)
    smooth_sum = jnp.sum(smooth * mask)
    smooth_val = smooth_sum / jnp.sum(wt) if reduction == "mean" else smooth_sum
    return (1 - label_smoothing) * nll + smooth_val * (label_smoothing / num_classes)


def _nll(outputs: Any, targets: Any, weight: Any, ignore_index: int, reduction: str) -> Any:
    if outputs.ndim == 1:
        outputs, targets = outputs[None], jnp.asarray(targets)[None]
    targets = jnp.asarray(targets)
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(f"NLLLoss: targets must be integer class indices, got {targets.dtype}")
    mask = targets != ignore_index
    safe = jnp.where(mask, targets, 0)
    picked = jnp.take_along_axis(outputs, jnp.expand_dims(safe, 1), axis=1).squeeze(1)
    wt = mask.astype(outputs.dtype) if weight is None else jnp.asarray(weight, outputs.dtype)[safe] * mask
    total = -jnp.sum(picked * wt)
    return total / jnp.sum(wt) if reduction == "mean" else total


def _bce_with_logits(outputs: Any, targets: Any, weight: Any, pos_weight: Any,
                     reduction: str) -> Any:
    targets = jnp.asarray(targets, outputs.dtype)
    softplus_neg = jnp.maximum(-outputs, 0) + jnp.log1p(jnp.exp(-jnp.abs(outputs)))
    if pos_weight is not None:
        pw = jnp.asarray(pos_weight, outputs.dtype)
        values = (1 - targets) * outputs + (1 + (pw - 1) * targets) * softplus_neg
    else:
        values = (1 - targets) * outputs + softplus_neg
    if weight is not None:
        values = values * jnp.asarray(weight, outputs.dtype)
    return _reduce_loss(values, reduction)


def _bce(outputs: Any, targets: Any, weight: Any, reduction: str) -> Any:
    targets = jnp.asarray(targets, outputs.dtype)
    log_p = jnp.maximum(jnp.log(outputs), -100.0)
    log_q = jnp.maximum(jnp.log1p(-outputs), -100.0)
    values = -(targets * log_p + (1 - targets) * log_q)
    if weight is not None:
        values = values * jnp.asarray(weight, outputs.dtype)
    return _reduce_loss(values, reduction)


def _huber(diff: Any, delta: float) -> Any:
    a = jnp.abs(diff)
    return jnp.where(a < delta, 0.5 * diff * diff, delta * (a - 0.5 * delta))


def _smooth_l1(diff: Any, beta: float) -> Any:
    a = jnp.abs(diff)
    if beta == 0:
        return a
    return jnp.where(a < beta, 0.5 * diff * diff / beta, a - 0.5 * beta)


def _supported_losses() -> tuple[type, ...]:
    import torch.nn as nn

    return (nn.CrossEntropyLoss, nn.NLLLoss, nn.MSELoss, nn.L1Loss, nn.BCEWithLogitsLoss,
            nn.BCELoss, nn.HuberLoss, nn.SmoothL1Loss)


def loss_from_torch(loss_module: Any) -> Callable[[Any, Any], Any]:
    """The JAX equivalent ``loss(outputs, targets) -> scalar`` of a torch loss module.

    Parameters
    ----------
    loss_module : torch.nn.Module
        One of ``nn.CrossEntropyLoss`` (class-index or probability targets, ``weight``,
        ``ignore_index``, ``label_smoothing``), ``nn.NLLLoss``, ``nn.MSELoss``,
        ``nn.L1Loss``, ``nn.BCEWithLogitsLoss`` (``weight``, ``pos_weight``), ``nn.BCELoss``,
        ``nn.HuberLoss``, ``nn.SmoothL1Loss``; ``reduction`` ``"mean"`` or ``"sum"``.

    Returns
    -------
    callable
        A pure JAX function of ``(outputs, targets)``.

    Raises
    ------
    UnsupportedOpError
        For any other loss.
    ValueError
        For ``reduction="none"`` (no scalar to differentiate twice).

    Examples
    --------
    >>> import numpy as np, torch
    >>> from jax_backend import loss_from_torch
    >>> loss = loss_from_torch(torch.nn.CrossEntropyLoss())
    >>> round(float(loss(np.zeros((2, 4)), np.array([0, 3]))), 6)   # log(4)
    1.386294
    """
    import torch.nn as nn

    if not isinstance(loss_module, nn.Module):
        raise TypeError(
            f"loss_from_torch: expected a torch loss module, got {type(loss_module).__name__}"
        )
    name = type(loss_module).__name__
    if type(loss_module) not in _supported_losses():
        raise UnsupportedOpError(
            f"loss_from_torch: unsupported loss torch.nn.{name}; supported: "
            + ", ".join(cls.__name__ for cls in _supported_losses())
        )
    reduction = getattr(loss_module, "reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"loss_from_torch: {name}(reduction={reduction!r}) does not return a scalar; "
            "use 'mean' or 'sum'"
        )

    def buffer(attr: str) -> Any:
        t = getattr(loss_module, attr, None)
        return None if t is None else t.detach().cpu().to(dtype=__import__("torch").float64).numpy()

    kind = type(loss_module)
    if kind is nn.CrossEntropyLoss:
        weight, ignore = buffer("weight"), int(loss_module.ignore_index)
        smoothing = float(loss_module.label_smoothing)

        def loss(outputs: Any, targets: Any) -> Any:
            return _cross_entropy(outputs, targets, weight, ignore, reduction, smoothing)

    elif kind is nn.NLLLoss:
        weight, ignore = buffer("weight"), int(loss_module.ignore_index)

        def loss(outputs: Any, targets: Any) -> Any:
            return _nll(outputs, targets, weight, ignore, reduction)

    elif kind is nn.MSELoss:

        def loss(outputs: Any, targets: Any) -> Any:
            return _reduce_loss(jnp.square(outputs - jnp.asarray(targets, outputs.dtype)),
                                reduction)

    elif kind is nn.L1Loss:

        def loss(outputs: Any, targets: Any) -> Any:
            return _reduce_loss(jnp.abs(outputs - jnp.asarray(targets, outputs.dtype)),
                                reduction)

    elif kind is nn.BCEWithLogitsLoss:
        weight, pos_weight = buffer("weight"), buffer("pos_weight")

        def loss(outputs: Any, targets: Any) -> Any:
            return _bce_with_logits(outputs, targets, weight, pos_weight, reduction)

    elif kind is nn.BCELoss:
        weight = buffer("weight")

        def loss(outputs: Any, targets: Any) -> Any:
            return _bce(outputs, targets, weight, reduction)

    elif kind is nn.HuberLoss:
        delta = float(loss_module.delta)

        def loss(outputs: Any, targets: Any) -> Any:
            return _reduce_loss(_huber(outputs - jnp.asarray(targets, outputs.dtype), delta),
                                reduction)

    elif kind is nn.SmoothL1Loss:
        beta = float(loss_module.beta)

        def loss(outputs: Any, targets: Any) -> Any:
            return _reduce_loss(_smooth_l1(outputs - jnp.asarray(targets, outputs.dtype), beta),
                                reduction)

    else:  # pragma: no cover - guarded by the _LOSSES check above
        raise AssertionError(name)
    inner = loss

    def jax_loss(outputs: Any, targets: Any) -> Any:
        return inner(jnp.asarray(outputs), targets)

    jax_loss.__name__ = f"jax_{name}"
    jax_loss.__doc__ = f"JAX equivalent of torch.nn.{name}(reduction={reduction!r})."
    return jax_loss


# ----------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------


def batch_from_torch(batch: Any, *, as_jax: bool = False) -> Any:
    """Convert a torch batch (tensor, tuple/list, dict, nested) to numpy (or jax) arrays.

    Tensors are detached and moved to the CPU; their dtypes are kept (cast floating inputs
    yourself if the twin runs in another precision; :meth:`Twin.apply` casts them for you).
    Non-tensor leaves (numpy arrays, numbers, strings) pass through unchanged.

    Examples
    --------
    >>> import torch
    >>> from jax_backend import batch_from_torch
    >>> x, y = batch_from_torch((torch.ones(2, 3), torch.tensor([0, 1])))
    >>> type(x).__name__, x.shape, y.dtype
    ('ndarray', (2, 3), dtype('int64'))
    """
    import torch

    def convert(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            if x.dtype == torch.bfloat16 or x.dtype == torch.float16:
                x = x.to(torch.float32)
            arr = x.numpy().copy()
            return jnp.asarray(arr) if as_jax else arr
        if isinstance(x, dict):
            return {k: convert(v) for k, v in x.items()}
        if isinstance(x, tuple) and hasattr(x, "_fields"):  # namedtuple
            return type(x)(*(convert(v) for v in x))
        if isinstance(x, (tuple, list)):
            return type(x)(convert(v) for v in x)
        return x

    return convert(batch)
