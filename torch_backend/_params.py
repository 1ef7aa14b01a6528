"""Parameter selection, layout and model preparation for the torch operators.

The flat vector of an operator is the row-major concatenation of the selected parameters in
``model.named_parameters()`` order. Parameters that are not selected (and all buffers) stay
fixed at their current values.

Placement: a model's parameters may live on several devices (Hugging Face
``device_map="auto"``, accelerate dispatch, pipeline-style model code that moves activations
with ``.to``). The model is then analysed where it is, never collapsed onto one device: the
layout (:class:`dualhess.ParamLayout`) records each parameter's device and a *home device*,
the device of the model's first parameter, where flat vectors and data live. A product splits
its flat vector into blocks on the parameters' devices and joins the result back onto home.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dualhess import ParamLayout

__all__ = ["parameter_devices", "prepare_model", "select_params"]

ParamSpec = Sequence[str] | Callable[[str], bool] | None


def parameter_devices(model: torch.nn.Module) -> dict[torch.device, int]:
    """How many floating parameters and buffers of ``model`` live on each device, in order of
    first appearance (parameters first, then buffers).

    Examples
    --------
    >>> parameter_devices(torch.nn.Linear(3, 2))
    {device(type='cpu'): 2}
    """
    counts: dict[torch.device, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            counts[tensor.device] = counts.get(tensor.device, 0) + 1
    return counts


def prepare_model(
    model: torch.nn.Module, dtype: torch.dtype | None, device: Any
) -> tuple[torch.nn.Module, torch.dtype, torch.device, bool]:
    """Return ``(model_for_analysis, dtype, home_device, converted)``.

    The user's model is returned as is when ``dtype``/``device`` match it (it is only ever
    evaluated through ``functional_call`` on detached parameters). Otherwise a deep copy is
    moved to ``dtype``/``device``, so the user's model is never modified.

    Parameters
    ----------
    model : torch.nn.Module
        The model. Its parameters may live on several devices (Hugging Face
        ``device_map="auto"``, accelerate dispatch, or a forward that moves activations
        between devices with ``.to``): each parameter then stays where it is.
    dtype : torch.dtype, optional
        Analyse a copy in this dtype. A model on several devices is copied tensor by tensor
        in place: every copied parameter stays on its own device.
    device : torch.device or str, optional
        Analyse a copy on this one device. Refused for a model on several devices: that copy
        would collapse a model that was spread out (usually because it does not fit one
        device) onto one; leave ``device=None`` to analyse it where it is, or move it
        yourself first (``model.to(device)``).

    Returns
    -------
    tuple
        ``(model, dtype, home, converted)``. ``home`` is the *home device*: where the
        operator's flat vectors and the data live. It is ``device`` when given, otherwise
        the device of the model's first floating parameter (``model.parameters()`` order;
        for a ``device_map`` model the embedding's, where the inputs go). ``converted``:
        whether the user asked for a ``dtype``/``device``.

    Raises
    ------
    ValueError
        ``device=`` for a model whose parameters live on several devices.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    tensors = list(model.parameters()) + list(model.buffers())
    floats = [t for t in tensors if t.is_floating_point()]
    if not floats:
        raise ValueError("the model has no floating-point parameters")
    own_dtype, own_device = floats[0].dtype, floats[0].device
    target_dtype = own_dtype if dtype is None else dtype
    if not target_dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {target_dtype}")
    spread = parameter_devices(model)
    if len(spread) > 1:
        if device is not None:
            where = ", ".join(f"{d}: {k} tensors" for d, k in spread.items())
            raise ValueError(
                f"device={str(device)!r} for a model whose parameters and buffers live on "
                f"several devices ({where}): analysing it on one device would copy the whole "
                "model there, which a model spread over devices usually does not fit. Leave "
                "device=None to analyse it where it is (each parameter on its own device, flat "
                f"vectors and data on {own_device}, the first parameter's device), or move it "
                "yourself first with model.to(device)"
            )
        if target_dtype == own_dtype:
            return model, target_dtype, own_device, dtype is not None
        work = copy.deepcopy(model)
        work.to(dtype=target_dtype)  # each tensor keeps its device
        return work, target_dtype, own_device, True
    target_device = own_device if device is None else torch.device(device)
    if target_dtype == own_dtype and target_device == own_device:
        return model, target_dtype, target_device, dtype is not None or device is not None
    work = copy.deepcopy(model)
    work.to(device=target_device, dtype=target_dtype)
    return work, target_dtype, target_device, True


def select_params(
    model: torch.nn.Module, params: ParamSpec, *, home: torch.device | None = None
) -> tuple[ParamLayout, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Return ``(layout, selected, fixed)``: detached parameter tensors by name.

    Parameters
    ----------
    model : torch.nn.Module
        The model (as :func:`prepare_model` returns it).
    params : list of str or callable, optional
        None (all parameters with ``requires_grad``), a list of names, or a predicate on
        names.
    home : torch.device, optional
        The home device of the flat vectors (:func:`prepare_model`); default the device of
        the model's first parameter.

    Returns
    -------
    tuple
        ``(layout, selected, fixed)``. Each layout entry names its parameter's device, so
        ``layout.split`` places a flat vector's blocks where the parameters live and
        ``layout.join`` gathers them onto ``home``: on a single-device model nothing moves.
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
    if home is None and named:
        home = named[0][1].device
    layout = ParamLayout.from_shapes(
        ((n, tuple(t.shape)) for n, t in selected.items()),
        devices={n: t.device for n, t in selected.items()},
        home=None if home is None else torch.device(home),
    )
    return layout, selected, fixed
