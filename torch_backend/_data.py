"""Data and loss handling shared by every torch curvature operator.

A curvature operator is *fixed*: every product sees the same samples. Two objects carry that
(the same words as in :mod:`jax_backend._data`):

* :class:`Dataset`: the user's ``data`` (one batch or an iterable of batches), checked once,
  iterated in a fixed order, moved to the analysis device and dtype, each batch with the
  weight that makes the sum over batches the loss of the whole data set:

  - ``reduction="mean"``: batch ``b`` of size ``n_b`` gets weight ``n_b / N`` (``N`` samples
    in all), so the total is the exact per-sample mean, never a mean of batch means;
  - ``reduction="sum"``: every batch gets weight 1.

* :class:`Objective`: what the loss of one batch is, at given parameters: either
  ``loss_fn(model(inputs), targets)`` over ``(inputs, targets)`` pairs, or a closure
  ``closure(model, batch) -> scalar`` over batches of any form (dicts, tuples, tensors), in
  which ``model`` is called as usual and runs on the substituted parameters.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from ._distributed import active_group, all_reduce_scalar


@contextlib.contextmanager
def differentiable_attention() -> Iterator[None]:
    """A context in which attention runs on kernels with derivatives of every order.

    ``nn.MultiheadAttention`` and ``nn.TransformerEncoder`` have two fused paths that a
    Hessian-vector product cannot go through:

    * ``torch.nn.functional.scaled_dot_product_attention`` picks a fused kernel (flash,
      memory-efficient, cuDNN) where it can; those implement a first backward only ("derivative
      for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented", no
      forward AD). Here it is restricted to its math kernel, plain differentiable tensor
      algebra with the same values to rounding.
    * In eval mode, when it sees no tensor that requires grad (as under ``torch.func``
      transforms), the "fast path" runs whole layers as one C++ kernel
      (``_transformer_encoder_layer_fwd``) with no derivatives at all. It is switched off
      (``torch.backends.mha.set_fastpath_enabled``) and restored on exit.
    """
    with contextlib.ExitStack() as stack:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:  # pragma: no cover - torch < 2.3 has no selector
            pass
        else:
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        mha = getattr(torch.backends, "mha", None)
        if mha is not None and hasattr(mha, "set_fastpath_enabled"):
            before = mha.get_fastpath_enabled()
            mha.set_fastpath_enabled(False)
            stack.callback(mha.set_fastpath_enabled, before)
        yield

__all__ = [
    "Batch",
    "Dataset",
    "Objective",
    "resolve_reduction",
    "is_single_batch",
    "is_single_closure_batch",
]

Batch = Any
"""One batch: an ``(inputs, targets)`` pair for a ``loss_fn``, anything for a closure."""


def _is_tensor_tree(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, (tuple, list)):
        return len(x) > 0 and all(_is_tensor_tree(v) for v in x)
    if isinstance(x, dict):
        return len(x) > 0 and all(_is_tensor_tree(v) for v in x.values())
    return False


def is_single_batch(data: Any) -> bool:
    """True when ``data`` is one ``(inputs, targets)`` pair rather than an iterable of batches.

    One batch is a tuple/list of length 2 whose targets are a tensor and whose inputs are a
    tensor, a tuple or a dict of tensors. Anything else is treated as an iterable of batches.
    """
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[1], torch.Tensor)
        and _is_tensor_tree(data[0])
    )


def is_single_closure_batch(data: Any) -> bool:
    """For a closure: one batch is a tensor, a tuple (namedtuples too) or a mapping (a dict,
    a Hugging Face ``BatchEncoding``); a list, a ``DataLoader`` or any other iterable is an
    iterable of batches (the rule of :func:`jax_backend._data.is_single_batch`)."""
    return isinstance(data, (torch.Tensor, tuple, Mapping))


def resolve_reduction(loss_fn: Any, reduction: str | None) -> str:
    """The reduction of ``loss_fn``: its ``.reduction`` attribute, else ``reduction`` or "mean"."""
    own = getattr(loss_fn, "reduction", None)
    if isinstance(own, str):
        if own not in ("mean", "sum"):
            raise ValueError(
                f"loss_fn.reduction is {own!r}: the curvature needs a scalar loss, use "
                "reduction='mean' or reduction='sum'"
            )
        if reduction is not None and reduction != own:
            raise ValueError(
                f"reduction={reduction!r} contradicts loss_fn.reduction={own!r}; drop the "
                "reduction= argument (it is read from the loss module)"
            )
        return own
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (outputs, targets) -> scalar, got {loss_fn!r}")
    reduction = "mean" if reduction is None else reduction
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return reduction


def _pair_batch_size(batch: Batch) -> int:
    inputs, targets = batch
    if isinstance(targets, torch.Tensor) and targets.ndim >= 1:
        return int(targets.shape[0])
    leaves = [x for x in tree_flatten(inputs)[0] if isinstance(x, torch.Tensor) and x.ndim >= 1]
    if not leaves:
        raise ValueError("cannot tell the batch size: inputs and targets have no batch dimension")
    return int(leaves[0].shape[0])


def _leading_batch_size(batch: Batch) -> int:
    """The leading dimension of the batch's first tensor (pytree order: dict insertion order)."""
    for x in tree_flatten(batch)[0]:
        if isinstance(x, torch.Tensor):
            if x.ndim == 0:
                break
            return int(x.shape[0])
    raise ValueError(
        f"cannot tell the batch size of a {type(batch).__name__} batch: its first tensor has no "
        "leading batch dimension (or it holds no tensor). Pass batch_size=fn(batch) -> int, "
        "e.g. batch_size=lambda b: len(b['labels'])"
    )


def _fingerprint(batch: Batch) -> tuple[float, ...]:
    """Cheap, order-sensitive summary of a batch (detects shuffling between passes)."""
    out: list[float] = []
    for x in tree_flatten(batch)[0]:
        if not isinstance(x, torch.Tensor) or x.device.type == "meta":
            continue
        flat = x.detach().reshape(-1).to(torch.float64)
        ramp = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
        finite = torch.isfinite(flat)
        # NaN != NaN: non-finite entries are counted, not summed, so that data holding NaN
        # compare equal between passes and reach the loss check, whose message names NaN
        out.append(float(torch.where(finite, flat * ramp, 0.0).sum()))
        out.append(float((~finite).sum()))
    return tuple(out)


def _shuffled_loader(data: Any) -> bool:
    from torch.utils.data import DataLoader, RandomSampler

    if not isinstance(data, DataLoader):
        return False
    samplers = [getattr(data, "sampler", None)]
    batch_sampler = getattr(data, "batch_sampler", None)
    samplers.append(getattr(batch_sampler, "sampler", None))
    return any(isinstance(s, RandomSampler) for s in samplers)


def _twice_differentiable(loss_fn: Any) -> Any:
    """An equivalent loss whose forward-over-reverse derivatives work.

    ``nn.MSELoss`` (``F.mse_loss``) fails under ``torch.func.jvp`` of ``grad`` on torch 2.13
    ("ZeroTensors are immutable" in its double backward); the same mean/sum of squared
    differences written out has the same value and derivatives and works with every engine.
    """
    if isinstance(loss_fn, torch.nn.MSELoss) and loss_fn.reduction in ("mean", "sum"):
        reduce = torch.mean if loss_fn.reduction == "mean" else torch.sum

        def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            if outputs.shape != targets.shape:  # nn.MSELoss broadcasts (with a warning)
                outputs, targets = torch.broadcast_tensors(outputs, targets)
            return reduce((outputs - targets) ** 2)

        mse.reduction = loss_fn.reduction  # type: ignore[attr-defined]
        return mse
    return loss_fn


class Dataset:
    """The fixed, checked batches behind a curvature operator.

    Parameters
    ----------
    data : batch or iterable of batches
        With ``pairs=True`` every batch is an ``(inputs, targets)`` pair
        (:func:`is_single_batch` tells one pair from an iterable of them); with
        ``pairs=False`` (closures) a batch is anything (:func:`is_single_closure_batch`).
    reduction : {"mean", "sum"}
        Whether the batch loss is a mean or a sum over its samples (sets the weights).
    dtype, device :
        The analysis dtype and device. Floating data is cast to ``dtype`` only when
        ``convert`` is True (the user asked for ``dtype=``/``device=``); otherwise a mismatch
        is an error.
    pairs : bool
        Whether batches must be ``(inputs, targets)`` pairs.
    batch_size : callable, optional
        ``batch_size(batch) -> int``, the number of samples of a batch (as given by the
        user, before conversion). Default: the leading dimension of the targets (pairs) or of
        the batch's first tensor.
    single : bool, optional
        Force ``data`` to be read as one batch (``True``) or as an iterable of batches.
    check_deterministic : bool
        Iterate the data twice at construction and compare fingerprints (shuffled loaders).

    Attributes
    ----------
    batch_sizes : list of int
        The size of every (local) batch, in order.
    num_samples : int
        ``N``, summed over the ranks under ``torch.distributed``.
    fingerprints : list of tuple
        One cheap, order-sensitive summary per batch.
    """

    def __init__(
        self,
        data: Any,
        *,
        reduction: str,
        dtype: torch.dtype,
        device: torch.device,
        convert: bool,
        pairs: bool = True,
        batch_size: Callable[[Any], int] | None = None,
        single: bool | None = None,
        check_deterministic: bool = True,
    ) -> None:
        if batch_size is not None and not callable(batch_size):
            raise TypeError(
                f"batch_size must be a callable batch -> int (the number of samples of a "
                f"batch), got {type(batch_size).__name__}"
            )
        self.reduction = reduction
        self.dtype = dtype
        self.device = device
        self.convert = convert
        self.pairs = pairs
        self._batch_size_fn = batch_size
        if single is None:
            single = is_single_batch(data) if pairs else is_single_closure_batch(data)
        self.single = single
        if data is None:
            raise TypeError("data is None: pass one batch or an iterable of batches")
        if isinstance(data, (str, bytes)) or not (self.single or isinstance(data, Iterable)):
            raise TypeError(
                "data must be one batch or an iterable of batches (e.g. a DataLoader), got "
                f"{type(data).__name__}"
            )
        if not self.single and isinstance(data, Iterator):
            raise TypeError(
                f"data is a one-shot iterator ({type(data).__name__}): the operator iterates "
                "the data in every product, so pass a list of batches or a DataLoader"
            )
        if _shuffled_loader(data):
            raise ValueError(
                "the DataLoader was built with shuffle=True (a RandomSampler): the curvature "
                "operator must see the same samples in every product. Build the loader with "
                "shuffle=False for the analysis."
            )
        self._data = data
        sizes, prints = self._scan()
        self.batch_sizes = sizes
        self.fingerprints = prints
        self.local_num_samples = sum(sizes)
        # Under torch.distributed, data is this rank's shard: N is the sum over ranks.
        self.group = active_group()
        self.num_samples = int(
            round(all_reduce_scalar(float(self.local_num_samples), self.group, torch.float64, device))
        )
        if self.num_samples == 0:
            raise ValueError("the data are empty: no rank holds any samples")
        if check_deterministic and not self.single:
            _, prints2 = self._scan(sizes_only=True)
            if prints2 != prints:
                raise ValueError(
                    "the data differ between two passes (batch sizes or contents changed): the "
                    "operator must see the same samples in every product. Likely causes: a "
                    "DataLoader with shuffle=True or a random sampler, random augmentation in "
                    "the dataset, or a one-shot iterator/generator (pass a list or a DataLoader)."
                )
        self._single_batch = self._convert(self._data) if self.single else None

    # ------------------------------------------------------------------ iteration
    def _raw_batches(self) -> Iterator[Batch]:
        batches = [self._data] if self.single else self._data
        for i, batch in enumerate(batches):
            if not self.pairs:
                yield batch
                continue
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError(
                    f"batch {i} is a {type(batch).__name__}; every batch must be a pair "
                    "(inputs, targets) (or pass closure=fn(model, batch) for other batches)"
                )
            yield tuple(batch)

    def _size(self, batch: Batch) -> int:
        if self._batch_size_fn is not None:
            size = self._batch_size_fn(batch)
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ValueError(f"batch_size(batch) must return an int >= 0, got {size!r}")
            return size
        return _pair_batch_size(batch) if self.pairs else _leading_batch_size(_as_tree(batch))

    def _check_leaf(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor):
            return
        what = "data"
        if x.device != self.device and not self.convert:
            raise ValueError(
                f"device mismatch: the model is on {self.device} but the {what} are on "
                f"{x.device}; move them to the same device (or pass device=...)"
            )
        if x.is_floating_point() and x.dtype != self.dtype and not self.convert:
            raise ValueError(
                f"dtype mismatch: the model is {self.dtype} but the {what} are {x.dtype}; "
                "convert them, or pass dtype=torch.float64 to analyse float64 copies of the "
                "model and data"
            )

    def _scan(self, sizes_only: bool = False) -> tuple[list[int], list[tuple[float, ...]]]:
        sizes, prints = [], []
        for batch in self._raw_batches():
            if not sizes_only:
                tree_map(self._check_leaf, _as_tree(batch))
            sizes.append(self._size(batch))
            prints.append(_fingerprint(_as_tree(batch)))
        if (not sizes or sum(sizes) == 0) and active_group() is None:
            raise ValueError("the data are empty: the loader yielded no samples")
        return sizes, prints

    def _convert(self, batch: Batch) -> Batch:
        def move(x: Any) -> Any:
            if not isinstance(x, torch.Tensor):
                return x
            if x.is_floating_point():
                return x.to(device=self.device, dtype=self.dtype)
            return x.to(device=self.device)

        return tree_map(move, _as_tree(batch))

    def batches(self) -> Iterator[tuple[float, Batch]]:
        """Yield ``(weight, batch)`` for every batch, in a fixed order, converted."""
        if self.single:
            yield self.weight(self.batch_sizes[0]), self._single_batch
            return
        count = 0
        for batch in self._raw_batches():
            size = self._size(batch)
            count += 1
            yield self.weight(size), self._convert(batch)
        if count != len(self.batch_sizes):
            raise RuntimeError(
                f"the data yielded {count} batches, {len(self.batch_sizes)} at construction: "
                "the operator needs the same data in every product"
            )

    @property
    def num_batches(self) -> int:
        """How many (local) batches the data hold."""
        return len(self.batch_sizes)

    def weight(self, size: int) -> float:
        """Weight of a batch of ``size`` samples in the whole-data-set loss."""
        return size / self.num_samples if self.reduction == "mean" else 1.0


def _as_tree(batch: Batch) -> Any:
    """A mapping that is not a dict (a ``BatchEncoding``) as a plain dict, so that pytree
    functions see its tensors; everything else unchanged."""
    if isinstance(batch, Mapping) and not isinstance(batch, dict):
        return dict(batch)
    return batch


class _ClosureModule(torch.nn.Module):
    """``closure(model, batch)`` as the forward of a module that holds ``model``, so that
    :func:`torch.func.functional_call` substitutes the model's parameters inside the closure
    (``model(x)``, ``model.parameters()`` and ``model.weight`` all see the substituted
    tensors)."""

    def __init__(self, model: torch.nn.Module, closure: Callable[[Any, Any], Any]) -> None:
        super().__init__()
        self.model = model
        self.closure = closure

    def forward(self, batch: Batch) -> Any:
        return self.closure(self.model, batch)


class Objective:
    """The loss of a curvature operator: what one batch's loss is at given parameters.

    Either a loss over ``(inputs, targets)`` pairs, ``loss_fn(model(inputs), targets)``, or a
    closure ``closure(model, batch) -> scalar`` over batches of any form. Parameters are
    substituted functionally (:func:`torch.func.functional_call`): the model is never
    modified, and inside a closure ``model(...)`` runs on the substituted tensors.

    Parameters
    ----------
    model : torch.nn.Module
        The (possibly float64 / moved) model used for evaluation. Never modified.
    dataset : Dataset
        The fixed batches.
    loss_fn : callable, optional
        ``(outputs, targets) -> scalar``.
    closure : callable, optional
        ``(model, batch) -> scalar``. Exactly one of ``loss_fn`` and ``closure``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        dataset: Dataset,
        *,
        loss_fn: Callable[..., Any] | None = None,
        closure: Callable[[Any, Any], Any] | None = None,
    ) -> None:
        if (loss_fn is None) == (closure is None):
            raise TypeError("Objective needs exactly one of loss_fn and closure")
        self.model = model
        self.dataset = dataset
        self.loss_fn = loss_fn
        self.closure = closure
        self._product_loss = None if loss_fn is None else _twice_differentiable(loss_fn)
        self._closure_module = None if closure is None else _ClosureModule(model, closure)

    @property
    def is_closure(self) -> bool:
        """True for a ``closure(model, batch)``, False for ``loss_fn(outputs, targets)``."""
        return self.closure is not None

    def call(self, params: dict[str, torch.Tensor], inputs: Any) -> Any:
        """``model(inputs)`` with ``params`` (and the other tensors fixed) via functional_call.

        Attention runs on PyTorch's math kernel (:func:`differentiable_attention`): the fused
        flash and memory-efficient kernels of ``scaled_dot_product_attention`` have neither
        forward-mode derivatives nor double backward.
        """
        with differentiable_attention():
            if isinstance(inputs, dict):
                return torch.func.functional_call(self.model, params, (), inputs)
            if isinstance(inputs, (tuple, list)):
                return torch.func.functional_call(self.model, params, tuple(inputs))
            return torch.func.functional_call(self.model, params, (inputs,))

    def batch_loss(self, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """The (unweighted) loss of one batch at ``params``."""
        if self._closure_module is not None:
            prefixed = {f"model.{name}": value for name, value in params.items()}
            with differentiable_attention():
                return torch.func.functional_call(self._closure_module, prefixed, (batch,))
        inputs, targets = batch
        return self._product_loss(self.call(params, inputs), targets)

    def checked_batch_loss(self, params: dict[str, torch.Tensor], batch: Batch) -> float:
        """:meth:`batch_loss` as a float, checked to be a finite scalar (no graph kept)."""
        grad_mode = torch.enable_grad() if self.is_closure else torch.no_grad()
        with grad_mode:  # a closure may differentiate in its inputs (physics-informed losses)
            loss = self.batch_loss(params, batch)
        what = "closure(model, batch)" if self.is_closure else "loss_fn"
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(getattr(loss, "shape", ()))
            kind = type(loss).__name__ if not isinstance(loss, torch.Tensor) else f"shape {shape}"
            raise ValueError(
                f"{what} must return a scalar tensor, got {kind}; reduce per-sample losses "
                "with a mean or a sum (reduction='mean' or 'sum', not 'none')"
            )
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ValueError(
                f"the loss is {value} on the data: check the parameters and data for "
                "NaN/Inf and the loss for log(0) or overflow"
            )
        return value

    def total_loss(self, params: dict[str, torch.Tensor]) -> float:
        """The loss of the whole data set at ``params`` (all parameters by name), checked to
        be a finite scalar; summed over the ranks under ``torch.distributed``."""
        total = 0.0
        for weight, batch in self.dataset.batches():
            total += weight * self.checked_batch_loss(params, batch)
        ds = self.dataset
        return all_reduce_scalar(total, ds.group, torch.float64, ds.device)
