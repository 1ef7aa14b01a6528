"""Construction-time validity checks of the JAX operators, in one place.

A curvature operator must be the Hessian (or GGN) of one fixed, parameter-dependent,
whole-data-set loss, and symmetric. The checks below run once when an operator is built,
before any product is spent on an algorithm, and report through :mod:`dualhess._errors`:

- :func:`check_loss_depends_on_params`: the loss must depend on the selected parameters
  (decided on the structure of its reverse-mode derivative, never on a zero-valued gradient:
  a loss at a stationary point has a zero gradient and a perfectly good Hessian);
- :func:`check_normalizer_is_fixed`: a loss's own normaliser (``(loss_sum, normalizer)``)
  must not depend on the parameters;
- :func:`check_symmetric`: a two-product probe ``|u^T H v - v^T H u|`` against rounding;
- :func:`check_nnx_mode` / :func:`linen_batch_statistics_error`: Flax modules that normalise
  with the batch's statistics (BatchNorm in train mode) or draw dropout masks are refused, as
  the torch backend refuses them (``torch_backend._params.check_model_mode``).

The structural checks use :func:`outputs_depending_on`, a forward dependence analysis of a
jaxpr that looks inside calls (``jit``, ``custom_jvp``/``custom_vjp`` calls, ``remat``) and
treats any other primitive with sub-programs (loops, conditionals) conservatively: each of its
outputs depends on all of its inputs. It can thus miss a constant loss hidden in a loop, but
never refuses a loss that depends on its parameters.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dualhess._errors import AsymmetricOperatorError, OperatorError

__all__ = [
    "outputs_depending_on",
    "check_loss_depends_on_params",
    "check_normalizer_is_fixed",
    "check_symmetric",
    "symmetry_tolerance",
    "computation_dtype",
    "check_nnx_mode",
    "linen_batch_statistics_error",
]

#: Primitives that call a sub-program with the same inputs and outputs, so the dependence
#: analysis can follow them exactly.
_CALLS = {
    "pjit",
    "jit",
    "closed_call",
    "core_call",
    "remat",
    "remat2",
    "checkpoint",
    "custom_jvp_call",
    "custom_vjp_call",
    "custom_vjp_call_jaxpr",
}


def _is_var(atom: Any) -> bool:
    return not hasattr(atom, "val")  # Literals carry a value; Vars do not


def _sub_jaxpr(eqn: Any) -> Any:
    """The called program of a call-like equation whose signature matches it, or None."""
    if eqn.primitive.name not in _CALLS:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        inner = eqn.params.get(key)
        inner = getattr(inner, "jaxpr", inner)  # ClosedJaxpr -> Jaxpr
        if (
            hasattr(inner, "eqns")
            and len(inner.invars) == len(eqn.invars)
            and len(inner.outvars) == len(eqn.outvars)
        ):
            return inner
    return None


def _propagate(jaxpr: Any, inputs: Sequence[bool]) -> list[bool]:
    dependent = {var for var, flag in zip(jaxpr.invars, inputs) if flag}
    for eqn in jaxpr.eqns:
        flags = [_is_var(atom) and atom in dependent for atom in eqn.invars]
        if not any(flags):
            continue
        inner = _sub_jaxpr(eqn)
        outs = _propagate(inner, flags) if inner is not None else [True] * len(eqn.outvars)
        dependent.update(var for var, flag in zip(eqn.outvars, outs) if flag)
    return [_is_var(atom) and atom in dependent for atom in jaxpr.outvars]


def outputs_depending_on(closed: Any, inputs: Sequence[bool]) -> list[bool]:
    """For each output of ``closed`` (a jaxpr), whether it can depend on the flagged inputs.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> closed = jax.make_jaxpr(lambda a, b: (a * 2.0, jnp.sin(b) + 1.0))(1.0, 2.0)
    >>> outputs_depending_on(closed, [True, False])
    [True, False]
    """
    return _propagate(getattr(closed, "jaxpr", closed), list(inputs))


def check_loss_depends_on_params(
    batch_loss: Callable[[jax.Array, Any], jax.Array], flat: jax.Array, batch: Any, where: str
) -> None:
    """Refuse a loss whose gradient in the parameters is structurally zero.

    The reverse-mode derivative ``ct -> vjp(loss)(ct)`` is traced abstractly (no computation);
    a loss that does not depend on the parameters (``jax.lax.stop_gradient`` on them, the
    parameters unused) gives a gradient that does not depend on the cotangent ``ct`` at all
    (JAX instantiates a symbolic zero). A loss at a stationary point still passes: its
    gradient is zero in value, not in structure.

    Raises
    ------
    OperatorError
        The loss has no gradient in the selected parameters.
    """

    def pullback(p: jax.Array, cotangent: jax.Array) -> jax.Array:
        value, vjp = jax.vjp(lambda q: batch_loss(q, batch), p)
        return vjp(jnp.asarray(cotangent, dtype=value.dtype))[0]

    closed = jax.make_jaxpr(pullback)(flat, jnp.zeros((), flat.dtype))
    if not any(outputs_depending_on(closed, [False, True])):
        raise OperatorError(
            f"{where}: the loss has no gradient in the selected parameters (it does not depend "
            "on them: jax.lax.stop_gradient on the parameters, or parameters unused), so its "
            "curvature is not defined. Differentiate the loss with respect to the parameters "
            "you pass."
        )


def check_normalizer_is_fixed(
    batch_normalizer: Callable[[jax.Array, Any], Any], flat: jax.Array, batch: Any, where: str
) -> None:
    """Refuse a ``(loss_sum, normalizer)`` loss whose normaliser depends on the parameters.

    The normaliser is evaluated once, at construction; it must be a property of the batch
    (kept labels, a sum of class weights), so its trace must not read the parameters.
    """
    closed = jax.make_jaxpr(batch_normalizer)(flat, batch)
    if any(outputs_depending_on(closed, [True] + [False] * (len(closed.jaxpr.invars) - 1))):
        raise OperatorError(
            f"{where}: the normalizer returned by the loss (the second element of "
            "(loss_sum, normalizer)) depends on the parameters; it must be what the loss "
            "divides by, a function of the batch only (a count of kept labels, a sum of class "
            "weights). Compute it from the batch, or pass normalizer=fn(batch); auxiliary "
            "outputs (an accuracy, logits) are not supported."
        )


def _float_dtypes(jaxpr: Any, found: set[Any]) -> None:
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            dtype = getattr(getattr(var, "aval", None), "dtype", None)
            if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
                found.add(jnp.dtype(dtype))
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(item, "jaxpr", item)
                if hasattr(inner, "eqns"):
                    _float_dtypes(inner, found)


def computation_dtype(closed: Any, default: Any) -> Any:
    """The least precise floating dtype a traced computation uses (``default`` if none).

    A float64 operator whose loss casts to float32 inside (a float32 softmax, a mixed-precision
    layer) rounds at float32's level; the symmetry probe must allow that rounding.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> jax.config.update("jax_enable_x64", True)
    >>> closed = jax.make_jaxpr(lambda x: jnp.sin(x.astype(jnp.float32)).astype(x.dtype))
    >>> computation_dtype(closed(jnp.ones(2, jnp.float64)), jnp.float64)
    dtype('float32')
    """
    found: set[Any] = set()
    _float_dtypes(getattr(closed, "jaxpr", closed), found)
    found.add(jnp.dtype(default))
    return max(found, key=lambda dtype: float(jnp.finfo(dtype).eps))


def symmetry_tolerance(n: int, dtype: Any) -> float:
    """The largest relative asymmetry the probe attributes to rounding: ``100 eps sqrt(n)``,
    capped at 0.5.

    The probe's measure is ``r = |u^T H v - v^T H u| / (|u| |Hv| + |v| |Hu|)``, scale-free
    and at most 1. Exact symmetric products give ``r = 0``; rounding errors ``d`` in a computed
    product, ``|d| <= e |H v|`` with ``e`` the products' relative error, give ``r <= e``,
    plus the dot products' own rounding (about ``eps sqrt(n)`` for random signs). The bound
    allows ``e`` up to ``100 eps sqrt(n)`` (cancellation in deep products), so float64 models
    are held to ~1e-11 at n = 1e4 and float32 ones to ~1e-3; in 16-bit dtypes the cap makes the
    probe catch only gross asymmetry. ``dtype`` is that of the least precise computation in
    the product (:func:`computation_dtype`), not only the operator's.

    Examples
    --------
    >>> import numpy as np
    >>> round(symmetry_tolerance(10_000, np.float64), 14)
    2.22e-12
    """
    eps = float(jnp.finfo(dtype).eps)
    return min(0.5, 100.0 * eps * float(np.sqrt(max(n, 1))))


def check_symmetric(
    matvec: Callable[[jax.Array], jax.Array],
    n: int,
    dtype: Any,
    where: str,
    seed: int = 0,
    rounding_dtype: Any = None,
) -> float:
    """Two products ``Hu``, ``Hv`` with seeded random ``u, v`` (numpy float64, cast to the
    operator's ``dtype``); refuse ``u^T H v != v^T H u`` beyond :func:`symmetry_tolerance`
    for ``rounding_dtype`` (default ``dtype``). Returns the measured relative asymmetry.

    Raises
    ------
    AsymmetricOperatorError
        The products are not symmetric: not a Hessian.
    """
    if n < 2:
        return 0.0
    rng = np.random.default_rng(seed)
    u64, v64 = rng.standard_normal(n), rng.standard_normal(n)
    u, v = jnp.asarray(u64, dtype=dtype), jnp.asarray(v64, dtype=dtype)
    hu = np.asarray(matvec(u), dtype=np.float64)
    hv = np.asarray(matvec(v), dtype=np.float64)
    u64, v64 = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
    gap = abs(float(u64 @ hv) - float(v64 @ hu))
    scale = float(np.linalg.norm(u64) * np.linalg.norm(hv) + np.linalg.norm(v64) * np.linalg.norm(hu))
    if not np.isfinite(gap) or not np.isfinite(scale):
        raise OperatorError(f"{where}: the symmetry probe's products contain NaN or Inf")
    if scale == 0.0:
        return 0.0  # a zero operator is symmetric
    ratio = gap / scale
    rounding_dtype = dtype if rounding_dtype is None else rounding_dtype
    tol = symmetry_tolerance(n, rounding_dtype)
    if ratio > tol:
        raise AsymmetricOperatorError(
            f"{where}: the operator is not symmetric: |u^T H v - v^T H u| / (|u| |Hv| + "
            f"|v| |Hu|) = {ratio:.3g} for random u, v, beyond rounding ({tol:.3g} in "
            f"{jnp.dtype(rounding_dtype).name}), so it is not the Hessian of the loss and a symmetric "
            "eigensolver's answer would be meaningless. Likely causes: a jax.custom_jvp or "
            "jax.custom_vjp whose derivative rule is not the derivative of its function (or "
            "is not itself differentiable consistently), a non-differentiable operation "
            "(sort, argmax, a lookup) given a hand-written rule, or stop_gradient on part of "
            "an expression. Fix the rule, or pass check_symmetric=False to analyse the "
            "operator anyway."
        )
    return ratio


def check_nnx_mode(model: Any, where: str = "from_nnx") -> None:
    """Refuse an nnx model whose modules normalise with batch statistics or draw dropout
    masks (train mode), naming them, as the torch backend does for ``model.train()``.

    A module with ``use_running_average=False`` (``nnx.BatchNorm`` in train mode) normalises
    each batch with its own statistics, so the curvature would depend on how the data are
    batched; one with ``deterministic=False`` and a positive ``rate``/``dropout_rate``
    (``nnx.Dropout``, attention dropout) draws a new mask in every call.
    """
    from flax import nnx

    batchnorms, dropouts = [], []
    for path, module in nnx.iter_graph(model):
        if not isinstance(module, nnx.Module):
            continue
        name = ".".join(str(part) for part in path) or "<model>"
        if getattr(module, "use_running_average", None) is False:
            batchnorms.append(name)
        rate = getattr(module, "rate", getattr(module, "dropout_rate", 0.0))
        try:
            positive = float(rate) > 0
        except (TypeError, ValueError):
            positive = False
        if getattr(module, "deterministic", None) is False and positive:
            dropouts.append(name)
    if batchnorms:
        raise OperatorError(
            f"{where}: BatchNorm layers in train mode ({', '.join(batchnorms)}): they normalise "
            "with the batch's statistics (use_running_average=False), so the curvature would "
            "depend on how the data are batched. Call model.eval() before the analysis (the "
            "Hessian is then that of the network used at inference, with the running "
            "statistics)."
        )
    if dropouts:
        raise OperatorError(
            f"{where}: Dropout layers in train mode ({', '.join(dropouts)}) draw a new random "
            "mask in every product, so the curvature is not a fixed operator. Call model.eval() "
            "before the analysis."
        )


def linen_batch_statistics_error(err: Exception, where: str = "from_linen") -> OperatorError | None:
    """The refusal for a linen module that tried to update its ``batch_stats`` (a BatchNorm
    with ``use_running_average=False``), naming the module; None for other Flax errors."""
    text = str(err)
    match = re.search(r'variable "([^"]+)" in "([^"]*)" because collection "([^"]+)"', text)
    if match is None or match.group(3) != "batch_stats":
        return None
    module = match.group(2).strip("/").replace("/", ".") or "<root>"
    return OperatorError(
        f"{where}: the module did not run in inference mode: {module!r} normalises with the "
        "batch's statistics (a BatchNorm with use_running_average=False: it tried to update "
        "batch_stats), so the curvature would depend on how the data are batched. Run it on "
        "its running statistics: pass apply_kwargs such as {'train': False}, or build it with "
        "use_running_average=True."
    )
