"""The twin: a PyTorch model (with its loss) as a pure JAX function of its parameters."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dualhess._alignment import Alignment
from dualhess._operator import ParamLayout

from ._alignment import ParamDict, alignment_by_name, canonical_names
from ._export import Float32Island, check_eval_mode, export_graph, model_in_dtype
from ._interpreter import GraphFunction

__all__ = ["Twin", "from_torch"]

_FORWARD, _LOSS = "forward", "loss"


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


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


class _Graphs:
    """The exported graphs of one model, one per (forward/loss, input signature)."""

    def __init__(self, model: Any, loss: Any, dtype: np.dtype, promote: bool = False,
                 fold: bool = True) -> None:
        import torch

        self.model = model
        self.loss = loss
        self.dtype = dtype
        self.promote = promote
        self.fold = fold
        self.torch_dtype = torch.float64 if dtype == np.float64 else torch.float32
        self.canonical = canonical_names(model, prefix="model.")
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.cache: dict[Any, GraphFunction] = {}

    # ---------------------------------------------------------------- conversions
    def to_jax(self, tree: Any) -> Any:
        """Torch tensors -> arrays; floating leaves in the twin's dtype."""

        def convert(leaf: Any) -> Any:
            if _is_tensor(leaf):
                import torch

                leaf = leaf.detach().cpu()
                leaf = leaf.to(torch.float64).numpy() if leaf.is_floating_point() else leaf.numpy()
            if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating):
                return leaf.astype(self.dtype) if isinstance(leaf, np.ndarray) else \
                    jnp.asarray(leaf, self.dtype)
            return leaf

        return jax.tree_util.tree_map(convert, tree, is_leaf=_is_tensor)

    def to_torch(self, tree: Any) -> Any:
        """Arrays (concrete or traced) -> torch tensors for an example export."""
        import torch

        def convert(leaf: Any) -> Any:
            if _is_tensor(leaf):
                t = leaf.detach()
            elif isinstance(leaf, jax.core.Tracer):
                t = torch.zeros(tuple(leaf.shape), dtype=_torch_dtype(leaf.dtype))
            elif hasattr(leaf, "shape"):
                t = torch.as_tensor(np.array(leaf))
            else:
                return leaf
            return t.to(self.torch_dtype) if t.is_floating_point() else t

        return jax.tree_util.tree_map(convert, tree, is_leaf=_is_tensor)

    @staticmethod
    def key(kind: str, args: tuple[Any, ...]) -> Any:
        leaves, treedef = jax.tree_util.tree_flatten(args)
        return kind, treedef, tuple((tuple(np.shape(x)), np.dtype(x.dtype).kind)
                                    if hasattr(x, "dtype") else x for x in leaves)

    def graph(self, kind: str, args: tuple[Any, ...]) -> GraphFunction:
        """The graph for these (JAX-side) arguments, exported on first use."""
        key = self.key(kind, args)
        found = self.cache.get(key)
        if found is None:
            found = self.export(kind, self.to_torch(args))
            self.cache[key] = found
        return found

    def export(self, kind: str, torch_args: tuple[Any, ...]) -> GraphFunction:
        exported = export_graph(self.model, torch_args, self.loss if kind == _LOSS else None,
                                promote=self.promote, fold=self.fold)
        return GraphFunction(exported, self.canonical, self.trainable)


def _torch_dtype(dtype: Any) -> Any:
    import torch

    return getattr(torch, np.dtype(dtype).name)


@dataclass(frozen=True, eq=False)
class Twin:
    """The JAX twin of a torch model: a pure function of parameters keyed by torch names.

    Attributes
    ----------
    params : ParamDict
        The trainable parameters by their torch names (``"layer1.0.conv1.weight"``), in
        ``named_parameters()`` order and in torch's layouts (Linear ``(out, in)``, conv
        ``OIHW``); a tied weight is one entry. Buffers (BatchNorm running statistics, position
        ids, masks) and frozen parameters are constants of the function.
    align : dualhess.Alignment
        From the torch operator's flat order to ``ravel_pytree(params)``: the identity, with
        one block per parameter named by its torch name.
    torch_layout, jax_layout : dualhess.ParamLayout
        Names, shapes and slices of the two flat orders (equal).
    dtype : numpy dtype
        Floating dtype of ``params`` and of the computation (a float64 twin exports a float64
        copy of the model; the model itself is never modified).
    check_error : float or None
        Largest relative difference from torch on the example (outputs, or the loss).
    graph_code : str
        Python code of the first exported ATen graph (for debugging).
    operators : tuple of str
        The ATen operators of that graph.
    decomposition : str
        How the graph was decomposed ("core ATen", or which operators were kept).
    islands : tuple of Float32Island
        Where a float64 model computes in float32 (module, source line), and whether the
        export promoted each to float64 (``promote_float32_islands``). With promoted
        islands, the twin is the function of the rewritten program and
        :meth:`torch_model` is torch's evaluation of that same program.
    island_effect : float or None
        With promoted islands: the largest relative change of the example's outputs (or
        loss) that the promotion made in torch, i.e. how far the float32 islands are from
        the float64 function.

    Examples
    --------
    >>> import torch
    >>> from jax_backend import from_torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh())
    >>> twin = from_torch(net, torch.zeros(1, 3))
    >>> list(twin.params), twin.params["0.weight"].shape
    (['0.weight', '0.bias'], (2, 3))
    >>> twin.align.n
    8
    """

    params: ParamDict
    align: Alignment
    torch_layout: ParamLayout
    jax_layout: ParamLayout
    dtype: Any
    check_error: float | None = None
    graph_code: str = field(default="", repr=False)
    operators: tuple[str, ...] = ()
    decomposition: str = ""
    example_kind: str = field(default="tuple", repr=False)
    islands: tuple[Float32Island, ...] = ()
    island_effect: float | None = None
    _graphs: _Graphs | None = field(default=None, repr=False)

    def torch_model(self) -> Any:
        """A torch module computing exactly the function the twin computes.

        It holds the (float-converted) model's own parameters, under the same names, and its
        forward evaluates the exported program after the export passes (float32 islands
        promoted) with torch, so torch's autograd differentiates the same rewritten graph.
        Without promoted islands it is the model itself.
        """
        if not any(i.promoted for i in self.islands):
            return self._graphs.model
        from ._reference import ReferenceModel

        return ReferenceModel(self._graphs.model, promote=True)

    def crosscheck_terms(self) -> tuple[Any, list[str], float | None]:
        """``(torch model, report notes, rtol or None)`` for a cross-check against torch.

        The torch model is :meth:`torch_model` (the same rewritten program as the twin); the
        notes list the float32 islands and what was done with them; a float64 model that
        keeps float32 islands is compared at the float32 tolerance (1e-4), since both sides
        compute those parts only to float32 precision.
        """
        notes, rtol = [], None
        promoted = [i for i in self.islands if i.promoted]
        kept = [i for i in self.islands if not i.promoted]
        if promoted:
            effect = f" (the promotion moved the example's loss by {self.island_effect:.2g})" \
                if self.island_effect is not None else ""
            notes.append(
                f"the model computes {len(promoted)} part(s) in float32; both sides evaluate "
                f"its export with those casts promoted to float64{effect}: "
                + "; ".join(f"{i.module} at {i.source}" for i in promoted))
        if kept:
            rtol = 1e-4
            notes.append(
                f"rtol 1e-4 (float32 precision): the float64 model computes {len(kept)} "
                "part(s) in float32 on both sides (promote_float32_islands=False, or a "
                "float32 result of type promotion): "
                + "; ".join(f"{i.module} at {i.source}" for i in kept))
        return self.torch_model(), notes, rtol

    # ------------------------------------------------------------------ the functions
    def apply(self, params: Any, *inputs: Any, **named_inputs: Any) -> Any:
        """The model's outputs ``model(*inputs)`` (or ``model(**named_inputs)``) at ``params``.

        Inputs in torch's layout (NCHW); torch tensors and numpy arrays are accepted, floating
        ones are cast to the twin's dtype. A model returning one tensor gives one array;
        tuples, lists and dicts keep their structure.
        """
        packed = self._pack(inputs, named_inputs)
        args = (self._graphs.to_jax(packed),)
        graph = self._graphs.graph(_FORWARD, args)
        outputs = graph(params, *args)
        return _unflatten(outputs, graph.out_spec)

    def loss(self, params: Any, inputs: Any, targets: Any) -> Any:
        """The exported loss ``loss_fn(model(inputs), targets)`` at ``params`` (a scalar).

        Only for a twin built with ``from_torch(..., loss=...)``; ``inputs`` has the structure
        of the example (a tensor, a tuple, or a dict of keyword inputs).
        """
        if self._graphs.loss is None:
            raise TypeError("this twin was built without a loss; pass loss= to from_torch")
        args = self._graphs.to_jax((inputs, targets))
        return self._graphs.graph(_LOSS, args)(params, *args)[0]

    def prepare(self, inputs: Any, targets: Any = None) -> None:
        """Export the graph for another input signature now (e.g. an unequal last batch)."""
        kind = _FORWARD if targets is None else _LOSS
        args = (inputs,) if targets is None else (inputs, targets)
        key = self._graphs.key(kind, self._graphs.to_jax(args))
        if key not in self._graphs.cache:
            self._graphs.cache[key] = self._graphs.export(kind, self._graphs.to_torch(args))

    def __call__(self, *inputs: Any, **named_inputs: Any) -> Any:
        """``apply(params, *inputs)`` with the model's own weights."""
        return self.apply(self.params, *inputs, **named_inputs)

    def _pack(self, inputs: tuple[Any, ...], named: dict[str, Any]) -> Any:
        if named:
            return dict(named)
        if self.example_kind == "dict" and len(inputs) == 1:
            return inputs[0]
        if self.example_kind == "single" and len(inputs) == 1:
            return inputs[0]
        return tuple(inputs)

    # ------------------------------------------------------------------ alignment
    def torch_to_jax(self, v: Any) -> np.ndarray:
        """Reorder a flat vector (or ``(n, k)`` matrix) from torch order to JAX order."""
        return self.align.a_to_b(np.asarray(v))

    def jax_to_torch(self, v: Any) -> np.ndarray:
        """Reorder a flat vector (or ``(n, k)`` matrix) from JAX order to torch order."""
        return self.align.b_to_a(np.asarray(v))

    def linen_module(self) -> Any:
        """An equivalent Flax linen module whose ``init`` returns ``{"params": twin.params}``.

        Examples
        --------
        >>> import jax, numpy as np, torch
        >>> from jax_backend import from_torch
        >>> twin = from_torch(torch.nn.Linear(3, 2), torch.zeros(1, 3))
        >>> module = twin.linen_module()
        >>> variables = module.init(jax.random.key(0), np.zeros((1, 3), np.float32))
        >>> variables["params"]["weight"].shape
        (2, 3)
        """
        import flax.linen as nn

        twin = self

        class TorchTwin(nn.Module):
            """Flax linen wrapper of a :class:`Twin` (params initialised to the torch weights)."""

            @nn.compact
            def __call__(self, *inputs: Any) -> Any:
                params = ParamDict(
                    (key, self.param(key, lambda rng, value=value: value))
                    for key, value in twin.params.items()
                )
                return twin.apply(params, *inputs)

        return TorchTwin()

    def __repr__(self) -> str:
        return (
            f"Twin(num_params={self.align.n}, tensors={len(self.torch_layout.entries)}, "
            f"dtype={np.dtype(self.dtype).name}, operators={len(self.operators)}, "
            f"check_error={self.check_error})"
        )


def _unflatten(outputs: list[Any], out_spec: Any) -> Any:
    from torch.utils import _pytree as pytree

    if out_spec.is_leaf():
        return outputs[0]
    if out_spec.type in (tuple, list, dict):
        try:
            return pytree.tree_unflatten(outputs, out_spec)
        except Exception:  # noqa: BLE001 - nested custom nodes: a flat tuple instead
            pass
    return tuple(outputs)


def _max_rel_error(expected: list[np.ndarray], got: list[Any]) -> float:
    if len(expected) != len(got):
        raise ValueError("from_torch: the twin returns a different output structure than torch")
    worst = 0.0
    for a, b in zip(expected, got):
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a64.shape != b64.shape:
            raise ValueError(f"from_torch: output shape {b64.shape} differs from torch's {a64.shape}")
        if not a64.size:
            continue
        diff = float(np.max(np.abs(a64 - b64)))
        if not np.isfinite(diff):
            if np.array_equal(a64, b64, equal_nan=True):
                continue
            return math.inf
        scale = float(np.max(np.abs(a64[np.isfinite(a64)]))) if np.isfinite(a64).any() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def from_torch(
    module: Any,
    example_inputs: Any,
    *,
    loss: Callable[..., Any] | None = None,
    example_targets: Any = None,
    dtype: Any = None,
    check: bool = True,
    check_rtol: float | None = None,
    promote_float32_islands: bool | None = None,
    fold_constants: bool = True,
) -> Twin:
    """The JAX twin of a torch model (optionally with its loss), from ``torch.export``.

    Parameters
    ----------
    module : torch.nn.Module
        Any model :func:`torch.export.export` can capture, in eval mode if it holds Dropout
        or BatchNorm (Hugging Face models: ``use_cache=False``). It is never modified.
    example_inputs : tensor, tuple of tensors, or dict
        Inputs of one forward pass in torch layout: a tensor is ``model(x)``, a tuple
        ``model(*inputs)``, a dict ``model(**inputs)`` (``input_ids``, ``attention_mask``).
    loss : callable, optional
        ``loss(outputs, targets) -> scalar``: a torch loss module or any Python function
        (a lambda over ``out.logits``, a causal-LM shift). Exported together with the model,
        so :meth:`Twin.loss` is the JAX function of exactly this loss.
    example_targets : tensor or pytree, optional
        Targets for the example (needed with ``loss``).
    dtype : float32 or float64, optional
        The twin's dtype; default float64 when jax x64 is on, else float32. A model in
        another dtype is exported as a converted copy.
    check : bool
        Compare the twin with torch on the example and raise ``ValueError`` above
        ``check_rtol``: default ``1e-12`` in float64 (strict enough to see a position bucket
        move), ``1e-5`` for a float64 model that keeps float32 islands, ``1e-3`` in float32.
        With promoted islands torch evaluates the same rewritten program.
    check_rtol : float, optional
        Tolerance of that check, relative to the largest output magnitude.
    promote_float32_islands : bool, optional
        Default: on for a float64 twin. A float64 model that casts parts of its computation to
        float32 (Hugging Face Llama-family RMSNorm and rotary tables, T5's LayerNorm
        variance) is exported with those casts rewritten to float64, so the twin (and
        :meth:`Twin.torch_model`) compute the float64 function the model approximates; the
        islands are listed in :attr:`Twin.islands` either way. Off, the twin reproduces the
        float32 islands, and agrees with torch only to float32 precision there.
    fold_constants : bool
        Evaluate the subgraphs that depend on neither parameters nor inputs (position
        buckets, rotary tables, masks) with torch at export time and embed them as
        constants (default), so ``jax.jit`` cannot compute them differently.

    Returns
    -------
    Twin

    Raises
    ------
    UnsupportedOpError
        For an ATen operator without a JAX rule (the message names the operator, the
        source line and how to report it) or a model ``torch.export`` cannot capture (the
        message gives torch.export's reason).
    ValueError
        For Dropout or BatchNorm in train mode (call ``model.eval()``).

    Examples
    --------
    >>> import torch
    >>> from jax_backend import from_torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.ReLU(),
    ...                           torch.nn.Flatten(), torch.nn.Linear(32, 3))
    >>> x, y = torch.randn(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    >>> twin = from_torch(net, x, loss=torch.nn.CrossEntropyLoss(), example_targets=y)
    >>> twin.params["0.weight"].shape          # torch's OIHW layout
    (2, 1, 3, 3)
    >>> float(twin.loss(twin.params, x, y)) > 0
    True
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"from_torch: expected a torch.nn.Module, got {type(module).__name__}")
    if loss is not None and example_targets is None:
        raise ValueError("from_torch: loss= needs example_targets= (the targets of the example)")
    np_dtype = _default_dtype(dtype)
    check_eval_mode(module)
    model = model_in_dtype(module, torch.float64 if np_dtype == np.float64 else torch.float32)
    promote = (np_dtype == np.float64) if promote_float32_islands is None else bool(
        promote_float32_islands) and np_dtype == np.float64
    graphs = _Graphs(model, loss, np_dtype, promote=promote, fold=fold_constants)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = ParamDict(
        (n, jnp.asarray(p.detach().cpu().to(graphs.torch_dtype).numpy())) for n, p in named
    )
    align, layout = alignment_by_name((n, tuple(p.shape)) for n, p in named)
    kind = "dict" if isinstance(example_inputs, dict) else (
        "tuple" if isinstance(example_inputs, (tuple, list)) else "single")
    torch_inputs = graphs.to_torch(example_inputs)
    if loss is None:
        torch_args = (tuple(torch_inputs) if kind == "tuple" else torch_inputs,)
        graph_kind = _FORWARD
    else:
        torch_args = (torch_inputs, graphs.to_torch(example_targets))
        graph_kind = _LOSS
    graph = graphs.export(graph_kind, torch_args)
    graphs.cache[graphs.key(graph_kind, graphs.to_jax(torch_args))] = graph
    check_error = island_effect = None
    islands = graph.islands if np_dtype == np.float64 else ()
    promoted = any(i.promoted for i in islands)
    jax_args = graphs.to_jax(torch_args)
    if not check:
        jax.eval_shape(lambda p: graph(p, *jax_args), params)  # unsupported arguments, shapes
    else:
        from torch.utils import _pytree as pytree

        from ._export import call_model, torch_callable

        def leaves(tree: Any) -> list[np.ndarray]:
            return [t.detach().cpu().to(torch.float64).numpy() if t.is_floating_point()
                    else t.detach().cpu().numpy()
                    for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]

        with torch.no_grad():
            if loss is None:
                reference = call_model(model, torch_args[0])
            else:
                reference = loss(call_model(model, torch_args[0]), torch_args[1])
            expected = leaves(reference)
            if promoted:  # torch evaluates the same rewritten program
                run = torch_callable(graph.exported)
                rewritten = leaves(run(dict(model.named_parameters()), *torch_args))
                island_effect = _max_rel_error(rewritten, expected)
                expected = rewritten
        # one compiled program: op-by-op evaluation would compile every operator separately
        got = jax.jit(lambda p, args: graph(p, *args))(params, jax_args)
        check_error = _max_rel_error(expected, got)
        kept = any(not i.promoted for i in islands)
        rtol = check_rtol if check_rtol is not None else (
            1e-3 if np_dtype == np.float32 else 1e-5 if kept else 1e-12)
        if not check_error <= rtol:
            why = (" (the model keeps float32 islands: " + "; ".join(
                str(i) for i in islands if not i.promoted) + ")") if kept else ""
            raise ValueError(
                f"from_torch: the JAX twin of {type(module).__name__} differs from torch by "
                f"{check_error:.3g} (relative, tolerance {rtol:.1g}) on the example{why}"
            )
    return Twin(
        params=params, align=align, torch_layout=layout, jax_layout=layout, dtype=np_dtype,
        check_error=check_error, graph_code=graph.graph.python_code("self").src,
        operators=graph.operators, decomposition=graph.decomposition, example_kind=kind,
        islands=islands, island_effect=island_effect, _graphs=graphs,
    )
