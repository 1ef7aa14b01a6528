"""Hand-written JAX equivalents of torch loss modules, and torch batches as numpy arrays.

The twin itself exports the model *with* its loss, so any loss works without these; they
remain for code that pairs a forward-only twin with a loss on the JAX side.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dualhess._errors import UnsupportedOpError

__all__ = ["loss_from_torch", "batch_from_torch"]


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
