"""The Hessian of a loss with respect to the inputs of one batch, as a :class:`dualhess.Operator`.

``H = d^2 L / dx^2`` where ``x`` is the flat concatenation of the batch's input tensors (the
parameters stay fixed). Its spectrum says how sharply the loss bends under input
perturbations (adversarial directions, the curvature of a physics-informed residual in its
collocation points); every algorithm (``eigsh``, ``trace``, ``density``) runs on it.

The products reuse the parameter-Hessian engines (:mod:`torch_backend._engines`) with the
roles swapped: the "parameters" are the input tensors, the model's parameters are constants,
and the data is the one batch. ``"autograd"`` builds the first-order graph once and each
product is one backward; ``"func"`` is ``jvp`` of ``grad``, vmapped over columns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten_with_path, tree_unflatten

import dualhess

from ._engines import ENGINES
from ._hessian import BuildOptions, build_objective

__all__ = ["input_hessian", "InputHessianOperator"]

METHODS = ("autograd", "func")


def _path_name(path: tuple[Any, ...]) -> str:
    """``'/'``-joined keys of a pytree path (dict keys, tuple indices); ``"inputs"`` at the root."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:  # pragma: no cover - other key kinds
            parts.append(str(key))
    return "/".join(parts) if parts else "inputs"


class _OneBatch:
    """The one batch of an input Hessian, in the form the engines iterate (weight 1)."""

    single = True

    def __init__(self, batch: Any) -> None:
        self._batch = batch

    def batches(self) -> Iterator[tuple[float, Any]]:
        yield 1.0, self._batch


class _InputObjective:
    """The batch loss as a function of the input tensors ``{name: tensor}`` (parameters
    fixed), with the interface of :class:`~torch_backend._data.Objective` the engines use."""

    def __init__(self, objective: Any, params: dict[str, torch.Tensor], batch: Any,
                 rebuild: Callable[[dict[str, torch.Tensor]], Any]) -> None:
        self.objective = objective
        self.params = params
        self.rebuild = rebuild
        self.dataset = _OneBatch(batch)
        self.is_closure = objective.is_closure

    def batch_loss(self, inputs: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return self.objective.batch_loss(self.params, self.rebuild(inputs))


class InputHessianOperator(dualhess.Operator):
    """The Hessian of one batch's loss with respect to its inputs; see :func:`input_hessian`.

    Attributes
    ----------
    layout : dualhess.ParamLayout
        Names (``"inputs"`` for a single tensor, dict keys, tuple indices), shapes and slices
        of the input tensors in the flat vector.
    inputs : dict of str to torch.Tensor
        The input tensors the Hessian is taken at (converted to the analysis dtype/device).
    loss : float
        The batch loss at these inputs.
    method : str
        The product engine (``"autograd"`` or ``"func"``).
    """

    def __init__(self, objective: Any, layout: dualhess.ParamLayout, inputs: dict,
                 *, method: str, chunk_size: int | None, loss: float) -> None:
        if method not in METHODS:
            raise ValueError(f"input_hessian: method must be one of {METHODS}, got {method!r}")
        first = next(iter(inputs.values()))
        super().__init__(
            (layout.size, layout.size),
            first.dtype,
            like=torch.zeros(0, dtype=first.dtype, device=first.device),
            chunk_size=chunk_size,
        )
        self.layout = layout
        self.inputs = inputs
        self.loss = loss
        self.method = method
        self._engine = ENGINES[method](objective, layout, inputs, {})

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self._engine.matvec(v)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self._engine.matmat(V)

    def split(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector into ``{input name: tensor of the input's shape}``."""
        return self.layout.split(vec)

    def join(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Join ``{input name: tensor}`` into a flat vector (layout order)."""
        return self.layout.join(parts)

    def __repr__(self) -> str:
        return (
            f"InputHessianOperator(n={self.n}, dtype={self.dtype}, inputs={self.layout.names}, "
            f"method={self.method!r}, num_matvecs={self.num_matvecs})"
        )


def _select(named: list[tuple[str, Any]], wrt: Sequence[str] | None, closure: bool) -> list[int]:
    """Indices of the leaves to differentiate; integer inputs are a clear error."""
    tensors = [i for i, (_, leaf) in enumerate(named) if isinstance(leaf, torch.Tensor)]
    names = [named[i][0] for i in tensors]
    if wrt is not None:
        wanted = [wrt] if isinstance(wrt, str) else list(wrt)
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise KeyError(f"input_hessian: wrt names {unknown} not in the batch; known: {names}")
        chosen = [i for i in tensors if named[i][0] in wanted]
    elif closure:  # a closure's batch holds the labels too: its floating tensors by default
        chosen = [i for i in tensors if named[i][1].is_floating_point()]
        if not chosen:
            raise TypeError(
                f"input_hessian: the batch has no floating-point tensor to differentiate "
                f"(tensors {names}: {[str(named[i][1].dtype) for i in tensors]}). Integer "
                "inputs such as token ids cannot be differentiated: differentiate the "
                "embeddings instead (pass inputs_embeds in the batch and embed inside the "
                "closure)"
            )
    else:
        chosen = tensors
    integer = [named[i][0] for i in chosen if not named[i][1].is_floating_point()]
    if integer:
        raise TypeError(
            f"input_hessian: inputs {integer} are integer tensors "
            f"({[str(named[i][1].dtype) for i in chosen if named[i][0] in integer]}), which "
            "cannot be differentiated (token ids, indices). Differentiate the embeddings "
            "instead (feed inputs_embeds / the embedded tensor), or choose the floating inputs "
            "with wrt=[...]"
        )
    if not chosen:
        raise ValueError("input_hessian: the batch holds no tensor to differentiate")
    return chosen


def input_hessian(
    model: torch.nn.Module,
    loss_fn: Callable[..., Any] | None = None,
    batch: Any = None,
    *,
    closure: Callable[[Any, Any], Any] | None = None,
    wrt: str | Sequence[str] | None = None,
    method: str = "autograd",
    chunk_size: int | None = None,
    dtype: torch.dtype | None = None,
    device: Any = None,
) -> InputHessianOperator:
    """The Hessian of one batch's loss with respect to the batch's inputs.

    Parameters
    ----------
    model : torch.nn.Module
        Evaluated with its parameters fixed (detached; never modified). BatchNorm/Dropout in
        train mode are refused, as in :func:`torch_backend.hessian`.
    loss_fn : callable, optional
        ``(outputs, targets) -> scalar``; the batch is then ``(inputs, targets)`` and the
        Hessian is taken with respect to ``inputs`` (a tensor, a tuple or a dict of tensors).
    batch : batch
        ONE batch: ``(inputs, targets)`` for ``loss_fn``, anything for ``closure``.
    closure : callable, optional
        ``closure(model, batch) -> scalar`` instead of ``loss_fn``; the Hessian is taken with
        respect to the batch's floating-point tensors (``wrt`` chooses).
    wrt : str or list of str, optional
        The names of the tensors to differentiate (see ``op.layout.names``): ``"inputs"``
        for a single tensor, dict keys (``"a/b"`` when nested), tuple indices (``"0"``).
        Default: every tensor of ``inputs`` (``loss_fn``), every floating tensor of the
        batch (``closure``).
    method : {"autograd", "func"}
        ``"autograd"`` (default): the first-order graph is built once, each product is one
        backward (works for closures that call ``torch.autograd.grad`` themselves).
        ``"func"``: ``jvp`` of ``grad`` with :mod:`torch.func`, vmapped over columns.
    chunk_size : int, optional
        Columns per vectorised call in ``matmat``.
    dtype, device : optional
        Analyse copies of the model and batch in this dtype / on this device.

    Returns
    -------
    InputHessianOperator
        An operator on flat vectors of length ``sum(x.numel() for x in the inputs)``;
        ``op.layout`` names the input tensors, ``op.split``/``op.join`` convert.

    Raises
    ------
    TypeError
        Integer inputs (token ids) named or implied: they cannot be differentiated.

    Examples
    --------
    >>> import torch, dualhess
    >>> from torch_backend import input_hessian
    >>> model = torch.nn.Linear(3, 2)
    >>> X, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    >>> op = input_hessian(model, torch.nn.CrossEntropyLoss(), (X, y), dtype=torch.float64)
    >>> op.shape, op.layout.names
    ((12, 12), ['inputs'])
    >>> bool(dualhess.eigsh(op, k=1, seed=0).values[0] >= -1e-12)  # convex in the inputs
    True
    """
    options = BuildOptions(
        params=lambda name: True, dtype=dtype, device=device, closure=closure,
        check_deterministic=False,
    )
    objective, _, selected, fixed = build_objective(
        model, loss_fn, batch, options, where="input_hessian", single=True
    )
    params = {**fixed, **selected}
    _, converted = next(objective.dataset.batches())
    tree = converted if objective.is_closure else converted[0]
    flat, treedef = tree_flatten_with_path(tree)
    named = [(_path_name(path), leaf) for path, leaf in flat]
    chosen = _select(named, wrt, objective.is_closure)
    inputs = {named[i][0]: named[i][1].detach() for i in chosen}

    def rebuild(parts: dict[str, torch.Tensor]) -> Any:
        leaves = [parts.get(name, leaf) for name, leaf in named]
        new = tree_unflatten(leaves, treedef)
        return new if objective.is_closure else (new, converted[1])

    layout = dualhess.ParamLayout.from_shapes((n, tuple(x.shape)) for n, x in inputs.items())
    adapter = _InputObjective(objective, params, converted, rebuild)
    return InputHessianOperator(
        adapter, layout, inputs, method=method, chunk_size=chunk_size, loss=objective.loss_value
    )
