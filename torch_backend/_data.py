"""Data and loss handling shared by every torch curvature operator.

A curvature operator is *fixed*: every product sees the same samples. Two objects carry that
(the same words as in :mod:`jax_backend._data`):

* :class:`Dataset`: the user's ``data`` (one batch or an iterable of batches), checked once,
  iterated in a fixed order, moved to the analysis device and dtype, each batch with the
  weight that makes the sum over batches the loss of the whole data set.

  **The loss's normaliser.** A "mean" loss divides the sum of its per-element losses by a
  count ``m_b`` that belongs to the loss, not to the batching: the kept labels of a
  ``CrossEntropyLoss(ignore_index=-100)`` (every padded language-model batch), the sum of
  the class weights of a ``weight=``-ed loss, the elements of an ``MSELoss``, the samples of
  a plain callable. The whole-data-set loss is ``sum_b sum_i l_bi / sum_b m_b``, so batch
  ``b``'s mean loss enters with weight ``m_b / M``, ``M = sum_b m_b`` (summed over the ranks
  under ``torch.distributed``) -- never a mean of batch means, never ``n_b / N`` for a loss
  whose normaliser is not the sample count. ``m_b`` comes from (first that applies):

  - ``normalizer=fn(batch) -> number`` given by the user;
  - a loss (``loss_fn`` or ``closure``) that returns a pair ``(sum, normalizer)``: the
    operator differentiates the sum and divides once by ``M`` (weight ``1 / M``);
  - a torch loss module (``reduction="mean"``): its own rule, read off the module
    (:func:`module_normalizer`) and checked at construction against the module's mean;
  - otherwise the number of samples ``n_b`` (a plain callable or closure that averages over
    its samples).

  ``reduction="sum"``: every batch gets weight 1. A batch whose normaliser is 0 (every label
  ignored) adds nothing (its mean loss would be 0/0).

* :class:`Objective`: what the loss of one batch is, at given parameters: either
  ``loss_fn(model(inputs), targets)`` over ``(inputs, targets)`` pairs, or a closure
  ``closure(model, batch) -> scalar`` over batches of any form (dicts, tuples, tensors), in
  which ``model`` is called as usual and runs on the substituted parameters.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
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
    "module_normalizer",
    "label_count",
    "is_single_batch",
    "is_single_closure_batch",
]

Batch = Any
"""One batch: an ``(inputs, targets)`` pair for a ``loss_fn``, anything for a closure."""


def broadcast_message(outputs: Any, targets: Any) -> str:
    """The refusal of a loss whose outputs and targets broadcast to another shape."""
    return (
        f"the loss broadcasts outputs of shape {tuple(outputs.shape)} against targets of shape "
        f"{tuple(targets.shape)} (torch warns 'Using a target size that is different to the "
        "input size'): an (N, 1) output against (N,) targets becomes an (N, N) table of "
        "differences, not the loss you meant. Make the shapes equal, e.g. "
        "targets.unsqueeze(1) or outputs.squeeze(1)."
    )


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
    if isinstance(loss_fn, type):
        raise TypeError(
            f"loss_fn is the class {loss_fn.__name__}, not a loss: pass an instance, e.g. "
            f"loss_fn={loss_fn.__name__}() (note the parentheses)"
        )
    own = getattr(loss_fn, "reduction", None)
    if own == "batchmean" and isinstance(loss_fn, torch.nn.KLDivLoss):
        own = "mean"  # a mean whose normaliser is the batch size (module_normalizer)
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


_CLASS_INDEX_LOSSES = (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss)


def module_normalizer(loss_fn: Any) -> Callable[[Any, Any], float] | None:
    """The normaliser rule of a torch loss module with ``reduction="mean"``.

    Returns ``rule(outputs, targets) -> m`` (the number the module's mean divides the sum of
    its per-element losses by), or ``None`` for anything that is not a loss module:

    * ``CrossEntropyLoss`` / ``NLLLoss`` with class-index targets: ``sum_i w[y_i]`` over the
      kept targets (``y_i != ignore_index``; ``w = 1`` without ``weight=``), as in
      :func:`torch.nn.functional.cross_entropy`, label smoothing included;
    * ``CrossEntropyLoss`` with class-probability targets: the number of positions (samples
      times spatial positions; class weights are not in the denominator);
    * ``KLDivLoss(reduction="batchmean")``: the batch size;
    * any other module: the number of elements its ``reduction="none"`` output has.

    The rule is checked against the module's own mean at construction
    (:meth:`Objective.scan`), so a custom module whose mean is something else is refused
    with a message asking for ``normalizer=``.

    Examples
    --------
    >>> import torch
    >>> rule = module_normalizer(torch.nn.CrossEntropyLoss())
    >>> rule(torch.zeros(4, 3), torch.tensor([0, -100, 2, -100]))
    2.0
    """
    if not isinstance(loss_fn, torch.nn.Module) or not isinstance(
        getattr(loss_fn, "reduction", None), str
    ):
        return None
    if isinstance(loss_fn, _CLASS_INDEX_LOSSES):
        ignore = int(getattr(loss_fn, "ignore_index", -100))
        weight = getattr(loss_fn, "weight", None)

        def class_rule(outputs: Any, targets: Any) -> float:
            if targets.is_floating_point():  # class probabilities: one per position
                return float(outputs.numel() // outputs.shape[1]) if outputs.ndim >= 2 else 1.0
            kept = targets != ignore
            if weight is None:
                return float(kept.sum())
            w = weight.to(device=targets.device)[torch.where(kept, targets, 0)]
            return float((w * kept).sum())

        return class_rule
    if isinstance(loss_fn, torch.nn.KLDivLoss) and loss_fn.reduction == "batchmean":
        return lambda outputs, targets: float(outputs.shape[0]) if outputs.ndim else 1.0
    unreduced = copy.copy(loss_fn)
    unreduced.reduction = "none"

    def elements(outputs: Any, targets: Any) -> float:
        with torch.no_grad():
            return float(unreduced(outputs, targets).numel())

    return elements


def label_count(
    key: str = "labels", *, ignore_index: int = -100, shift: bool = False
) -> Callable[[Any], float]:
    """A ``normalizer=`` that counts the labels a token-level loss keeps.

    Hugging Face models average their own ``.loss`` over the labels that are not
    ``ignore_index`` (-100 marks padding and prompt tokens); a causal language model first
    shifts them by one (``labels[..., 1:]``). Pass the count as the normaliser so that an
    analysis over several batches weights every kept token equally:

    Parameters
    ----------
    key : str
        Where the labels are in a mapping batch (a tuple batch: its last element).
    ignore_index : int
        The label value the loss skips.
    shift : bool
        Count ``labels[..., 1:]`` (causal language models, ``*ForCausalLM``).

    Examples
    --------
    >>> import torch
    >>> count = label_count(shift=True)
    >>> count({"labels": torch.tensor([[5, 6, -100], [7, -100, -100]])})
    1.0
    """

    def count(batch: Any) -> float:
        labels = batch[key] if isinstance(batch, Mapping) else batch[-1]
        if shift:
            labels = labels[..., 1:]
        return float((labels != ignore_index).sum())

    return count


def _twice_differentiable(loss_fn: Any) -> Any:
    """An equivalent loss whose forward-over-reverse derivatives work.

    ``nn.MSELoss`` (``F.mse_loss``) fails under ``torch.func.jvp`` of ``grad`` on torch 2.13
    ("ZeroTensors are immutable" in its double backward); the same mean/sum of squared
    differences written out has the same value and derivatives and works with every engine.
    """
    if isinstance(loss_fn, torch.nn.MSELoss) and loss_fn.reduction in ("mean", "sum"):
        reduce = torch.mean if loss_fn.reduction == "mean" else torch.sum

        def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            if outputs.shape != targets.shape:
                raise ValueError(broadcast_message(outputs, targets))
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
    normalizers : list of float
        ``m_b``, what each (local) batch's loss divides by (see the module docstring); the
        batch sizes until :meth:`Objective.scan` reads the loss's own.
    total_normalizer : float
        ``M = sum_b m_b``, summed over the ranks under ``torch.distributed``.
    weights : list of float
        The weight of each (local) batch's loss in the whole-data-set loss.
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
        if pairs and isinstance(data, (tuple, list)) and len(data) == 2:
            for part in data:
                if type(part).__module__ == "numpy" or (
                    isinstance(part, list) and part and isinstance(part[0], (int, float))
                ):
                    raise TypeError(
                        f"data is a pair holding a {type(part).__name__}: a torch model needs "
                        "torch tensors. Convert with torch.as_tensor(X, dtype=torch.float32) "
                        "and torch.as_tensor(y) (or use a DataLoader over a TensorDataset)."
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
        self.set_normalizers([float(n) for n in sizes], summed=False, total=self.num_samples)
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
        if type(x).__module__ == "numpy" and hasattr(x, "shape"):
            raise TypeError(
                f"the data hold a numpy array ({getattr(x, 'dtype', '')} of shape "
                f"{tuple(x.shape)}): a torch model needs torch tensors. Convert them with "
                "torch.as_tensor(X) (features: torch.as_tensor(X, dtype=torch.float32); class "
                "labels: torch.as_tensor(y, dtype=torch.long)), or use a DataLoader."
            )
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

    def set_normalizers(
        self, normalizers: list[float], *, summed: bool, total: float | None = None
    ) -> None:
        """Set ``m_b`` of every local batch and the weights that follow from them.

        ``summed=False``: each batch loss is a mean over its ``m_b`` (weight ``m_b / M``);
        ``summed=True``: each batch loss is the sum itself (weight ``1 / M``). With
        ``reduction="sum"`` every weight is 1. ``total`` is ``M`` when already known (else
        the sum over the local batches and, under ``torch.distributed``, the ranks).
        """
        self.normalizers = [float(m) for m in normalizers]
        if total is None:
            total = all_reduce_scalar(
                float(sum(self.normalizers)), self.group, torch.float64, self.device
            )
        self.total_normalizer = float(total)
        self.summed = summed
        if self.reduction == "sum":
            self.weights = [1.0] * len(self.normalizers)
        elif not total > 0:  # nothing counted anywhere: refused by Objective.scan
            self.weights = [0.0] * len(self.normalizers)
        elif summed:
            self.weights = [1.0 / total if m else 0.0 for m in self.normalizers]
        else:
            self.weights = [m / total for m in self.normalizers]

    def converted(self) -> Iterator[Batch]:
        """Every batch, in the fixed order, converted (no weights: the construction pass)."""
        if self.single:
            yield self._single_batch
            return
        for batch in self._raw_batches():
            yield self._convert(batch)

    def batches(self) -> Iterator[tuple[float, Batch]]:
        """Yield ``(weight, batch)`` for every batch that counts, in a fixed order, converted.

        A batch of weight 0 (its normaliser is 0: every label ignored) is skipped: its mean
        loss is 0/0.
        """
        if self.single:
            if self.weights[0]:
                yield self.weights[0], self._single_batch
            return
        count = 0
        for batch in self._raw_batches():
            weight = self.weights[count] if count < len(self.weights) else 0.0
            count += 1
            if weight:
                yield weight, self._convert(batch)
        if count != len(self.batch_sizes):
            raise RuntimeError(
                f"the data yielded {count} batches, {len(self.batch_sizes)} at construction: "
                "the operator needs the same data in every product"
            )

    @property
    def num_batches(self) -> int:
        """How many (local) batches the data hold."""
        return len(self.batch_sizes)


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

    Either may return a pair ``(sum, normalizer)`` instead of a scalar: the sum of its
    per-element losses and what a mean would divide it by (the module docstring).

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
    normalizer : callable, optional
        ``normalizer(batch) -> number``: what the (mean) loss of a batch divides by.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        dataset: Dataset,
        *,
        loss_fn: Callable[..., Any] | None = None,
        closure: Callable[[Any, Any], Any] | None = None,
        normalizer: Callable[[Any], Any] | None = None,
    ) -> None:
        if (loss_fn is None) == (closure is None):
            raise TypeError("Objective needs exactly one of loss_fn and closure")
        if normalizer is not None and not callable(normalizer):
            raise TypeError(
                "normalizer must be a callable batch -> number (what the batch's mean loss "
                f"divides by, e.g. torch_backend.label_count()), got {type(normalizer).__name__}"
            )
        self.model = model
        self.dataset = dataset
        self.loss_fn = loss_fn
        self.closure = closure
        self.normalizer = normalizer
        self._product_loss = None if loss_fn is None else _twice_differentiable(loss_fn)
        self._closure_module = None if closure is None else _ClosureModule(model, closure)
        self._module_rule = None if loss_fn is None else module_normalizer(loss_fn)
        #: True when the loss returns ``(sum, normalizer)`` pairs (set by :meth:`scan`).
        self.returns_pairs = False

    @property
    def is_closure(self) -> bool:
        """True for a ``closure(model, batch)``, False for ``loss_fn(outputs, targets)``."""
        return self.closure is not None

    @property
    def what(self) -> str:
        return "closure(model, batch)" if self.is_closure else "loss_fn"

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

    def _raw_loss(self, params: dict[str, torch.Tensor], batch: Batch) -> Any:
        """What the loss returns for one batch: a scalar, or a ``(sum, normalizer)`` pair."""
        return self._raw_loss_and_outputs(params, batch)[0]

    def _raw_loss_and_outputs(self, params: dict[str, torch.Tensor], batch: Batch) -> Any:
        """``(what the loss returns, the model outputs or None for a closure)``."""
        if self._closure_module is not None:
            prefixed = {f"model.{name}": value for name, value in params.items()}
            with differentiable_attention():
                return torch.func.functional_call(self._closure_module, prefixed, (batch,)), None
        inputs, targets = batch
        outputs = self.call(params, inputs)
        if isinstance(outputs, (tuple, list)) and not isinstance(outputs, torch.Tensor):
            raise TypeError(
                f"the model returns a {type(outputs).__name__} of {len(outputs)} values (e.g. "
                "(logits, aux)), not one output tensor for loss_fn(outputs, targets). Pass "
                "closure=lambda model, batch: loss_fn(model(batch[0])[0], batch[1]) (picking "
                "the output the loss needs), or make the model return one tensor."
            )
        return self._product_loss(outputs, targets), outputs

    def batch_loss(self, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """The (unweighted) loss of one batch at ``params``: the sum of a pair."""
        loss = self._raw_loss(params, batch)
        if self.returns_pairs:
            return loss[0]
        return loss

    # ------------------------------------------------------------------ construction pass
    def _check_scalar(self, loss: Any) -> torch.Tensor:
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(getattr(loss, "shape", ()))
            kind = type(loss).__name__ if not isinstance(loss, torch.Tensor) else f"shape {shape}"
            raise ValueError(
                f"{self.what} must return a scalar tensor (or a pair (sum, normalizer)), got "
                f"{kind}; reduce per-sample losses with a mean or a sum (reduction='mean' or "
                "'sum', not 'none')"
            )
        return loss

    def _split_pair(self, loss: Any) -> tuple[Any, float | None]:
        """``(loss, normalizer)`` of a pair return, ``(loss, None)`` of a scalar."""
        if not (isinstance(loss, (tuple, list)) and len(loss) == 2):
            return loss, None
        value, count = loss
        if isinstance(count, torch.Tensor):
            if count.requires_grad:
                raise ValueError(
                    f"{self.what} returned (sum, normalizer) with a normalizer that depends on "
                    "the parameters (it carries a gradient): the normaliser must be a count "
                    "or a weight sum of the data alone. Detach it, or compute it from the "
                    "batch."
                )
            if count.numel() != 1:
                raise ValueError(
                    f"{self.what} returned (sum, normalizer) with a normalizer of shape "
                    f"{tuple(count.shape)}; it must be one number"
                )
            count = float(count)
        if isinstance(count, bool) or not isinstance(count, (int, float)):
            raise TypeError(
                f"{self.what} returned a pair whose second element is a "
                f"{type(count).__name__}; return (loss_sum, normalizer) with a number"
            )
        return value, float(count)

    def _normalizer_of(self, outputs: Any, batch: Batch, index: int, value: torch.Tensor):
        """``m_b`` of one batch of a scalar loss (user's normalizer, module rule, samples)."""
        if self.normalizer is not None:
            count = self.normalizer(batch)
            if isinstance(count, torch.Tensor):
                count = count.detach()
            return float(count), "normalizer(batch)"
        if self._module_rule is not None and self.dataset.reduction == "mean":
            targets = batch[1]
            outputs = outputs.detach()
            m = self._module_rule(outputs, targets)
            self._check_module_rule(outputs, targets, value, m)
            return m, f"{type(self.loss_fn).__name__}'s own normaliser"
        return float(self.dataset.batch_sizes[index]), "samples"

    def _check_module_rule(self, outputs, targets, value, m) -> None:
        """The module's mean times ``m`` must be the module's sum (to rounding)."""
        summed = copy.copy(self.loss_fn)
        summed.reduction = "sum"
        with torch.no_grad():
            total = float(summed(outputs, targets))
        mean = float(value)
        eps = float(torch.finfo(outputs.dtype).eps) if outputs.is_floating_point() else 2.0**-52
        if m == 0 or not (math.isfinite(mean) and math.isfinite(total)):
            return  # a non-finite loss is refused by the caller, with its own message
        if not abs(mean * m - total) <= 100 * eps * max(abs(total), abs(mean * m), 1e-300):
            name = type(self.loss_fn).__name__
            raise ValueError(
                f"{name}: its mean ({mean!r}) is not its sum ({total!r}) over {m:g} elements, "
                "so the whole-data-set weighting of its batches is unknown. Pass "
                "normalizer=fn(batch) -> what the mean divides by, or reduction='sum'."
            )

    def scan(self, params: dict[str, torch.Tensor]) -> float:
        """The construction pass: evaluate every batch once, read each batch's normaliser,
        set the dataset's weights, and return the whole-data-set loss (checked finite).

        Raises ``ValueError`` for a loss that broadcasts its outputs against its targets, a
        non-scalar or non-finite loss, a normaliser that is negative, non-finite or zero
        everywhere, and a closure over labels with ignored (-100) tokens without a
        normaliser (its own mean would be weighted by sample counts).
        """
        values, counts, sources = [], [], set()
        pairs = None
        for index, batch in enumerate(self.dataset.converted()):
            grad_mode = torch.enable_grad() if self.is_closure else torch.no_grad()
            with grad_mode, warnings.catch_warnings():  # a closure may differentiate inputs
                warnings.filterwarnings("error", message=".*target size.*different to the input")
                try:
                    raw, outputs = self._raw_loss_and_outputs(params, batch)
                except UserWarning as warning:
                    inputs, targets = batch
                    with torch.no_grad():
                        outputs = self.call(params, inputs)
                    raise ValueError(broadcast_message(outputs, targets)) from warning
            value, count = self._split_pair(raw)
            value = self._check_scalar(value)
            is_pair = count is not None
            if pairs is None:
                pairs = is_pair
            elif pairs != is_pair:
                raise ValueError(
                    f"{self.what} returned a (sum, normalizer) pair for some batches and a "
                    "scalar for others; return the same kind for every batch"
                )
            if is_pair:
                if self.normalizer is not None:
                    raise ValueError(
                        f"{self.what} returns (sum, normalizer) and normalizer= is given too: "
                        "pass one of them"
                    )
                if self.dataset.reduction == "sum":
                    raise ValueError(
                        f"{self.what} returns (sum, normalizer) but reduction='sum': the pair "
                        "asks for a division by the normaliser; drop reduction='sum'"
                    )
                sources.add("pair")
            else:
                count, source = self._normalizer_of(outputs, batch, index, value)
                sources.add(source)
            if not (math.isfinite(count) and count >= 0):
                raise ValueError(
                    f"the normaliser of batch {index} is {count!r}: it must be a finite "
                    "count or weight sum >= 0 (what the batch's mean loss divides by)"
                )
            values.append(float(value.detach()))
            counts.append(count)
        self.returns_pairs = bool(pairs)
        if sources == {"samples"} and self.dataset.reduction == "mean":
            self._refuse_ignored_labels_without_normalizer()
        if self.dataset.reduction == "mean":
            self.dataset.set_normalizers(counts, summed=self.returns_pairs)
            if self.dataset.total_normalizer <= 0:
                raise ValueError(
                    "every batch's normaliser is 0 (e.g. every label is ignore_index): the "
                    "mean loss of the data set is 0/0. Check the labels and the padding."
                )
        self.normalizer_source = sources.pop() if len(sources) == 1 else "mixed"
        total = 0.0
        for weight, value in zip(self.dataset.weights, values):
            if not weight:
                continue
            if not math.isfinite(value):
                raise ValueError(
                    f"the loss is {value} on the data: check the parameters and data for "
                    "NaN/Inf and the loss for log(0) or overflow"
                )
            total += weight * value
        ds = self.dataset
        return all_reduce_scalar(total, ds.group, torch.float64, ds.device)

    def _refuse_ignored_labels_without_normalizer(self) -> None:
        """A closure over mapping batches whose ``labels`` hold -100, over several batches (or
        ranks), without a normaliser: the model's own mean over kept tokens would be weighted
        by sample counts, a wrong whole-data-set loss. Refused with the fix."""
        if self.dataset.num_batches < 2 and self.dataset.group is None:
            return
        counts = []
        for batch in self.dataset.converted():
            if not self.is_closure:
                labels = batch[1]
            elif isinstance(batch, Mapping):
                labels = batch.get("labels")
            else:
                labels = batch[-1] if isinstance(batch, (tuple, list)) and batch else None
            if not isinstance(labels, torch.Tensor) or labels.is_floating_point():
                return
            counts.append(int((labels == -100).sum()))
        if any(counts) and not self.is_closure:
            raise ValueError(
                "the targets contain -100 (ignored labels) and loss_fn is a plain callable: "
                "F.cross_entropy averages over the labels it keeps, a different number in "
                "each batch, and weighting the batches by their sample counts would give the "
                "wrong whole-data-set loss. Pass the module, loss_fn=nn.CrossEntropyLoss() "
                "(its normaliser is read off), or normalizer=torch_backend.label_count(), or "
                "return (loss_sum, count) from loss_fn."
            )
        if any(counts):
            raise ValueError(
                "the batches' labels contain -100 (ignored tokens), so a model's own .loss "
                "averages over a different number of tokens in each batch, and weighting the "
                "batches by their sample counts would give the wrong whole-data-set loss. Pass "
                "normalizer=torch_backend.label_count(shift=True) for a causal language model "
                "(label_count() for other heads), or return (loss_sum, token_count) from the "
                "closure."
            )

    def checked_batch_loss(self, params: dict[str, torch.Tensor], batch: Batch) -> float:
        """:meth:`batch_loss` as a float, checked to be a finite scalar (no graph kept)."""
        grad_mode = torch.enable_grad() if self.is_closure else torch.no_grad()
        with grad_mode:  # a closure may differentiate in its inputs (physics-informed losses)
            loss = self._check_scalar(self.batch_loss(params, batch))
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
