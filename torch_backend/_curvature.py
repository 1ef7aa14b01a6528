"""Generalised Gauss-Newton and Fisher operators of a PyTorch model over a whole data set.

Normalisation (``N`` samples; ``f_i = f(x_i)`` the model output, ``J_i`` its Jacobian in the
selected parameters; ``l_i(f) = loss_fn(f_i[None], y_i[None])`` the loss of sample ``i``
alone, i.e. averaged over its output elements when the loss module averages)::

    reduction="mean":  L = (1/N) sum_i l_i        reduction="sum":  L = sum_i l_i
    GGN        G = s sum_i J_i^T (d^2 l_i / df^2) J_i
    empirical  F = s sum_i g_i g_i^T,                g_i = grad_theta l_i(f_i, y_i)
    MC Fisher  F = s sum_i (1/M) sum_m g_im g_im^T,  g_im = grad_theta l_i(f_i, y~_im)

with ``s = 1/N`` for ``"mean"`` and ``s = 1`` for ``"sum"``: the GGN is the Hessian of ``L``
without the second-order terms of the network, and every operator has the scale of the
Hessian of ``L``. The MC labels ``y~ ~ p(y | f_i)`` come from the likelihood whose negative log
is the loss: categorical ``softmax(f)`` for ``CrossEntropyLoss``, Bernoulli ``sigmoid(f)`` for
``BCEWithLogitsLoss``, and ``N(f, sigma^2 I)`` for ``MSELoss`` with ``sigma^2 = D/2``
(``reduction="mean"`` over ``D`` output elements per sample) or ``1/2`` (``"sum"``). For
these, ``E[F_mc] = G`` exactly.

References
----------
N. N. Schraudolph, "Fast curvature matrix-vector products for second-order gradient
descent", Neural Computation 14 (2002).
J. Martens, "New insights and perspectives on the natural gradient method", JMLR 21 (2020).
F. Kunstner, L. Balles, P. Hennig, "Limitations of the empirical Fisher approximation for
natural gradient descent", NeurIPS (2019).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_map

from ._data import Batch
from ._engines import columns_to_dict, dict_to_columns
from ._hessian import BuildOptions, TorchCurvatureOperator, build_operator
from ._params import ParamSpec

__all__ = ["ggn", "fisher", "GGNOperator", "FisherOperator"]


class GGNOperator(TorchCurvatureOperator):
    """``G = sum_b w_b J_b^T H_L J_b``: Jacobian products with ``torch.func.jvp``/``vjp``."""

    curvature = "ggn"
    method = "func"

    def _batch(self, batch: Batch, tangents: dict[str, torch.Tensor], vectorised: bool):
        inputs, targets = batch
        fixed, objective = self.fixed, self.objective

        def out_fn(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return objective.call({**fixed, **p}, inputs)

        def loss_of_outputs(out: torch.Tensor) -> torch.Tensor:
            return objective.loss_fn(out, targets)

        outputs, vjp_fn = torch.func.vjp(out_fn, self.selected)
        # H_L u by reverse-over-reverse (H_L is symmetric); forward-over-reverse hits
        # "ZeroTensors are immutable" in mse_loss's double backward on torch 2.13
        _, loss_hvp = torch.func.vjp(torch.func.grad(loss_of_outputs), outputs.detach())

        def jv(t):
            return torch.func.jvp(out_fn, (self.selected,), (t,))[1]

        def hv(u):
            return loss_hvp(u)[0]

        if vectorised:
            JV = torch.func.vmap(jv)(tangents)
            return torch.func.vmap(vjp_fn)(torch.func.vmap(hv)(JV))[0]
        return vjp_fn(hv(jv(tangents)))[0]

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        tangents = self.layout.split(v)
        out = torch.zeros_like(v)
        for weight, batch in self.dataset.batches():
            g = self._batch(batch, tangents, vectorised=False)
            out += weight * torch.cat([g[e.name].reshape(-1) for e in self.layout])
        return out

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        tangents = columns_to_dict(self.layout, V)
        out = torch.zeros_like(V)
        for weight, batch in self.dataset.batches():
            g = self._batch(batch, tangents, vectorised=True)
            out += weight * dict_to_columns(self.layout, g, V.shape[1])
        return out

    def exact_diagonal(self) -> torch.Tensor:
        """The exact GGN diagonal with BackPACK's ``DiagGGNExact`` (whole data set).

        Raises
        ------
        dualhess.ExactUnavailableError
            When BackPACK cannot handle the model or the loss.
        """
        return self._exact("ggn")


class FisherOperator(TorchCurvatureOperator):
    """Empirical or Monte-Carlo Fisher from per-sample gradients (``vmap`` of ``grad``)."""

    curvature = "fisher"
    method = "func"

    def __init__(self, objective, layout, selected, fixed, *, kind, num_samples, seed, chunk_size):
        super().__init__(objective, layout, selected, fixed, chunk_size)
        if kind not in ("empirical", "mc"):
            raise ValueError(f"kind must be 'empirical' or 'mc', got {kind!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        self.kind = kind
        self.num_mc_samples = num_samples
        if seed is None:
            seed = int(np.random.default_rng().integers(2**31))
        self.seed = int(seed)
        self._likelihood = _likelihood(objective.loss_fn) if kind == "mc" else None
        self._sample_weight = (
            1.0 / self.dataset.num_samples if self.dataset.reduction == "mean" else 1.0
        )

    # ------------------------------------------------------------------ MC labels
    def _sample_targets(self, index: int, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        """``num_samples`` label draws ``(M, *targets.shape)`` for batch ``index`` (fixed)."""
        seed = int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0])
        gen = torch.Generator(device=outputs.device).manual_seed(seed)
        outputs = outputs.detach()
        M = self.num_mc_samples
        kind = self._likelihood
        if kind == "categorical":
            probs = torch.softmax(outputs, dim=1)
            moved = probs.movedim(1, -1).reshape(-1, probs.shape[1])
            draws = torch.multinomial(moved, M, replacement=True, generator=gen)
            shape = (*probs.shape[:1], *probs.shape[2:])
            return draws.T.reshape((M, *shape))
        if kind == "bernoulli":
            probs = torch.sigmoid(outputs).expand((M, *outputs.shape))
            return torch.bernoulli(probs, generator=gen).to(outputs.dtype)
        # gaussian
        per_sample = outputs[0].numel() if outputs.ndim > 0 else 1
        var = per_sample / 2.0 if self.dataset.reduction == "mean" else 0.5
        noise = torch.randn(
            (M, *outputs.shape), generator=gen, dtype=outputs.dtype, device=outputs.device
        )
        return outputs + var**0.5 * noise

    def mc_targets(self) -> list[torch.Tensor]:
        """The MC labels of every batch, ``(num_samples, *targets.shape)`` each (for checks)."""
        out = []
        params = {**self.fixed, **self.selected}
        for index, (_, (inputs, targets)) in enumerate(self.dataset.batches()):
            with torch.no_grad():
                outputs = self.objective.call(params, inputs)
            out.append(self._sample_targets(index, outputs, targets))
        return out

    # ------------------------------------------------------------------ gradients
    def _per_sample_grads(self, batch: Batch, targets: Any) -> torch.Tensor:
        inputs = batch[0]
        fixed, objective = self.fixed, self.objective

        def loss_one(p, x, t):
            x1 = tree_map(lambda a: a.unsqueeze(0) if isinstance(a, torch.Tensor) else a, x)
            return objective.loss_fn(objective.call({**fixed, **p}, x1), t.unsqueeze(0))

        grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(
            self.selected, inputs, targets
        )
        B = targets.shape[0]
        return torch.cat([grads[e.name].reshape(B, -1) for e in self.layout], dim=1)

    def _gradient_blocks(self):
        """Yield ``(weight, G)`` with ``G`` the ``(B, n)`` per-sample gradients of a batch."""
        params = {**self.fixed, **self.selected}
        for index, (_, batch) in enumerate(self.dataset.batches()):
            inputs, targets = batch
            if self.kind == "empirical":
                yield self._sample_weight, self._per_sample_grads(batch, targets)
                continue
            with torch.no_grad():
                outputs = self.objective.call(params, inputs)
            draws = self._sample_targets(index, outputs, targets)
            M = self.num_mc_samples
            # all M draws in one vmapped call: the inputs repeated M times
            repeated = tree_map(
                lambda a, M=M: (
                    a.expand((M, *a.shape)).reshape((-1, *a.shape[1:]))
                    if isinstance(a, torch.Tensor)
                    else a
                ),
                inputs,
            )
            flat_draws = draws.reshape((-1, *draws.shape[2:]))
            yield self._sample_weight / M, self._per_sample_grads((repeated, None), flat_draws)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(V)
        for weight, G in self._gradient_blocks():
            out += weight * (G.T @ (G @ V))
        return out

    def exact_diagonal(self) -> torch.Tensor:
        """The exact diagonal ``s sum_i g_i**2`` from the per-sample gradients (no BackPACK)."""
        out = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        for weight, G in self._gradient_blocks():
            out += weight * (G * G).sum(dim=0)
        return out


def _likelihood(loss_fn: Any) -> str:
    name = type(loss_fn).__name__
    if name == "CrossEntropyLoss":
        if getattr(loss_fn, "weight", None) is not None or getattr(loss_fn, "label_smoothing", 0):
            raise ValueError("kind='mc' needs CrossEntropyLoss without class weights or smoothing")
        return "categorical"
    if name == "BCEWithLogitsLoss":
        if (
            getattr(loss_fn, "weight", None) is not None
            or getattr(loss_fn, "pos_weight", None) is not None
        ):
            raise ValueError("kind='mc' needs BCEWithLogitsLoss without weight/pos_weight")
        return "bernoulli"
    if name == "MSELoss":
        return "gaussian"
    raise ValueError(
        "fisher(kind='mc') samples labels from the likelihood of the loss and supports "
        f"nn.CrossEntropyLoss, nn.BCEWithLogitsLoss and nn.MSELoss; got {name}. Use "
        "kind='empirical' or ggn() for other losses."
    )


def ggn(
    model: torch.nn.Module,
    loss_fn: Callable[..., Any] | None = None,
    data: Any = None,
    *,
    params: ParamSpec = None,
    chunk_size: int | str | None = None,
    dtype: torch.dtype | None = None,
    device: Any = None,
    reduction: str | None = None,
    closure: Callable[[Any, Any], Any] | None = None,
    check_deterministic: bool = True,
) -> GGNOperator:
    """The generalised Gauss-Newton matrix ``J^T H_L J`` of a model over a whole data set.

    Products use ``torch.func.jvp`` (``J v``), the exact Hessian of the loss in the outputs
    (``jvp`` of ``grad``, so cross-entropy, MSE, BCE-with-logits and any twice-differentiable
    loss work) and ``torch.func.vjp`` (``J^T u``); ``matmat`` is vmapped. Options and data
    rules as in :func:`torch_backend.hessian`; normalisation in :mod:`torch_backend.curvature`.
    The GGN needs ``loss_fn(outputs, targets)``: a ``closure=`` is refused with an error
    that says so (use ``hessian(..., closure=...)``).

    Examples
    --------
    >>> import torch
    >>> from torch_backend import ggn
    >>> model = torch.nn.Linear(3, 2)
    >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> op = ggn(model, torch.nn.CrossEntropyLoss(), (X, y), dtype=torch.float64)
    >>> bool((op.to_dense() - op.to_dense().T).abs().max() < 1e-12)
    True
    """
    options = BuildOptions(
        params=params, chunk_size=chunk_size, dtype=dtype, device=device, reduction=reduction,
        closure=closure, check_deterministic=check_deterministic,
    )
    return build_operator(GGNOperator, model, loss_fn, data, options)


def fisher(
    model: torch.nn.Module,
    loss_fn: Callable[..., Any] | None = None,
    data: Any = None,
    *,
    kind: str = "empirical",
    num_samples: int = 1,
    seed: Any = 0,
    params: ParamSpec = None,
    chunk_size: int | str | None = None,
    dtype: torch.dtype | None = None,
    device: Any = None,
    reduction: str | None = None,
    closure: Callable[[Any, Any], Any] | None = None,
    check_deterministic: bool = True,
) -> FisherOperator:
    """The empirical (``kind="empirical"``) or Monte-Carlo (``kind="mc"``) Fisher matrix.

    Built from per-sample gradients (``vmap`` of ``grad``); the MC labels are drawn once per
    batch from ``seed`` (``num_samples`` draws per sample), so the operator is fixed. The
    exact diagonal is available from the same per-sample gradients. Normalisation in
    :mod:`torch_backend.curvature`; other options as in :func:`torch_backend.hessian`.

    Examples
    --------
    >>> import torch
    >>> from torch_backend import fisher
    >>> model = torch.nn.Linear(3, 2)
    >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> op = fisher(model, torch.nn.CrossEntropyLoss(), (X, y), kind="mc", dtype=torch.float64)
    >>> op.exact_diagonal().shape
    torch.Size([8])
    """
    options = BuildOptions(
        params=params, chunk_size=chunk_size, dtype=dtype, device=device, reduction=reduction,
        closure=closure, check_deterministic=check_deterministic,
    )
    return build_operator(
        FisherOperator, model, loss_fn, data, options, kind=kind, num_samples=num_samples, seed=seed
    )

