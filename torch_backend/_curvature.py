"""Generalised Gauss-Newton and Fisher operators of a PyTorch model over a whole data set.

Normalisation (``N`` samples; ``f_n = f(x_n)`` the model output, ``J_n`` its Jacobian in the
selected parameters). The *per-sample loss* ``l_n`` is the sample's whole negative
log-likelihood, summed over its ``D`` loss elements (the ``C`` outputs of ``MSELoss`` or
``BCEWithLogitsLoss``, the positions of a ``(N, C, d1, ...)`` ``CrossEntropyLoss``/``NLLLoss``;
``D = 1`` for one class label per sample), and ``r`` is the factor of the loss's reduction::

    reduction="mean":  L = r sum_n l_n,  r = 1/M          reduction="sum":  L = sum_n l_n, r = 1
    GGN        G = r sum_n J_n^T (d^2 l_n / df^2) J_n        (the Hessian of L without the
                                                           second-order terms of the network)
    empirical  F = r sum_n g_n g_n^T,                      g_n = grad_theta l_n(f_n, y_n)
    MC Fisher  F = r sum_n (1/M) sum_m g_nm g_nm^T,         g_nm = grad_theta l_n(f_n, y~_nm)

The labels ``y~ ~ p(y | f_n)`` come from the likelihood whose negative log is ``l_n``:
categorical ``softmax(f)`` for ``CrossEntropyLoss``, categorical ``exp(f)`` (``f`` log-
probabilities) for ``NLLLoss``, Bernoulli ``sigmoid(f)`` per entry for ``BCEWithLogitsLoss``,
and ``N(f, I/2)`` for ``MSELoss`` (``l_n = ||f_n - y_n||^2``). So ``E[F_mc] = G`` for every
supported loss and either reduction, and the three operators have the scale of the Hessian of
``L``. (``NLLLoss`` is linear in its log-probability inputs, so its GGN split there is zero; its
MC Fisher equals the GGN of ``CrossEntropyLoss`` on the logits before the ``log_softmax``.)

``M`` is the loss's normaliser summed over the data set (:mod:`torch_backend._data`): ``N D``
for a plain mean, the number of kept labels under ``ignore_index``, the sum of the class
weights of the labels under ``weight=``. ``l_n`` is evaluated with a copy of the loss module
whose ``reduction`` is ``"sum"``, so class weights and ignored positions enter exactly as in
the loss (an ignored position contributes nothing, and the MC Fisher keeps it ignored). For a
plain callable ``loss_fn(outputs, targets)`` the loss of one sample alone is ``l_n``
(``D = 1``, ``M = N`` for ``"mean"``). ``D`` (``op.elements_per_sample``) is read from a loss
module by evaluating a copy with ``reduction="none"`` on the first batch.

References
----------
N. N. Schraudolph, "Fast curvature matrix-vector products for second-order gradient
descent", Neural Computation 14 (2002).
J. Martens, "New insights and perspectives on the natural gradient method", JMLR 21 (2020).
F. Kunstner, L. Balles, P. Hennig, "Limitations of the empirical Fisher approximation for
natural gradient descent", NeurIPS (2019).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_map

from ._data import Batch
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
            out += weight * self.layout.join(g)
        return out

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        tangents = self.layout.split_columns(V)
        out = torch.zeros_like(V)
        for weight, batch in self.dataset.batches():
            g = self._batch(batch, tangents, vectorised=True)
            out += weight * self.layout.join_columns(g)
        return out


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
        if objective.normalizer is not None or objective.returns_pairs:
            raise ValueError(
                "fisher: the Fisher is built from per-sample losses l_n, which a normalizer= or "
                "a (sum, normalizer) return does not define; pass a torch loss module (its "
                "normaliser is read off) or use hessian()/ggn() with the normaliser"
            )
        # l_n = the sample's loss summed over its elements (a copy of the module with
        # reduction="sum": class weights and ignore_index applied), r = 1/M with M the
        # loss's normaliser summed over the data set (N D without weights or ignored labels)
        self.elements_per_sample = _elements_per_sample(objective, {**fixed, **selected})
        self._sample_loss = _summed(objective.loss_fn)
        if self.dataset.reduction == "mean":
            self.reduction_factor = 1.0 / self.dataset.total_normalizer
        else:
            self.reduction_factor = 1.0
        self._sample_weight = self.reduction_factor

    # ------------------------------------------------------------------ MC labels
    def _sample_targets(self, index: int, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        """``num_samples`` label draws ``(M, *targets.shape)`` for batch ``index`` (fixed)."""
        seed = int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0])
        gen = torch.Generator(device=outputs.device).manual_seed(seed)
        outputs = outputs.detach()
        M = self.num_mc_samples
        kind = self._likelihood
        if kind in ("categorical", "log-categorical"):
            probs = torch.softmax(outputs, dim=1) if kind == "categorical" else outputs.exp()
            moved = probs.movedim(1, -1).reshape(-1, probs.shape[1])
            draws = torch.multinomial(moved, M, replacement=True, generator=gen)
            shape = (*probs.shape[:1], *probs.shape[2:])
            draws = draws.T.reshape((M, *shape))
            # a position whose label the loss ignores stays ignored (it is not in the GGN)
            ignore = getattr(self.objective.loss_fn, "ignore_index", None)
            if ignore is not None and not targets.is_floating_point():
                draws = torch.where(targets == ignore, torch.full_like(draws, ignore), draws)
            return draws
        if kind == "bernoulli":
            probs = torch.sigmoid(outputs).expand((M, *outputs.shape))
            return torch.bernoulli(probs, generator=gen).to(outputs.dtype)
        # gaussian: l_n = ||f_n - y_n||^2 is the negative log-likelihood of N(f_n, I/2)
        noise = torch.randn(
            (M, *outputs.shape), generator=gen, dtype=outputs.dtype, device=outputs.device
        )
        return outputs + 0.5**0.5 * noise

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
            return self._sample_loss(objective.call({**fixed, **p}, x1), t.unsqueeze(0))

        try:
            grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(
                self.selected, inputs, targets
            )
        except RuntimeError as err:
            if "random" not in str(err):
                raise
            raise ValueError(
                "fisher: the forward pass draws random numbers (Dropout forced on, "
                "torch.randn_like noise, stochastic depth), which per-sample gradients "
                "(torch.func.vmap) refuse and which would make the Fisher a random matrix. "
                "Make the randomness follow model.eval() (training=self.training)."
            ) from err
        return self.layout.join_columns(grads).T  # (B, n) on the home device

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
        """The exact diagonal ``r sum_n g_n**2`` from the per-sample gradients (no BackPACK)."""
        out = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        for weight, G in self._gradient_blocks():
            out += weight * (G * G).sum(dim=0)
        return out


def _summed(loss_fn: Any) -> Any:
    """A copy of a loss module with ``reduction="sum"`` (the loss of one sample is then its
    whole ``l_n``); a plain callable as it is (the loss of one sample alone is ``l_n``)."""
    if isinstance(loss_fn, torch.nn.Module) and isinstance(getattr(loss_fn, "reduction", None), str):
        summed = copy.copy(loss_fn)
        summed.reduction = "sum"
        return summed
    return loss_fn


def _elements_per_sample(objective: Any, params: dict[str, torch.Tensor]) -> int:
    """``D``: how many elements a ``"mean"`` loss module averages over per sample.

    A copy of the module with ``reduction="none"`` is evaluated on the first batch; a plain
    callable (or ``reduction="sum"``) gives 1.
    """
    loss_fn = objective.loss_fn
    if objective.dataset.reduction != "mean" or not isinstance(loss_fn, torch.nn.Module):
        return 1
    if not isinstance(getattr(loss_fn, "reduction", None), str):
        return 1
    unreduced = copy.copy(loss_fn)
    unreduced.reduction = "none"
    first = next(iter(objective.dataset.batches()), None)
    if first is None:  # pragma: no cover - an empty shard of a distributed data set
        return 1
    inputs, targets = first[1]
    with torch.no_grad():
        values = unreduced(objective.call(params, inputs), targets)
    size = int(targets.shape[0]) if targets.ndim else 1
    count = int(values.numel())
    if count % size:  # pragma: no cover - a loss whose elements are not per sample
        raise ValueError(
            f"{type(loss_fn).__name__}(reduction='none') gave {count} values for {size} "
            "samples; cannot tell how many elements per sample the mean runs over"
        )
    return max(count // size, 1)


def _likelihood(loss_fn: Any) -> str:
    name = type(loss_fn).__name__
    if name in ("CrossEntropyLoss", "NLLLoss"):
        if getattr(loss_fn, "weight", None) is not None or getattr(loss_fn, "label_smoothing", 0):
            raise ValueError(f"kind='mc' needs {name} without class weights or smoothing")
        if getattr(loss_fn, "ignore_index", -100) != -100:
            raise ValueError(f"kind='mc' needs {name} without ignore_index")
        return "categorical" if name == "CrossEntropyLoss" else "log-categorical"
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
        f"nn.CrossEntropyLoss, nn.NLLLoss, nn.BCEWithLogitsLoss and nn.MSELoss; got {name}. Use "
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
    normalizer: Callable[[Any], Any] | None = None,
    check_symmetric: bool = True,
) -> GGNOperator:
    """The generalised Gauss-Newton matrix ``J^T H_L J`` of a model over a whole data set.

    Products use ``torch.func.jvp`` (``J v``), the exact Hessian of the loss in the outputs
    (``jvp`` of ``grad``, so cross-entropy, MSE, BCE-with-logits and any twice-differentiable
    loss work) and ``torch.func.vjp`` (``J^T u``); ``matmat`` is vmapped. Options and data
    rules as in :func:`torch_backend.hessian`; normalisation in ``torch_backend._curvature``.
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
        closure=closure, check_deterministic=check_deterministic, normalizer=normalizer,
        check_symmetric=check_symmetric,
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
    check_symmetric: bool = True,
) -> FisherOperator:
    """The empirical (``kind="empirical"``) or Monte-Carlo (``kind="mc"``) Fisher matrix.

    With ``l_n`` the whole negative log-likelihood of sample ``n`` (summed over its ``D``
    loss elements) and ``r`` the reduction factor (``1/(N D)`` for ``"mean"``, 1 for
    ``"sum"``), the empirical Fisher is ``r sum_n grad l_n grad l_n^T`` and the MC Fisher
    ``r sum_n E_y~[grad l_n(y~) grad l_n(y~)^T]``, which equals the GGN in expectation for
    ``CrossEntropyLoss``, ``NLLLoss`` (GGN on the logits), ``BCEWithLogitsLoss`` and
    ``MSELoss``; details in the module docstring of ``torch_backend._curvature``
    (``op.elements_per_sample`` is ``D``, ``op.reduction_factor`` is ``r``).

    Built from per-sample gradients (``vmap`` of ``grad``); the MC labels are drawn once per
    batch from ``seed`` (``num_samples`` draws per sample), so the operator is fixed. The
    exact diagonal is available from the same per-sample gradients. Other options as in
    :func:`torch_backend.hessian`; like the GGN it needs ``loss_fn(outputs, targets)`` and
    refuses a ``closure=``.

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
        check_symmetric=check_symmetric,
    )
    return build_operator(
        FisherOperator, model, loss_fn, data, options, kind=kind, num_samples=num_samples, seed=seed
    )

