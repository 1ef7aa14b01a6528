"""Data and loss handling shared by every torch curvature operator.

A curvature operator is *fixed*: every product sees the same samples. This module turns the
user's ``data`` (one batch or an iterable of batches) and ``loss_fn`` into a :class:`Problem`
that iterates the batches in a fixed order, moved to the analysis device and dtype, each with
the weight that makes the sum over batches the loss of the whole data set:

* ``reduction="mean"``: batch ``b`` of size ``n_b`` gets weight ``n_b / N`` (``N`` samples in
  all), so the total is the exact per-sample mean, never a mean of batch means;
* ``reduction="sum"``: every batch gets weight 1.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
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

__all__ = ["Batch", "Problem", "resolve_reduction", "is_single_batch"]

Batch = tuple[Any, Any]


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


def _batch_size(inputs: Any, targets: Any) -> int:
    if isinstance(targets, torch.Tensor) and targets.ndim >= 1:
        return int(targets.shape[0])
    leaves = [x for x in tree_flatten(inputs)[0] if isinstance(x, torch.Tensor) and x.ndim >= 1]
    if not leaves:
        raise ValueError("cannot tell the batch size: inputs and targets have no batch dimension")
    return int(leaves[0].shape[0])


def _fingerprint(inputs: Any, targets: Any) -> tuple[float, ...]:
    """Cheap, order-sensitive summary of a batch (detects shuffling between passes)."""
    out: list[float] = []
    for x in tree_flatten((inputs, targets))[0]:
        if not isinstance(x, torch.Tensor) or x.device.type == "meta":
            continue
        flat = x.detach().reshape(-1).to(torch.float64)
        ramp = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
        out.append(float((flat * ramp).sum()))
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


class Problem:
    """The fixed optimisation problem behind a curvature operator.

    Parameters
    ----------
    model : torch.nn.Module
        The (possibly float64 / moved) model used for evaluation. Never modified.
    loss_fn : callable
        ``(outputs, targets) -> scalar``.
    data : batch or iterable of batches
    reduction : {"mean", "sum"}
    dtype, device :
        The analysis dtype and device. Floating data is cast to ``dtype`` only when
        ``convert`` is True (the user asked for ``dtype=``/``device=``); otherwise a mismatch
        is an error.
    check_deterministic : bool
        Iterate the data twice at construction and compare fingerprints (shuffled loaders).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[..., Any],
        data: Any,
        *,
        reduction: str,
        dtype: torch.dtype,
        device: torch.device,
        convert: bool,
        check_deterministic: bool = True,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self._product_loss = _twice_differentiable(loss_fn)
        self.reduction = reduction
        self.dtype = dtype
        self.device = device
        self.convert = convert
        self.single = is_single_batch(data)
        if isinstance(data, (str, bytes)) or not (self.single or isinstance(data, Iterable)):
            raise TypeError(
                "data must be one batch (inputs, targets) or an iterable of batches "
                f"(e.g. a DataLoader), got {type(data).__name__}"
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
        self._single_batch = self._convert(*self._data) if self.single else None

    # ------------------------------------------------------------------ iteration
    def _raw_batches(self) -> Iterator[Batch]:
        if self.single:
            yield tuple(self._data)  # type: ignore[misc]
            return
        for i, batch in enumerate(self._data):
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError(
                    f"batch {i} is a {type(batch).__name__}; every batch must be a pair "
                    "(inputs, targets)"
                )
            yield batch[0], batch[1]

    def _check_leaf(self, x: Any, what: str) -> None:
        if not isinstance(x, torch.Tensor):
            return
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
        for inputs, targets in self._raw_batches():
            if not sizes_only:
                tree_map(lambda x: self._check_leaf(x, "inputs"), inputs)
                self._check_leaf(targets, "targets")
            sizes.append(_batch_size(inputs, targets))
            prints.append(_fingerprint(inputs, targets))
        if (not sizes or sum(sizes) == 0) and active_group() is None:
            raise ValueError("the data are empty: the loader yielded no samples")
        return sizes, prints

    def _convert(self, inputs: Any, targets: Any) -> Batch:
        def move(x: Any) -> Any:
            if not isinstance(x, torch.Tensor):
                return x
            if x.is_floating_point():
                return x.to(device=self.device, dtype=self.dtype)
            return x.to(device=self.device)

        return tree_map(move, inputs), move(targets)

    def batches(self) -> Iterator[tuple[float, Batch]]:
        """Yield ``(weight, (inputs, targets))`` for every batch, in a fixed order."""
        if self.single:
            yield self.weight(self.batch_sizes[0]), self._single_batch  # type: ignore[misc]
            return
        count = 0
        for inputs, targets in self._raw_batches():
            size = _batch_size(inputs, targets)
            count += 1
            yield self.weight(size), self._convert(inputs, targets)
        if count != len(self.batch_sizes):
            raise RuntimeError(
                f"the data yielded {count} batches, {len(self.batch_sizes)} at construction: "
                "the operator needs the same data in every product"
            )

    def weight(self, size: int) -> float:
        """Weight of a batch of ``size`` samples in the whole-data-set loss."""
        return size / self.num_samples if self.reduction == "mean" else 1.0

    # ------------------------------------------------------------------ evaluation
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
        """The (unweighted) loss of one batch."""
        inputs, targets = batch
        return self._product_loss(self.call(params, inputs), targets)

    def total_loss(self, params: dict[str, torch.Tensor]) -> float:
        """The loss of the whole data set (no graph), checked to be a finite scalar."""
        total = 0.0
        with torch.no_grad():
            for weight, batch in self.batches():
                loss = self.batch_loss(params, batch)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    shape = tuple(getattr(loss, "shape", ()))
                    raise ValueError(
                        f"loss_fn must return a scalar, got shape {shape}; use "
                        "reduction='mean' or 'sum' (not 'none')"
                    )
                value = float(loss)
                if not math.isfinite(value):
                    raise ValueError(
                        f"the loss is {value} on the data: check the parameters and data for "
                        "NaN/Inf and the loss for log(0) or overflow"
                    )
                total += weight * value
        return all_reduce_scalar(total, self.group, torch.float64, self.device)
