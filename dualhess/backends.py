"""The backend registry: the one place in :mod:`dualhess` that knows the backends exist.

Backends are found lazily, einops-style: ``torch_backend`` / ``jax_backend`` are imported
(with :mod:`importlib`) the first time they are asked for, never when :mod:`dualhess` is
imported. Each backend package exposes ``dualhess_backend()`` returning an object that follows
:class:`Backend`, the small protocol defined here. The application layer of the core —
:func:`hessian`, :func:`crosscheck_model`, the CLI and the report — reaches the frameworks only
through :func:`get_backend` and :func:`backend_for`.

Examples
--------
>>> from dualhess.backends import known_backends
>>> known_backends()
('torch', 'jax')
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Protocol, runtime_checkable

from ._errors import BackendUnavailableError
from ._operator import Operator

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "get_backend",
    "backend_for",
    "twin_backends",
    "known_backends",
    "available_backends",
    "hessian",
    "crosscheck_model",
]

#: name -> (import path of the backend package, top-level packages whose objects it owns,
#:          the pip extra that installs it)
_REGISTRY: dict[str, tuple[str, tuple[str, ...], str]] = {
    "torch": ("torch_backend.registry", ("torch",), "dualhess[torch]"),
    "jax": ("jax_backend.registry", ("jax", "jaxlib", "flax"), "dualhess[jax]"),
}
#: name -> the distributions whose versions a report lists for that backend (read from the
#: package metadata, without importing anything)
_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "torch": ("torch", "backpack-for-pytorch", "pyhessian", "transformers"),
    "jax": ("jax", "jaxlib", "flax", "optax"),
}
_LOADED: dict[str, Backend] = {}



@runtime_checkable
class Backend(Protocol):
    """What a backend hands the core.

    Attributes
    ----------
    name : str
        The backend's name in the registry (``"torch"``, ``"jax"``): a label for reports and
        the ``--framework`` option, never a switch in the core.
    accepts_closure : bool
        Whether ``hessian`` takes ``closure=fn(model, batch)`` instead of a loss function.
    twinned_by : tuple of str
        The backends that build twins of this backend's models (torch: ``("jax",)``): when
        one of them is not installed, the analysis says so instead of a silent null.

    Every call the core makes on a backend is listed here. An option a backend does not
    support raises an error naming it (never silently dropped); a capability it lacks
    (``twin_hessian`` of a model it cannot convert, ``demo_problem``) raises
    ``NotImplementedError`` with the reason.
    """

    name: str
    accepts_closure: bool
    twinned_by: tuple[str, ...]

    def owns(self, model: Any) -> bool:
        """Whether ``model`` is this framework's model (an ``nn.Module``; an nnx module or a
        linen ``(module, variables)`` pair)."""
        ...

    def parameter_names(self, model: Any) -> list[str]:
        """The names of the model's trainable parameters, in the backend operator's flat
        order (the names of ``hessian(model, ...).layout``)."""
        ...

    def hessian(self, model: Any, loss_fn: Any, data: Any, **options: Any) -> Operator:
        """The Hessian operator of the loss over the whole data set (``dtype``, ``params``,
        ``chunk_size`` and the backend's own options)."""
        ...

    def can_twin(self, model: Any) -> bool:
        """Whether this backend can build a twin of another framework's ``model`` (the same
        function of the same weights, differentiated by this backend's autodiff)."""
        ...

    def normalizers(self, model: Any, loss_fn: Any, data: Any, *, dtype: Any) -> Any:
        """What each batch's loss divides by, as this backend reads ``loss_fn`` (kept labels
        of an ``ignore_index``, class-weight sums, elements, samples), in the order of the
        batches; ``None`` for a loss that is a sum. A twin weights its batches with them, so
        both frameworks differentiate the same whole-data-set loss."""
        ...

    def derivative_suspects(self, model: Any) -> list[str]:
        """Parts of ``model`` whose second derivative this framework is known to get wrong on
        the installed build (measured, not assumed), one sentence each; the cross-check's
        referee names them when it finds this side wrong."""
        ...

    def twin_hessian(
        self, model: Any, loss_fn: Any, data: Any, *, dtype: Any, params: Any = None,
        normalizers: Any = None,
    ) -> tuple[Operator, Any]:
        """The Hessian of the twin of another framework's ``model`` over the same data, and
        the :class:`~dualhess.Alignment` from the owner's flat order to the twin's. The
        batches are weighted by ``normalizers`` (the owner's :meth:`normalizers`)."""
        ...

    def demo_problem(self, **options: Any) -> tuple[Any, Any, Any, dict[str, Any]]:
        """``(model, loss_fn, data, info)`` of ``dualhess analyze``'s embedded default."""
        ...

    def hf_problem(self, name_or_dir: Any, **options: Any) -> Any:
        """A Hugging Face model by name or directory with its tokenizer, packed text and
        loss (``.model``, ``.loss_fn``, ``.data``, ``.info``): ``dualhess analyze --hf``."""
        ...



def backend_distributions() -> tuple[str, ...]:
    """Every distribution a backend builds on, for the versions in a report."""
    return tuple(d for name in _REGISTRY for d in _DISTRIBUTIONS.get(name, ()))


def known_backends() -> tuple[str, ...]:
    """Names of every backend dualhess knows, installed or not."""
    return tuple(_REGISTRY)


def get_backend(name: str) -> Backend:
    """Load (once) and return the backend called ``name``.

    Raises
    ------
    BackendUnavailableError
        When the backend's framework is not installed, with the pip command that fixes it.
    """
    if name in _LOADED:
        return _LOADED[name]
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(_REGISTRY)}")
    module_name, _, extra = _REGISTRY[name]
    try:
        module = importlib.import_module(module_name)
        backend = module.dualhess_backend()
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the {name} backend needs packages that are not installed ({exc}); "
            f"install them with: pip install '{extra}'"
        ) from exc
    if not isinstance(backend, Backend):  # pragma: no cover - a broken backend package
        raise TypeError(f"{module_name}.dualhess_backend() does not follow dualhess.backends.Backend")
    _LOADED[name] = backend
    return backend


def available_backends() -> list[str]:
    """Names of the backends whose frameworks import here."""
    out = []
    for name in _REGISTRY:
        try:
            get_backend(name)
        except BackendUnavailableError:
            continue
        out.append(name)
    return out


def twin_backends(model: Any) -> list[Backend]:
    """The installed backends, other than the model's owner, that can build its twin."""
    owner = backend_for(model)
    out = []
    for name in available_backends():
        backend = get_backend(name)
        if backend is not owner and backend.can_twin(model):
            out.append(backend)
    return out


def backend_for(model: Any) -> Backend:
    """The backend that owns ``model``, found without importing any other framework.

    A framework whose package was never imported cannot have made ``model``, so only
    backends whose packages are already in :data:`sys.modules` are asked.
    """
    for name, (_, packages, _) in _REGISTRY.items():
        if not any(p in sys.modules for p in packages):
            continue
        try:
            backend = get_backend(name)
        except BackendUnavailableError:
            continue
        if backend.owns(model):
            return backend
    raise TypeError(
        f"dualhess cannot tell which framework {type(model).__name__} belongs to: pass a "
        "torch nn.Module, a flax nnx.Module, or a linen (module, variables) pair"
    )


def hessian(model: Any, loss_fn: Any = None, data: Any = None, **options: Any) -> Operator:
    """The Hessian operator of ``loss_fn(model(inputs), targets)`` over ``data``.

    Dispatches on the model's framework: a torch ``nn.Module`` goes to
    ``torch_backend.hessian``, a Flax ``nnx.Module`` to ``jax_backend.from_nnx``, a linen
    ``(module, variables)`` pair to ``jax_backend.from_linen``. ``options`` are passed on
    (``dtype``, ``chunk_size``, ``method``, ``params``, ...). With torch,
    ``dualhess.hessian(model, data=batches, closure=fn)`` takes any loss
    ``fn(model, batch) -> scalar`` instead of ``loss_fn`` (``docs/losses.md``).

    Examples
    --------
    >>> import torch, dualhess  # doctest: +SKIP
    >>> model = torch.nn.Linear(4, 2).double()  # doctest: +SKIP
    >>> data = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,)))  # doctest: +SKIP
    >>> op = dualhess.hessian(model, torch.nn.CrossEntropyLoss(), data)  # doctest: +SKIP
    >>> dualhess.eigsh(op, k=2).values  # doctest: +SKIP
    """
    return backend_for(model).hessian(model, loss_fn, data, **options)


def crosscheck_model(
    model: Any,
    loss_fn: Any,
    data: Any,
    *,
    dtype: str = "float64",
    num_probes: int = 8,
    k: int = 5,
    seed: Any = 0,
    rtol: float | None = None,
    params: Any = None,
    progress: bool = False,
    promote_float32_islands: bool = True,
    **hessian_options: Any,
) -> Any:
    """Compute a PyTorch model's Hessian in PyTorch *and* in JAX, and compare.

    Builds the model's JAX twin (``jax_backend.from_torch``: ``torch.export`` of the model
    with its loss, interpreted in JAX) with identical weights,
    the Hessian operator on each side over the same data, and returns
    :func:`dualhess.crosscheck` of the two with the parameter alignment of the twin.

    Parameters
    ----------
    model : torch.nn.Module
        In eval mode (Dropout/BatchNorm in train mode are refused by the converter).
    loss_fn : callable
        A torch loss module or any ``(outputs, targets) -> scalar`` function (exported with
        the model, so a lambda over a Hugging Face ``out.logits`` works too).
    data : batch or iterable of batches
        ``(inputs, targets)`` in torch layout; the same samples feed both sides.
    dtype : "float64" or "float32"
    num_probes, k, seed, rtol : see :func:`dualhess.crosscheck`.
    promote_float32_islands : bool
        A float64 model that computes parts in float32 (Llama-family RMSNorm and rotary
        tables, T5's LayerNorm variance) is compared on its export with those casts
        rewritten to float64, evaluated by *both* sides (torch differentiates the same
        rewritten program), so they agree to float64 round-off; the report lists the
        islands. Off, both sides keep the float32 islands and the default ``rtol`` is the
        float32 one (the report says why).

    Returns
    -------
    CrosscheckReport

    Examples
    --------
    >>> report = dualhess.crosscheck_model(model, torch.nn.CrossEntropyLoss(), (x, y))  # doctest: +SKIP
    >>> print(report)  # doctest: +SKIP
    """
    from ._crosscheck import crosscheck

    owner = backend_for(model)
    twins = twin_backends(model)
    if not twins:
        raise TypeError(
            f"crosscheck_model: no installed backend builds a twin of a {owner.name} model "
            f"({type(model).__name__}); it takes a PyTorch nn.Module, whose JAX twin is built "
            "for you (pip install 'dualhess[jax]')"
        )
    twin = twins[0]
    # the twin first: an unsupported operation is reported by the converter, naming it
    normalizers = owner.normalizers(model, loss_fn, data, dtype=dtype)
    twin_op, align = twin.twin_hessian(model, loss_fn, data, dtype=dtype, params=params,
                                       normalizers=normalizers,
                                       promote_float32_islands=promote_float32_islands)
    # the twin says which function both sides compute (a rewritten program when the export
    # promoted float32 islands) and why the tolerance is what it is
    reference, notes, twin_rtol = model, [], None
    describe = getattr(getattr(twin_op, "twin", None), "crosscheck_terms", None)
    if describe is not None:
        reference, notes, twin_rtol = describe()
    if rtol is None:
        rtol = twin_rtol
    own_op = owner.hessian(reference, loss_fn, data, dtype=dtype, params=params,
                           **hessian_options)
    report = crosscheck(
        own_op,
        twin_op,
        align=align,
        num_probes=num_probes,
        k=k,
        seed=seed,
        rtol=rtol,
        labels=(owner.name, twin.name),
        progress=progress,
        notes=notes,
    )
    verdict = report.verdict
    if verdict is not None and verdict.wrong == owner.name:
        suspects = owner.derivative_suspects(model)
        if suspects:
            import dataclasses

            verdict = dataclasses.replace(verdict, message=verdict.message + ". Known cause: "
                                          + "; ".join(suspects))
            report = dataclasses.replace(report, verdict=verdict)
    return report
