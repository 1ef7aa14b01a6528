"""The Hessian of a PyTorch model's loss over a whole data set, as a :class:`dualhess.Operator`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

import dualhess

from ._data import Dataset, Objective, resolve_reduction
from ._distributed import all_reduce_sum, unwrap_ddp
from ._engines import ENGINES, TimedMatmatEngine, choose_engines
from ._memory import resolve_auto_chunk
from ._params import ParamSpec, prepare_model, select_params
from ._validity import ParameterWatch, check_model_mode, check_symmetric

__all__ = [
    "hessian",
    "HessianOperator",
    "TorchCurvatureOperator",
    "BuildOptions",
    "build_objective",
    "build_operator",
    "shared_parameters",
    "batch_normalizers",
]

METHODS = ("auto", "func", "autograd", "pyhessian")


SHARED_PARAMETERS = """\
    params : list of str or callable, optional
        Parameter names, or a predicate on names: the block of those parameters.
        Default: all parameters with ``requires_grad``.
    chunk_size : int or "auto", optional
        Columns per vectorised call in ``matmat``: peak memory is about ``chunk_size`` x one
        product. ``"auto"`` measures one product's memory and picks the largest chunk that
        fits in the free device memory (:mod:`torch_backend._memory`).
    dtype : torch.dtype, optional
        Analyse a copy of the model and data in this dtype (e.g. ``torch.float64``).
    device : torch.device or str, optional
        Analyse a copy of the model, and the data, on this device. Refused for a model whose
        parameters live on several devices (``device_map="auto"``): such a model is analysed
        where it is, each parameter on its own device, with the flat vectors and the data on
        its first parameter's device (``op.layout``;
        :func:`torch_backend._params.prepare_model`).
    reduction : {"mean", "sum"}, optional
        For a plain callable ``loss_fn`` or a ``closure`` (default ``"mean"``): whether it
        averages or sums over a batch. Read from ``loss_fn.reduction`` for loss modules.
    normalizer : callable, optional
        ``normalizer(batch) -> number``: what a batch's mean loss divides by, when that is
        not its number of samples (tokens kept under a mask, a sum of weights). The
        whole-data-set loss is ``sum_b sum_i l_bi / sum_b m_b``: batch ``b`` enters with
        weight ``m_b / sum m``, never as a mean of batch means. Not needed for torch loss
        modules, whose own normaliser is read off (``CrossEntropyLoss(ignore_index=-100)``
        counts the kept labels, ``weight=`` sums the class weights of the targets), nor for
        a loss or closure that returns ``(loss_sum, normalizer)``. For a Hugging Face
        model's own ``.loss`` over labels padded with -100, pass
        ``normalizer=torch_backend.label_count(shift=True)`` (causal LMs) or
        ``label_count()``; a closure over such labels without one is refused.
    closure : callable, optional
        ``closure(model, batch) -> scalar``, instead of ``loss_fn``: any loss a researcher
        writes (a model that computes its own loss, ``model(**batch).loss``; input
        derivatives of a physics-informed loss; regularisers). ``model`` is called as usual
        inside; the operator substitutes the parameters functionally
        (:func:`torch.func.functional_call`), so ``model(x)``, ``model.parameters()`` and
        ``model.weight`` see the substituted tensors. Batches may then be anything: one batch
        is a tensor, a tuple or a mapping; a list, a ``DataLoader`` or another iterable is
        an iterable of batches. The Hessian only: the GGN and Fisher need
        ``loss_fn(outputs, targets)``. See ``docs/losses.md``.
    batch_size : callable, optional
        ``batch_size(batch) -> int``, the number of samples of a batch, for the
        whole-data-set weighting. Default: the leading dimension of the targets (pairs) or of
        the batch's first tensor (closures; pytree order, i.e. a dict's insertion order).
    check_deterministic : bool
        At construction, iterate the data twice and compare, evaluate the loss twice and
        compare (a forward pass that draws random numbers: Dropout forced on, noise), and
        compare two products of the same vector (default True). Costs two data passes and
        two products.
    check_symmetric : bool
        At construction, compare ``u^T H v`` with ``v^T H u`` and refuse an operator that is
        not symmetric beyond rounding (:func:`torch_backend._validity.check_symmetric`: a
        framework's wrong second derivative). One more product (default True).
"""


def shared_parameters(func: Callable[..., Any]) -> Callable[..., Any]:
    """Put :data:`SHARED_PARAMETERS` where ``func``'s docstring has ``{shared_parameters}``."""
    if func.__doc__:
        func.__doc__ = func.__doc__.replace("    {shared_parameters}\n", SHARED_PARAMETERS)
    return func


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """The construction options every torch curvature constructor shares.

    Each public constructor (:func:`hessian`, :func:`~torch_backend.ggn`,
    :func:`~torch_backend.fisher`, :func:`~torch_backend.exact_diagonal`) keeps them as
    explicit keywords in its signature (documented once, :data:`SHARED_PARAMETERS`) and hands
    them on as one of these to :func:`build_operator` / :func:`build_objective`.
    """

    params: ParamSpec = None
    chunk_size: int | str | None = None
    dtype: torch.dtype | None = None
    device: Any = None
    reduction: str | None = None
    closure: Callable[[Any, Any], Any] | None = None
    batch_size: Callable[[Any], int] | None = None
    check_deterministic: bool = True
    normalizer: Callable[[Any], Any] | None = None
    check_symmetric: bool = True


def _resolve_loss(loss_fn: Any, options: BuildOptions, where: str) -> str:
    """Check that exactly one of ``loss_fn`` and ``closure`` is given; return the reduction."""
    closure = options.closure
    if closure is None:
        if loss_fn is None:
            raise TypeError(
                f"{where}: no loss: pass loss_fn(outputs, targets) -> scalar, or "
                "closure=fn(model, batch) -> scalar for any other loss"
            )
        return resolve_reduction(loss_fn, options.reduction)
    if loss_fn is not None:
        raise TypeError(
            f"{where}: pass either loss_fn (a loss of the model outputs) or "
            "closure=fn(model, batch) (the whole batch loss), not both"
        )
    if not callable(closure):
        raise TypeError(f"{where}: closure must be callable (model, batch) -> scalar, got {closure!r}")
    reduction = "mean" if options.reduction is None else options.reduction
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"{where}: reduction must be 'mean' (the closure returns the mean over the samples "
            f"of a batch) or 'sum', got {reduction!r}"
        )
    return reduction


def build_objective(
    model: torch.nn.Module,
    loss_fn: Callable[..., Any] | None,
    data: Any,
    options: BuildOptions,
    *,
    where: str = "hessian",
    single: bool | None = None,
) -> tuple[Objective, dualhess.ParamLayout, dict, dict]:
    """Shared construction of every torch curvature operator: ``(objective, layout, selected,
    fixed)``, with the whole-data-set loss checked finite (``objective.loss_value``)."""
    reduction = _resolve_loss(loss_fn, options, where)
    if data is None:
        raise TypeError(f"{where}: data is None; pass one batch or an iterable of batches")
    model = unwrap_ddp(model)
    work, dtype_, device_, converted = prepare_model(model, _resolve_dtype(options.dtype),
                                                     options.device)
    check_model_mode(work, several_batches=False)
    layout, selected, fixed = select_params(work, options.params, home=device_)
    dataset = Dataset(
        data,
        reduction=reduction,
        dtype=dtype_,
        device=device_,
        convert=converted,
        pairs=options.closure is None,
        batch_size=options.batch_size,
        single=single,
        check_deterministic=options.check_deterministic,
    )
    check_model_mode(work, several_batches=dataset.num_batches > 1 or dataset.group is not None)
    objective = Objective(
        work, dataset, loss_fn=loss_fn, closure=options.closure, normalizer=options.normalizer
    )
    _check_finite_parameters({**fixed, **selected}, where)
    try:
        objective.loss_value = objective.scan({**fixed, **selected})
    except (IndexError, RuntimeError, ValueError) as err:
        _explain_loss_failure(err, objective, {**fixed, **selected}, where)
        raise
    _check_loss_has_gradient(objective, selected, fixed, where)
    if options.check_deterministic:
        _check_same_loss(objective, {**fixed, **selected}, where)
    return objective, layout, selected, fixed


def _resolve_dtype(dtype: Any) -> torch.dtype | None:
    """``dtype=`` as a ``torch.dtype``: a dtype, None, or its name ("float64", "torch.float32")."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        found = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(found, torch.dtype):
            return found
    raise TypeError(
        f"dtype must be a torch.dtype such as torch.float64 (or its name, 'float64'), got "
        f"{dtype!r}"
    )


def batch_normalizers(
    model: torch.nn.Module, loss_fn: Any, data: Any, *, dtype: torch.dtype | None = None
) -> list[float] | None:
    """What each batch's loss divides by, in the order of the batches, as the operators read
    ``loss_fn`` (:class:`~torch_backend._data.Objective.scan`: kept labels, class-weight sums,
    elements, samples); ``None`` for a loss that is a sum. One forward pass per batch.

    The JAX twin weights its batches with these, so that both frameworks differentiate the
    same whole-data-set loss.

    Examples
    --------
    >>> import torch
    >>> X, y = torch.randn(4, 3), torch.tensor([0, -100, 1, 1])
    >>> batch_normalizers(torch.nn.Linear(3, 2), torch.nn.CrossEntropyLoss(), [(X[:2], y[:2]),
    ...                   (X[2:], y[2:])])
    [1.0, 2.0]
    """
    reduction = resolve_reduction(loss_fn, None)
    model = unwrap_ddp(model)
    work, dtype_, device_, converted = prepare_model(model, _resolve_dtype(dtype), None)
    layout, selected, fixed = select_params(work, None, home=device_)
    dataset = Dataset(data, reduction=reduction, dtype=dtype_, device=device_,
                      convert=converted, check_deterministic=False)
    objective = Objective(work, dataset, loss_fn=loss_fn)
    objective.scan({**fixed, **selected})
    if reduction == "sum":
        return None
    return list(dataset.normalizers)


def _check_finite_parameters(params: dict, where: str) -> None:
    """Refuse NaN/Inf in the parameters or buffers (the products would be NaN, or worse not)."""
    bad = [
        name
        for name, value in params.items()
        if isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and value.device.type != "meta"
        and not bool(torch.isfinite(value).all())
    ]
    if bad:
        raise ValueError(
            f"{where}: parameters contain NaN or Inf: {bad[:5]}; the curvature at non-finite "
            "weights is undefined (a diverged run? analyse an earlier checkpoint)"
        )


def _check_loss_has_gradient(objective: Objective, selected: dict, fixed: dict, where: str) -> None:
    """The loss of the first batch must depend on the selected parameters through autograd."""
    leaves = {name: value.detach().requires_grad_(True) for name, value in selected.items()}
    first = next(iter(objective.dataset.batches()), None)
    if first is None:  # this rank's shard is empty (torch.distributed)
        return
    batch = first[1]
    with torch.enable_grad():
        loss = objective._raw_loss({**fixed, **leaves}, batch)
    if objective.returns_pairs:
        loss, _ = objective._split_pair(loss)  # refuses a normaliser with a gradient
    if isinstance(loss, torch.Tensor) and not loss.requires_grad:
        raise ValueError(
            f"{where}: the loss has no gradient in the selected parameters (it carries no "
            "autograd graph), so its curvature is not defined: the loss detaches the outputs "
            "(.detach(), .item(), numpy, argmax/accuracy) or runs under torch.no_grad(), or "
            "params= selects parameters the loss does not use. Return a differentiable loss."
        )


def _explain_loss_failure(err: Exception, objective: Objective, params: dict, where: str) -> None:
    """Turn a raw framework error of the first loss evaluation into one that says what to do
    (mismatched batch sizes, class labels out of range); otherwise return (re-raised as is)."""
    if objective.is_closure or str(err).startswith(("the loss is", "loss_fn must")):
        return
    text = str(err)
    for index, (_, (inputs, targets)) in enumerate(objective.dataset.batches()):
        if not isinstance(targets, torch.Tensor) or targets.ndim == 0:
            continue
        leaves = [x for x in tree_flatten(inputs)[0] if isinstance(x, torch.Tensor) and x.ndim]
        integers = [x for x in leaves if not x.is_floating_point() and not x.is_complex()]
        if integers and isinstance(err, RuntimeError) and (
            "dtype" in text or "scalar type" in text or "Long" in text or "Int" in text
        ):
            raise TypeError(
                f"{where}: batch {index} has integer inputs ({integers[0].dtype}) that the "
                f"model multiplies with its {objective.dataset.dtype} weights: convert features "
                "to floating point (X.float(), or X.to(torch.float64) with dtype=torch.float64); "
                "integer inputs are for embedding layers (token ids). The model said: "
                f"{text.splitlines()[0][:200]}"
            ) from err
        if (
            isinstance(objective.loss_fn, (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss))
            and not targets.is_floating_point()
            and targets.ndim == 2
            and targets.shape[1] == 1
        ):
            raise ValueError(
                f"{where}: batch {index} has class-label targets of shape "
                f"{tuple(targets.shape)}: {type(objective.loss_fn).__name__} wants one label per "
                "sample, shape (N,). Use targets.squeeze(1) (or y.view(-1))."
            ) from err
        sizes = sorted({int(x.shape[0]) for x in leaves})
        if sizes and sizes != [int(targets.shape[0])]:
            raise ValueError(
                f"{where}: batch {index} pairs inputs of batch size {sizes} with "
                f"{int(targets.shape[0])} targets: every input needs its target (the leading "
                "dimensions must agree). Check how the batches are built, e.g. "
                "DataLoader(TensorDataset(X, y))."
            ) from err
        if isinstance(err, IndexError) and not targets.is_floating_point():
            with torch.no_grad():
                outputs = objective.call(params, inputs)
            classes = int(outputs.shape[1]) if getattr(outputs, "ndim", 0) >= 2 else None
            low, high = int(targets.min()), int(targets.max())
            if classes is not None and (low < 0 or high >= classes):
                raise ValueError(
                    f"{where}: class labels out of range in batch {index}: the targets run "
                    f"from {low} to {high}, but the model has {classes} outputs, so labels "
                    f"must lie in [0, {classes - 1}]. Check for 1-based labels or an output "
                    f"layer smaller than the label set. The loss said: {err}"
                ) from err


def _check_same_loss(objective: Objective, params: dict, where: str) -> None:
    """A second evaluation of the whole-data-set loss must repeat the first (to rounding).

    Products that reuse one autograd graph repeat its random draws, so comparing products
    alone misses a forward that draws randomness; the loss itself is evaluated afresh.
    """
    first = objective.loss_value
    second = objective.total_loss(params)
    dtype = next(iter(params.values())).dtype if params else torch.float64
    eps = float(torch.finfo(dtype).eps) if dtype.is_floating_point else 2.0**-52
    scale = max(abs(first), abs(second), 1e-300)
    if not abs(first - second) <= eps**0.5 * scale:
        raise ValueError(
            f"{where}: the loss differs between two evaluations on the same data and "
            f"parameters ({first!r} then {second!r}): the forward pass draws random numbers, "
            "so every product would see a different function. Likely causes: Dropout called "
            "as F.dropout(x, training=True), torch.randn_like/rand/bernoulli noise in "
            "forward, stochastic depth (DropPath) that ignores self.training, random "
            "augmentation inside the model, or non-deterministic kernels. Make the "
            "randomness follow model.eval() (training=self.training), or pass "
            "check_deterministic=False to skip this check."
        )


def build_operator(
    cls: type,
    model: torch.nn.Module,
    loss_fn: Callable[..., Any] | None,
    data: Any,
    options: BuildOptions,
    **own: Any,
) -> Any:
    """Build ``cls(objective, layout, selected, fixed, chunk_size=..., **own)`` from the
    shared options, resolve ``chunk_size="auto"`` and run the determinism check."""
    where = cls.curvature or cls.__name__
    if options.closure is not None and not cls.accepts_closure:
        raise TypeError(
            f"{where}: a closure cannot define this curvature: it is built from the model "
            "outputs and the Hessian of the loss in them (J^T H_L J, per-sample gradients of "
            "the loss of each output), which closure(model, batch) hides. Pass "
            "loss_fn(outputs, targets) with (inputs, targets) batches, or use "
            "torch_backend.hessian(model, data=..., closure=...) for the Hessian of the closure."
        )
    objective, layout, selected, fixed = build_objective(model, loss_fn, data, options, where=where)
    auto = options.chunk_size == "auto"
    op = cls(
        objective, layout, selected, fixed, chunk_size=None if auto else options.chunk_size, **own
    )
    resolve_auto_chunk(op, options.chunk_size)
    probe = None
    if options.check_deterministic:
        probe = op._check_deterministic()
    if options.check_symmetric:
        check_symmetric(op, probe, model=objective.model)
    return op


def _reduced(local: Callable[..., torch.Tensor], group: Any) -> Callable[..., torch.Tensor]:
    def reduced(*args: Any) -> torch.Tensor:
        return all_reduce_sum(local(*args).contiguous(), group)

    return reduced


class TorchCurvatureOperator(dualhess.Operator):
    """Base class of the torch curvature operators (flat torch vectors on the home device).

    Flat vectors (the products' inputs and outputs, :meth:`gradient`, :attr:`params_flat`)
    live on the *home device*: the ``device=`` the user passed, else the device of the
    model's first parameter. A model whose parameters live on several devices (Hugging Face
    ``device_map="auto"``) is analysed where it is: ``op.layout`` names each parameter's
    device, products split their vectors into blocks on those devices and join the results
    back onto the home device (``op.layout.spans_devices`` says whether any block moves).

    Attributes
    ----------
    layout : dualhess.ParamLayout
        Names (from ``model.named_parameters()``), shapes and slices of the flat vector, each
        parameter's device and the home device of flat vectors (``layout.home``).
    objective : torch_backend._data.Objective
        The model and its loss (``loss_fn`` or a closure): ``objective.total_loss(params)``.
    dataset : torch_backend._data.Dataset
        The fixed, checked batches (sizes, weights, iteration).
    loss : float
        The whole-data-set loss at the current parameters.
    num_samples : int
        ``N``, the number of samples.
    """

    owns_outputs = True  # every engine returns a new tensor per product

    curvature = ""
    #: Whether the operator can be built from a ``closure(model, batch)`` (the Hessian can;
    #: the GGN and Fisher need the model outputs of a ``loss_fn(outputs, targets)``).
    accepts_closure = False

    def __init__(
        self,
        objective: Objective,
        layout: dualhess.ParamLayout,
        selected: dict[str, torch.Tensor],
        fixed: dict[str, torch.Tensor],
        chunk_size: int | None,
    ) -> None:
        self.objective = objective
        self.dataset: Dataset = objective.dataset
        self.layout = layout
        self.selected = selected
        self.fixed = fixed
        super().__init__(
            (layout.size, layout.size),
            self.dataset.dtype,
            like=torch.zeros(0, dtype=self.dataset.dtype, device=self.dataset.device),
            chunk_size=chunk_size,
        )
        if self.dataset.group is not None:
            self._reduce_over_ranks(self.dataset.group)
        buffers = dict(objective.model.named_buffers())
        self._watch = ParameterWatch(
            {**fixed, **selected, **{f"buffer {k}": b for k, b in buffers.items()}},
            type(self).__name__,
        )

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self._watch.check()
        return super().matvec(v)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        self._watch.check()
        return super().matmat(V)

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
        return self.objective.loss_value

    @property
    def num_samples(self) -> int:
        return self.dataset.num_samples

    @property
    def reduction(self) -> str:
        return self.dataset.reduction

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
        delta = delta.detach().to(dtype=self.dtype, device=self.dataset.device)
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
        self._watch.check()
        return float(self.objective.total_loss(self._shifted(delta)))

    def gradient(self) -> torch.Tensor:
        """The gradient of the whole-data-set loss at ``theta``, a flat ``(n,)`` tensor.

        Each batch's gradient is weighted as in the products (exact per-sample mean over
        unequal batches); under ``torch.distributed`` it is summed over the ranks.
        """
        self._watch.check()
        names = list(self.selected)
        total = torch.zeros(self.n, dtype=self.dtype, device=self.dataset.device)
        for weight, batch in self.dataset.batches():
            leaves = {name: self.selected[name].detach().requires_grad_(True) for name in names}
            with torch.enable_grad():
                loss = self.objective.batch_loss({**self.fixed, **leaves}, batch)
                grads = torch.autograd.grad(loss, [leaves[name] for name in names],
                                            allow_unused=True)
            flat = self.layout.join({
                name: torch.zeros_like(leaves[name]) if g is None else g
                for name, g in zip(names, grads)
            })
            total = total + weight * flat.detach()
        return all_reduce_sum(total, self.dataset.group)

    def split(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector into ``{parameter name: tensor of the parameter's shape}``."""
        return self.layout.split(vec)

    def join(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Join ``{parameter name: tensor}`` into a flat vector (layout order)."""
        return self.layout.join(parts)

    def _check_deterministic(
        self, seed: int = 0, made: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two products of the same vector must agree; raise with the likely causes otherwise.
        ``made``: a product ``(v, H v)`` already made with this operator's engine (then one
        more is enough). Returns ``(v, H v)`` for the symmetry check to reuse."""
        if made is None:
            v = self.asarray(np.random.default_rng(seed).standard_normal(self.n))
            first = self._matvec(v)
        else:
            v, first = made
        second = self._matvec(v)
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
        return v, first

    def exact_diagonal(self) -> torch.Tensor:
        """The exact diagonal with BackPACK (whole data set): ``DiagHessian`` for the Hessian,
        ``DiagGGNExact`` for the GGN.

        Raises
        ------
        dualhess.ExactUnavailableError
            When BackPACK cannot handle the model or the loss.
        """
        self._watch.check()
        if self.curvature not in ("hessian", "ggn"):
            return super().exact_diagonal()
        from ._backpack import backpack_diagonal

        return backpack_diagonal(self.objective, self.layout, self.curvature)


class HessianOperator(TorchCurvatureOperator):
    """The Hessian of the whole-data-set loss with respect to the selected parameters.

    Build it with :func:`hessian`. ``method`` records the HVP engine of ``matvec`` (the one
    chosen by ``"auto"``), ``matmat_method`` that of ``matmat`` (``"autograd (columns)"``: one
    product per column), ``method_timings`` the seconds per product measured by ``"auto"`` and
    ``method_failures`` why a probe failed or was skipped.
    """

    curvature = "hessian"
    accepts_closure = True

    def __init__(self, objective, layout, selected, fixed, *, method, chunk_size) -> None:
        super().__init__(objective, layout, selected, fixed, chunk_size)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method_timings: dict[str, float] = {}
        self.method_failures: dict[str, str] = {}
        self.matmat_method = method
        if method == "auto":
            method, self._engine = self._choose_method()
        else:
            self._engine = ENGINES[method](objective, layout, selected, fixed)
        self.method = method

    def _choose_method(self) -> tuple[str, Any]:
        """Pick the ``matvec`` and ``matmat`` engines from single products (see
        :func:`torch_backend._engines.choose_engines`: a few products' worth, with a margin).
        The products made double as the determinism check."""
        v = self.asarray(np.random.default_rng(0).standard_normal(self.n))
        best, self.matmat_method, engine, timings, failures, probe = choose_engines(
            self.objective, self.layout, self.selected, self.fixed, v
        )
        self.method_timings.update(timings)
        self.method_failures.update(failures)
        self._probe = probe
        if isinstance(engine.matmat_engine, TimedMatmatEngine):
            engine.matmat_engine.report = self._matmat_chosen
        return best, engine

    def _matmat_chosen(self, name: str, timings: dict[str, float]) -> None:
        """The engine :class:`~torch_backend._engines.TimedMatmatEngine` picked."""
        self.matmat_method = name
        self.method_timings.update(timings)

    def _check_deterministic(self, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Reuse the two products ``"auto"`` made of one vector (two engines, same matrix);
        where they differ, or only one was made, compare two products of the chosen one."""
        probe, self._probe = getattr(self, "_probe", None), None
        if seed == 0 and probe is not None and probe[2] is not None:
            v, first, second = probe
            scale = float(torch.linalg.vector_norm(first))
            diff = float(torch.linalg.vector_norm(first - second))
            if diff <= float(torch.finfo(self.dtype).eps) ** 0.5 * max(scale, 1e-30):
                return v, first
        if seed == 0 and probe is not None and probe[2] is None:
            return super()._check_deterministic(seed, made=(probe[0], probe[1]))
        return super()._check_deterministic(seed)

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self._engine.matvec(v)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self._engine.matmat(V)

    def __repr__(self) -> str:
        return (
            f"HessianOperator(n={self.n}, dtype={self.dtype}, method={self.method!r}, "
            f"num_samples={self.num_samples}, num_matvecs={self.num_matvecs})"
        )


@shared_parameters
def hessian(
    model: torch.nn.Module,
    loss_fn: Callable[..., Any] | None = None,
    data: Any = None,
    *,
    params: ParamSpec = None,
    method: str = "auto",
    chunk_size: int | str | None = None,
    dtype: torch.dtype | None = None,
    device: Any = None,
    reduction: str | None = None,
    closure: Callable[[Any, Any], Any] | None = None,
    batch_size: Callable[[Any], int] | None = None,
    check_deterministic: bool = True,
    normalizer: Callable[[Any], Any] | None = None,
    check_symmetric: bool = True,
) -> HessianOperator:
    """The Hessian of a model's loss over a whole data set, as a matrix-free operator.

    Parameters
    ----------
    model : torch.nn.Module
        Any module. It is evaluated with :func:`torch.func.functional_call` on detached copies
        of its parameters: its parameters, ``.grad``, hooks and train/eval mode are never
        changed. BatchNorm or Dropout in train mode is refused with an error asking for
        ``model.eval()`` (batch statistics and random masks do not define a fixed operator).
    loss_fn : callable, optional
        An ``nn`` loss module (its ``reduction`` is read) or any callable
        ``(outputs, targets) -> scalar``. Or pass ``closure=`` instead.
    data : (inputs, targets) or iterable of batches
        One batch (inputs a tensor, a tuple or a dict of tensors) or e.g. a ``DataLoader``
        with ``shuffle=False``. The operator is the Hessian of the loss of the whole data set,
        each batch weighted by what its loss divides by (``normalizer``: samples, kept
        tokens, class-weight sums; exact with an unequal last batch). With a ``closure``,
        batches of any form.
    method : {"auto", "func", "autograd", "pyhessian"}
        HVP engine (see :mod:`torch_backend.engines`). ``"auto"`` times one product of each
        of ``autograd`` and ``func`` at construction and keeps ``func`` for ``matvec`` only
        when it is clearly faster (a 0.8 margin, ``op.method``); ``matmat`` goes column by
        column on a CPU and is probed batched on a GPU (``op.matmat_method``). The products
        made double as the determinism check, so the choice costs one or two products.
        A closure that calls ``torch.autograd.grad`` itself (a physics-informed loss) cannot
        run under ``torch.func`` transforms: ``"auto"`` then keeps ``"autograd"`` (the
        reason is in ``op.method_failures``) and an explicit ``"func"`` is an error.
    {shared_parameters}

    Returns
    -------
    HessianOperator
        ``op.matvec``/``op.matmat`` on flat tensors; ``op.layout``, ``op.split``,
        ``op.join``; ``op.exact_diagonal()`` through BackPACK where possible. The operator
        belongs to the parameters it was built at: a product, ``loss_at`` or ``gradient``
        after the model's parameters or buffers changed (an optimizer step,
        ``p.data.mul_()``) raises :class:`dualhess.StaleOperatorError`; build a new one.

    Examples
    --------
    >>> import torch, dualhess
    >>> from torch_backend import hessian
    >>> model = torch.nn.Linear(3, 2)
    >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> op = hessian(model, torch.nn.CrossEntropyLoss(), (X, y), dtype=torch.float64)
    >>> op.shape
    (8, 8)

    A loss the model computes itself, labels inside a dict batch:

    >>> def closure(model, batch):
    ...     return torch.nn.functional.cross_entropy(model(batch["x"]), batch["labels"])
    >>> op = hessian(model, data={"x": X, "labels": y}, closure=closure, dtype=torch.float64)
    >>> op.shape
    (8, 8)
    """
    options = BuildOptions(
        params=params, chunk_size=chunk_size, dtype=dtype, device=device, reduction=reduction,
        closure=closure, batch_size=batch_size, check_deterministic=check_deterministic,
        normalizer=normalizer, check_symmetric=check_symmetric,
    )
    return build_operator(HessianOperator, model, loss_fn, data, options, method=method)
