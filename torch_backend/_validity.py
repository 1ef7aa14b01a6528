"""What makes a torch curvature operator valid, checked in one place.

A curvature operator is a fixed, symmetric linear map of one set of parameters over one data
set. Each function below guards one of those words; :func:`torch_backend._hessian.build_operator`
runs them at construction (before any product a user pays for) and the operator runs
:class:`ParameterWatch` before every product:

* **fixed in the model** -- :func:`check_model_mode`: BatchNorm or Dropout in train mode, and
  BatchNorm without running statistics (``track_running_stats=False``, which normalises with
  the batch's statistics even in eval mode) over several batches, make the "Hessian" depend
  on how the data are batched;
* **one set of parameters** -- :class:`ParameterWatch`: parameters or buffers changed after
  construction (an optimizer step, ``p.data.mul_(2)``) raise a :class:`StaleOperatorError`
  instead of products that mix two sets of weights;
* **symmetric** -- :func:`check_symmetric`: ``|u^T H v - v^T H u|`` against the products'
  rounding; a framework's wrong second derivative (PyTorch's double backward of
  ``_weight_norm`` on some builds) is refused with an :class:`AsymmetricOperatorError`.

The determinism checks (two loss evaluations, two products of one vector) live with the loss
(:mod:`torch_backend._hessian`), since they reuse its evaluations.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np
import torch

from dualhess import AsymmetricOperatorError, PrecisionWarning, StaleOperatorError

__all__ = ["check_model_mode", "ParameterWatch", "check_symmetric"]


def check_model_mode(model: torch.nn.Module, *, several_batches: bool) -> None:
    """Refuse modules whose behaviour makes the operator depend on the batching.

    * BatchNorm in train mode normalises with batch statistics (the curvature then depends on
      the batching) and updates its running statistics on every forward pass.
    * BatchNorm with ``track_running_stats=False`` has no running statistics: it normalises
      with the batch's statistics in eval mode too. Over one batch (all the data) that is
      a well-defined function of the parameters; over several batches (or ranks) it is not
      the loss of the data set.
    * Dropout in train mode draws a new mask on every forward pass.
    """
    batchnorms = [
        name
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
    ]
    if batchnorms:
        raise ValueError(
            f"BatchNorm layers in train mode ({', '.join(batchnorms)}): their output depends on "
            "the batch and every forward pass updates the running statistics, so the curvature "
            "is not a fixed operator. Call model.eval() before the analysis (the Hessian is then "
            "that of the network used at inference, with the running statistics)."
        )
    if several_batches:
        statless = [
            name
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is None
        ]
        if statless:
            raise ValueError(
                f"BatchNorm layers without running statistics ({', '.join(statless)}; "
                "track_running_stats=False) normalise with each batch's own statistics even in "
                "eval mode, so over several batches the 'Hessian' depends on how the data are "
                "batched and is not that of the data set's loss. Pass all the data as one "
                "batch, or use a network whose BatchNorm tracks running statistics "
                "(track_running_stats=True) in eval mode."
            )
    dropouts = [
        name
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.training and m.p > 0
    ]
    if dropouts:
        raise ValueError(
            f"Dropout layers in train mode ({', '.join(dropouts)}) draw a new random mask in "
            "every product, so the curvature is not a fixed operator. Call model.eval() before "
            "the analysis."
        )


def _checksum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Three numbers per tensor that change when any entry changes: the row sums and the
    column sums of the tensor seen as a (rows, 1024) table, each weighted by its position,
    and the sum of absolute values (the scale of the comparison). One pass of reads."""
    out = []
    for t in tensors:
        flat = t.detach().reshape(-1)
        n = flat.numel()
        if n == 0 or flat.device.type == "meta":
            continue
        cols = min(n, 1024)
        rows = n // cols
        table = flat[: rows * cols].view(rows, cols)
        tail = flat[rows * cols :].sum(dtype=torch.float64)
        ramp_c = torch.arange(1, cols + 1, dtype=torch.float64, device=flat.device)
        ramp_r = torch.arange(1, rows + 1, dtype=torch.float64, device=flat.device)
        out.append(torch.stack([
            table.sum(0, dtype=torch.float64) @ ramp_c + tail,
            table.sum(1, dtype=torch.float64) @ ramp_r,
            flat.abs().sum(dtype=torch.float64),
        ]))
    if not out:
        return torch.zeros(0, 3, dtype=torch.float64)
    return torch.stack(out).cpu()


class ParameterWatch:
    """Notices when the tensors an operator was built from change.

    Every product, ``loss_at`` and ``gradient`` calls :meth:`check` first. It compares the
    tensors' version counters (bumped by in-place updates of the parameters themselves: an
    optimizer step, ``p.mul_()`` under ``no_grad``) and a checksum of their values (edits
    through ``p.data``, which bypass the counters), and raises
    :class:`~dualhess.StaleOperatorError` naming the first tensor that changed. The checksum
    reads every parameter once: far less than a product, which runs forward and backward
    passes over the data.

    Parameters
    ----------
    named_tensors : dict of str to torch.Tensor
        The parameters and buffers the operator's products read.
    where : str
        The operator's name, for the message.
    """

    def __init__(self, named_tensors: dict[str, torch.Tensor], where: str) -> None:
        self.where = where
        self.names = [n for n, t in named_tensors.items() if isinstance(t, torch.Tensor)]
        self.tensors = [named_tensors[n] for n in self.names]
        self.versions = [t._version for t in self.tensors]
        self.sums = _checksum(self.tensors)

    def changed(self) -> str | None:
        """The name of a tensor that changed since construction, or None."""
        for name, t, version in zip(self.names, self.tensors, self.versions):
            if t._version != version:
                return name
        sums = _checksum(self.tensors)
        if sums.shape != self.sums.shape:  # pragma: no cover - a tensor resized in place
            return self.names[0]
        scale = self.sums[:, 2:3] + sums[:, 2:3]
        bad = ((sums - self.sums).abs() > 1e-12 * scale + 1e-300).any(dim=1)
        if bool(bad.any()):
            numeric = [n for n, t in zip(self.names, self.tensors) if t.numel()]
            return numeric[int(bad.nonzero()[0, 0])]
        return None

    def check(self) -> None:
        """Raise :class:`~dualhess.StaleOperatorError` when a tensor changed."""
        name = self.changed()
        if name is not None:
            raise StaleOperatorError(
                f"{self.where}: the model's parameters changed after the operator was built "
                f"({name!r} was modified in place: an optimizer step, p.data.mul_(), "
                "load_state_dict, ...), so its products would mix the old and the new weights. "
                "Build a new operator after changing the weights (it is cheap: no product is "
                "spent before you ask), or build it from a copy, copy.deepcopy(model), to keep "
                "analysing the old ones."
            )


def weight_norm_modules(model: Any) -> list[str]:
    """Names of the modules of ``model`` that use weight normalisation (the parametrisation
    ``torch.nn.utils.parametrizations.weight_norm`` or the legacy ``weight_norm`` hook)."""
    return [name for name, _ in _weight_norms(model)]


def _weight_norms(model: Any) -> list[tuple[str, int]]:
    """``(module name, dim)`` of every weight normalisation in ``model``."""
    found: list[tuple[str, int]] = []
    if not isinstance(model, torch.nn.Module):
        return found
    for name, module in model.named_modules():
        norms = [h for h in getattr(module, "_forward_pre_hooks", {}).values()
                 if type(h).__name__ == "WeightNorm"]
        parametrizations = getattr(module, "parametrizations", None)
        if isinstance(parametrizations, torch.nn.Module):
            norms += [p for p in parametrizations.modules() if type(p).__name__ == "_WeightNorm"]
        for norm in norms:
            dim = getattr(norm, "dim", 0)
            found.append((name or type(module).__name__, 0 if dim is None else int(dim)))
        graph = getattr(module, "graph", None)  # an exported / rewritten program (fx)
        for node in getattr(graph, "nodes", ()):
            if node.op == "call_function" and "_weight_norm" in str(node.target):
                dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
                where = (node.meta.get("nn_module_stack") or {}).values()
                label = next(reversed([path for path, _ in where]), None) if where else None
                found.append((label or f"{name or 'graph'}:{node.name}", int(dim)))
    return found


@functools.cache
def weight_norm_double_backward_error(dim: int) -> float:
    """How wrong this torch build's double backward of ``aten._weight_norm`` is along ``dim``.

    The Hessian of ``c . _weight_norm(v, g, dim)`` in ``(v, g)`` is symmetric; its products
    along two random directions, ``w^T H u`` and ``u^T H w``, are compared on a 2x3x4 tensor
    in float64 (rounding: ~1e-16). On torch 2.13 (CPU) this measures 0.76 for ``dim=2`` (Wav2Vec2's
    positional convolution) and 0.34 for ``dim=0``, 0 for ``dim=1`` and ``dim=-1``: the
    derivative itself is wrong, not the model.
    """
    gen = torch.Generator().manual_seed(0)
    shape = (2, 3, 4)
    v = torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_()
    g_shape = [1, 1, 1]
    g_shape[dim] = shape[dim]
    g = (torch.rand(g_shape, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    c = torch.randn(shape, generator=gen, dtype=torch.float64)
    with torch.enable_grad():
        grads = torch.autograd.grad((c * torch._weight_norm(v, g, dim)).sum(), (v, g),
                                    create_graph=True)
        directions = [[torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (v, g)]
                      for _ in range(2)]
        products = [torch.autograd.grad(sum((gr * d).sum() for gr, d in zip(grads, ds)),
                                        (v, g), retain_graph=True) for ds in directions]
    a = sum(float((d * h).sum()) for d, h in zip(directions[1], products[0]))
    b = sum(float((d * h).sum()) for d, h in zip(directions[0], products[1]))
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def weight_norm_suspects(model: Any) -> list[str]:
    """One sentence per weight normalisation of ``model`` whose double backward is wrong on
    this torch build (:func:`weight_norm_double_backward_error`)."""
    return [f"torch's double backward of aten._weight_norm ({name}, dim {dim}) disagrees with "
            f"finite differences on this build ({err:.2g} asymmetric on a small tensor)"
            for name, dim in _weight_norms(model)
            if (err := weight_norm_double_backward_error(dim)) > 1e-8]


def check_symmetric(
    op: Any, probe: tuple[torch.Tensor, torch.Tensor] | None = None, *, model: Any = None
) -> float:
    """Refuse an operator whose products are not symmetric beyond rounding.

    With ``u`` and ``v`` standard normal, ``u^T (H v)`` and ``v^T (H u)`` are equal for a
    symmetric ``H``; their difference has the size of ``|H - H^T|_F`` and ``|H v|`` that of
    ``|H|_F``, so ``r = |u^T H v - v^T H u| / ((|Hv| + |Hu|) / 2)`` measures the relative
    asymmetry. The rule is the eigensolvers' (:func:`dualhess._util.check_symmetric_products`):
    refused above ``sqrt(u)`` of the products' dtype, but never below ``sqrt`` of float32's
    roundoff, since a float64 model may compute parts in float32 (Hugging Face's losses cast
    the logits to float32: a tiny GPT-2 in float64 measures 1.5e-9); between the two, a
    :class:`~dualhess.PrecisionWarning`. A framework's wrong second derivative measures
    1e-2 to 1 (``weight_norm``: 0.58). Costs one product (two without ``probe``).

    Parameters
    ----------
    op : TorchCurvatureOperator
        The operator, before any user product.
    probe : (v, H v), optional
        A product already made at construction (the determinism check's), reused.

    Returns
    -------
    float
        ``r``, the measured relative asymmetry.
    """
    from dualhess._util import refusal_tolerance, symmetry_tolerance

    n = op.n
    if n < 2:
        return 0.0
    if probe is None:
        v = op.asarray(np.random.default_rng(0).standard_normal(n))
        hv = op._matvec(v)
    else:
        v, hv = probe
    u = op.asarray(np.random.default_rng(1).standard_normal(n))
    hu = op._matvec(u)
    a = float(torch.dot(u.double(), hv.double()))
    b = float(torch.dot(v.double(), hu.double()))
    norm = torch.linalg.vector_norm
    scale = 0.5 * float(norm(hv.double()) + norm(hu.double()))
    relative = abs(a - b) / scale if scale > 0 else 0.0
    refuse, rounding = refusal_tolerance(op), symmetry_tolerance(op, 0)
    broken = [(name, dim, err) for name, dim in _weight_norms(model)
              if (err := weight_norm_double_backward_error(dim)) > 1e-8]
    if broken and relative > rounding:
        # The asymmetry has a known cause, however small its share of the whole Hessian
        # (Wav2Vec2's positional convolution: 7.9e-5 relative, below the refusal level):
        # torch's products in those blocks are wrong, so the operator is refused.
        named = ", ".join(f"{name} (dim {dim})" for name, dim, _ in broken[:4])
        raise AsymmetricOperatorError(
            f"{type(op).__name__}: the products are not symmetric: u^T H v = {a:.6g} but "
            f"v^T H u = {b:.6g} (relative asymmetry {relative:.2e}, rounding allows "
            f"{rounding:.1e}). The model uses weight normalisation ({named}"
            f"{', ...' if len(broken) > 4 else ''}), and PyTorch's double backward of "
            f"aten._weight_norm is wrong on this build (measured on a small tensor: "
            f"{broken[0][2]:.2g} relative asymmetry): torch's second derivative is the wrong "
            "side, not the model. Analyse the model's JAX twin (jax_backend.from_torch "
            "differentiates weight normalisation correctly), or fold the normalisation into "
            "plain weights (torch.nn.utils.parametrize.remove_parametrizations(module, "
            "'weight')), which analyses the Hessian in the folded weights. "
            "check_symmetric=False skips this check."
        )
    if not relative <= refuse:
        raise AsymmetricOperatorError(
            f"{type(op).__name__}: the products are not symmetric: u^T H v = {a:.6g} but "
            f"v^T H u = {b:.6g} (relative asymmetry {relative:.2e}, rounding allows "
            f"{refuse:.1e}), so this is not a Hessian and no eigensolver result would mean "
            "anything. Likely cause: a second derivative the framework gets wrong, e.g. "
            "PyTorch's double backward of weight normalisation "
            "(torch.nn.utils.parametrizations.weight_norm, aten._weight_norm) on some builds, "
            "or a custom autograd.Function whose backward is not the derivative of its "
            "forward. Check with torch.autograd.gradgradcheck. check_symmetric=False skips "
            "this check."
        )
    if relative > rounding:
        warnings.warn(
            f"{type(op).__name__}: the products are symmetric only to {relative:.1e} relative "
            f"({op.dtype} rounding allows {rounding:.1e}): part of the model likely computes in "
            "lower precision (float32 casts in a float64 model: Hugging Face losses, RMSNorm, "
            "rotary tables), so results are accurate to about that level",
            PrecisionWarning,
            stacklevel=4,
        )
    return relative
