"""Parameter selection, layout and model preparation for the torch operators.

The flat vector of an operator is the row-major concatenation of the selected parameters in
``model.named_parameters()`` order. Parameters that are not selected (and all buffers) stay
fixed at their current values.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dualhess import ParamLayout

__all__ = ["prepare_model", "select_params"]

ParamSpec = Sequence[str] | Callable[[str], bool] | None


def prepare_model(
    model: torch.nn.Module, dtype: torch.dtype | None, device: Any
) -> tuple[torch.nn.Module, torch.dtype, torch.device, bool]:
    """Return ``(model_for_analysis, dtype, device, converted)``.

    The user's model is returned as is when ``dtype``/``device`` match it (it is only ever
    evaluated through ``functional_call`` on detached parameters). Otherwise a deep copy is
    moved to ``dtype``/``device``, so the user's model is never modified.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    tensors = list(model.parameters()) + list(model.buffers())
    floats = [t for t in tensors if t.is_floating_point()]
    if not floats:
        raise ValueError("the model has no floating-point parameters")
    own_dtype, own_device = floats[0].dtype, floats[0].device
    target_dtype = own_dtype if dtype is None else dtype
    target_device = own_device if device is None else torch.device(device)
    if not target_dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {target_dtype}")
    if target_dtype == own_dtype and target_device == own_device:
        return model, target_dtype, target_device, dtype is not None or device is not None
    work = copy.deepcopy(model)
    work.to(device=target_device, dtype=target_dtype)
    return work, target_dtype, target_device, True


def select_params(
    model: torch.nn.Module, params: ParamSpec
) -> tuple[ParamLayout, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Return ``(layout, selected, fixed)``: detached parameter tensors by name.

    ``params`` is None (all parameters with ``requires_grad``), a list of names, or a
    predicate on names.
    """
    named = [(n, p) for n, p in model.named_parameters()]
    trainable = [n for n, p in named if p.requires_grad]
    if params is None:
        chosen = trainable
    elif callable(params):
        chosen = [n for n, _ in named if params(n)]
    else:
        if isinstance(params, str):
            params = [params]
        wanted = set(params)
        unknown = wanted - {n for n, _ in named}
        if unknown:
            raise KeyError(f"unknown parameters {sorted(unknown)}; known: {[n for n, _ in named]}")
        chosen = [n for n, _ in named if n in wanted]
    if not chosen:
        if params is None and named:
            raise ValueError(
                f"every parameter of the model is frozen (requires_grad=False on all "
                f"{len(named)}), so there is nothing to take the curvature in: pass "
                "params=[names] (frozen parameters may be selected by name) or unfreeze them "
                "with p.requires_grad_(True)"
            )
        raise ValueError(
            "the parameter selection is empty: params= matched no parameter; known: "
            f"{[n for n, _ in named][:20]}"
        )
    chosen_set = set(chosen)
    selected = {n: p.detach() for n, p in named if n in chosen_set}
    fixed = {n: p.detach() for n, p in named if n not in chosen_set}
    layout = ParamLayout.from_shapes((n, tuple(t.shape)) for n, t in selected.items())
    return layout, selected, fixed
