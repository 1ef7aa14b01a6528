"""Exact Hessian / GGN diagonals with BackPACK (``DiagHessian``, ``DiagGGNExact``).

BackPACK runs on a deep copy of the model and the loss, so no hook and no extended module is
ever left on the user's objects. Models that are not plain (nested) ``nn.Sequential`` chains
go through BackPACK's ``torch.fx`` converter (residual connections become ``SumModule``).
Layers BackPACK cannot handle give :class:`dualhess.ExactUnavailableError` listing them;
use a stochastic estimate instead (``dualhess.trace(op, method="xtrace")``).

References
----------
F. Dangel, F. Kunstner, P. Hennig, "BackPACK: Packing more into backprop", ICLR (2020).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch

import dualhess

from ._data import Objective

__all__ = ["exact_diagonal", "exact_trace", "backpack_diagonal"]

_LOSSES = ("CrossEntropyLoss", "MSELoss", "BCEWithLogitsLoss")


def _unavailable(reason: str) -> dualhess.ExactUnavailableError:
    return dualhess.ExactUnavailableError(
        f"BackPACK cannot compute the exact diagonal: {reason}. Use a stochastic estimate "
        "instead: dualhess.trace(op, method='xtrace') or dualhess.diagonal(op, method='xdiag')."
    )


def _is_chain(module: torch.nn.Module) -> bool:
    """True when the module is a leaf or a (nested) ``nn.Sequential`` of chains."""
    children = list(module.children())
    if not children:
        return True
    return isinstance(module, torch.nn.Sequential) and all(_is_chain(c) for c in children)


def _unsupported(module: torch.nn.Module, mapping: dict) -> list[str]:
    out = []
    for name, m in module.named_modules():
        if list(m.children()) or isinstance(m, torch.nn.Sequential):
            continue
        if type(m) not in mapping:
            out.append(f"{name or '<root>'} ({type(m).__name__})")
    return out


def backpack_diagonal(
    objective: Objective, layout: dualhess.ParamLayout, curvature: str
) -> torch.Tensor:
    """The exact diagonal of the whole-data-set Hessian or GGN for ``layout``'s parameters."""
    try:
        import backpack as bp
        from backpack.extensions import DiagGGNExact, DiagHessian
    except ImportError as err:  # pragma: no cover - optional dependency
        raise _unavailable("backpack-for-pytorch is not installed") from err
    if curvature not in ("hessian", "ggn"):
        raise ValueError(f"curvature must be 'hessian' or 'ggn', got {curvature!r}")
    if objective.is_closure:
        raise _unavailable(
            "the loss is a closure(model, batch); BackPACK needs loss_fn(outputs, targets) "
            "with a torch.nn loss module"
        )
    if type(objective.loss_fn).__name__ not in _LOSSES or not isinstance(
        objective.loss_fn, torch.nn.Module
    ):
        raise _unavailable(
            f"the loss must be one of torch.nn.{', torch.nn.'.join(_LOSSES)}, got "
            f"{type(objective.loss_fn).__name__}"
        )
    extension = DiagHessian() if curvature == "hessian" else DiagGGNExact()
    field = "diag_h" if curvature == "hessian" else "diag_ggn_exact"
    mapping = extension._BackpropExtension__module_extensions  # BackPACK's layer table

    model = copy.deepcopy(objective.model)
    loss_fn = copy.deepcopy(objective.loss_fn)
    dataset = objective.dataset
    names_by_ptr = {p.data_ptr(): n for n, p in model.named_parameters()}
    wanted = set(layout.names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in wanted)
    if _is_chain(model):
        unsupported = _unsupported(model, mapping)
        if unsupported:
            raise _unavailable(f"unsupported layers {unsupported}")
        model = bp.extend(model)
    else:
        try:
            converted = bp.extend(model, use_converter=True)
        except Exception as err:
            raise _unavailable(
                f"BackPACK's converter failed on {type(model).__name__} ({err})"
            ) from err
        unsupported = _unsupported(converted, mapping)
        if unsupported:
            raise _unavailable(f"unsupported layers {unsupported}")
        model = converted
    loss_fn = bp.extend(loss_fn)

    diag = {
        n: torch.zeros(layout[n].shape, dtype=dataset.dtype, device=dataset.device)
        for n in layout.names
    }
    default_dtype = torch.get_default_dtype()
    try:
        # BackPACK builds some helper tensors (conv unfolding) in the default dtype
        torch.set_default_dtype(dataset.dtype)
        with warnings.catch_warnings():  # BackPACK's hooks on the first layer (inputs w/o grad)
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            _accumulate(bp, extension, field, model, loss_fn, dataset, names_by_ptr, wanted, diag)
    finally:
        torch.set_default_dtype(default_dtype)
    return layout.join(diag)


def _accumulate(bp, extension, field, model, loss_fn, dataset, names_by_ptr, wanted, diag):
    for weight, (inputs, targets) in dataset.batches():
        model.zero_grad(set_to_none=True)
        try:
            with torch.enable_grad():
                if isinstance(inputs, dict):
                    outputs = model(**inputs)
                elif isinstance(inputs, (tuple, list)):
                    outputs = model(*inputs)
                else:
                    outputs = model(inputs)
                loss = loss_fn(outputs, targets)
                with bp.backpack(extension):
                    loss.backward()
        except Exception as err:
            raise _unavailable(f"BackPACK failed inside its backward pass ({err})") from err
        seen = set()
        for p in model.parameters():
            name = names_by_ptr.get(p.data_ptr())
            if name in wanted:
                diag[name] += weight * getattr(p, field)
                seen.add(name)
        if seen != wanted:
            raise _unavailable(f"BackPACK returned no diagonal for {sorted(wanted - seen)}")


def exact_diagonal(
    model: torch.nn.Module,
    loss_fn: Callable[..., Any],
    data: Any,
    *,
    curvature: str = "hessian",
    params: Any = None,
    dtype: torch.dtype | None = None,
    device: Any = None,
) -> torch.Tensor:
    """The exact diagonal of the Hessian or GGN over a whole data set, with BackPACK.

    Batches are weighted as in :func:`torch_backend.hessian` (the result is the diagonal of
    that operator). The model and loss are deep-copied before BackPACK extends them.

    Parameters
    ----------
    model, loss_fn, data, params, dtype, device
        As in :func:`torch_backend.hessian`. ``loss_fn`` must be ``nn.CrossEntropyLoss``,
        ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``.
    curvature : {"hessian", "ggn"}
        BackPACK's ``DiagHessian`` or ``DiagGGNExact``.

    Returns
    -------
    torch.Tensor
        The flat diagonal, in the layout of ``hessian(model, ...).layout``.

    Raises
    ------
    dualhess.ExactUnavailableError
        When BackPACK cannot handle a layer or the loss (the message lists them).

    Examples
    --------
    >>> import torch
    >>> from torch_backend import exact_diagonal
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> exact_diagonal(model, torch.nn.CrossEntropyLoss(), (X, y)).shape
    torch.Size([8])
    """
    from ._hessian import BuildOptions, build_objective

    options = BuildOptions(params=params, dtype=dtype, device=device, check_deterministic=False)
    objective, layout, _, _ = build_objective(model, loss_fn, data, options, where="exact_diagonal")
    return backpack_diagonal(objective, layout, curvature)


def exact_trace(
    model: torch.nn.Module, loss_fn: Callable[..., Any], data: Any, **kwargs: Any
) -> float:
    """The exact trace of the Hessian or GGN: the sum of :func:`exact_diagonal` (same options)."""
    diag = exact_diagonal(model, loss_fn, data, **kwargs)
    return float(diag.detach().to(torch.float64).sum())
