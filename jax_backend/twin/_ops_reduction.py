"""Reduction ATen rules: sums and means, extrema, variance, softmax, cumulative sums."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import lax

from ._common import axes, jax_dtype
from ._registry import rule

_F = "reduction"


def _cast(x: Any, dtype: Any) -> Any:
    return x if dtype is None else x.astype(jax_dtype(dtype))


def _over_dims(reduce: Any) -> Any:
    """``aten.<op>.dim``: reduce over ``dim`` (all axes when None), optional dtype cast."""

    def fn(x: Any, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Any:
        return reduce(_cast(x, dtype), axis=axes(dim, x.ndim), keepdims=keepdim)

    return fn


def _over_all(reduce: Any) -> Any:
    """``aten.<op>.default``: reduce over every element, optional dtype cast."""

    def fn(x: Any, *, dtype: Any = None) -> Any:
        return reduce(_cast(x, dtype))

    return fn


for _op, _reduce in (("sum", jnp.sum), ("mean", jnp.mean), ("prod", jnp.prod)):
    rule(f"aten.{_op}.default", family=_F)(_over_all(_reduce))
rule("aten.sum.dim_IntList", family=_F)(_over_dims(jnp.sum))
rule("aten.mean.dim", family=_F)(_over_dims(jnp.mean))
rule("aten.prod.dim_int", family=_F)(_over_dims(jnp.prod))


def _extremum(reduce: Any) -> Any:
    """``aten.amax``/``amin``: over ``dim`` (default every axis). torch's gradients spread
    evenly over ties, exactly as JAX's ``reduce_max`` does."""

    def fn(x: Any, dim: Any = (), keepdim: bool = False) -> Any:
        return reduce(x, axis=axes(dim, x.ndim), keepdims=keepdim)

    return fn


rule("aten.amax.default", family=_F)(_extremum(jnp.max))
rule("aten.amin.default", family=_F)(_extremum(jnp.min))
rule("aten.max.default", family=_F)(jnp.max)
rule("aten.min.default", family=_F)(jnp.min)


def _with_indices(reduce: Any, arg: Any) -> Any:
    def fn(x: Any, dim: int, keepdim: bool = False) -> Any:
        dim = int(dim) % max(x.ndim, 1)
        index = arg(x, axis=dim, keepdims=keepdim)
        # torch's max.dim gradient goes to the selected element only (not spread over ties)
        picked = jnp.take_along_axis(x, index if keepdim else jnp.expand_dims(index, dim),
                                     axis=dim)
        return (picked if keepdim else jnp.squeeze(picked, dim)), index

    return fn


rule("aten.max.dim", family=_F)(_with_indices(jnp.max, jnp.argmax))
rule("aten.min.dim", family=_F)(_with_indices(jnp.min, jnp.argmin))


def _arg_extremum(arg: Any) -> Any:
    """``aten.argmax``/``argmin``: over the flattened input when ``dim`` is None."""

    def fn(x: Any, dim: Any = None, keepdim: bool = False) -> Any:
        if dim is None:
            return arg(x.reshape(-1))
        return arg(x, axis=int(dim), keepdims=keepdim)

    return fn


rule("aten.argmax.default", family=_F)(_arg_extremum(jnp.argmax))
rule("aten.argmin.default", family=_F)(_arg_extremum(jnp.argmin))


@rule("aten.var.correction", family=_F)
def var(x: Any, dim: Any = None, *, correction: Any = None, keepdim: bool = False) -> Any:
    ddof = 1 if correction is None else correction
    return jnp.var(x, axis=axes(dim, x.ndim), ddof=ddof, keepdims=keepdim)


@rule("aten.std.correction", family=_F)
def std(x: Any, dim: Any = None, *, correction: Any = None, keepdim: bool = False) -> Any:
    return jnp.sqrt(var(x, dim, correction=correction, keepdim=keepdim))


@rule("aten.var_mean.correction", family=_F)
def var_mean(x: Any, dim: Any = None, *, correction: Any = None, keepdim: bool = False) -> Any:
    return (var(x, dim, correction=correction, keepdim=keepdim),
            jnp.mean(x, axis=axes(dim, x.ndim), keepdims=keepdim))


for _op, _reduce in (("any", jnp.any), ("all", jnp.all)):
    rule(f"aten.{_op}.default", family=_F)(_over_all(_reduce))
    rule(f"aten.{_op}.dim", f"aten.{_op}.dims", family=_F)(_over_dims(_reduce))


@rule("aten.cumsum.default", family=_F)
def cumsum(x: Any, dim: int, *, dtype: Any = None) -> Any:
    x = _cast(x, dtype)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.result_type(int))
    return jnp.cumsum(x, axis=int(dim))


@rule("aten.cumprod.default", family=_F)
def cumprod(x: Any, dim: int, *, dtype: Any = None) -> Any:
    return jnp.cumprod(_cast(x, dtype), axis=int(dim))


@rule("aten.logsumexp.default", family=_F)
def logsumexp(x: Any, dim: Any, keepdim: bool = False) -> Any:
    ax = axes(dim, x.ndim)
    top = lax.stop_gradient(jnp.max(x, axis=ax, keepdims=True))
    top = jnp.where(jnp.isfinite(top), top, 0)
    out = jnp.log(jnp.sum(jnp.exp(x - top), axis=ax, keepdims=True)) + top
    return out if keepdim else jnp.squeeze(out, ax)


@rule("aten.linalg_vector_norm.default", family=_F)
def vector_norm(x: Any, ord: Any = 2, dim: Any = None, keepdim: bool = False, *,  # noqa: A002
                dtype: Any = None) -> Any:
    x = _cast(x, dtype)
    ax = axes(dim, x.ndim)
    if ord == 2:
        return jnp.sqrt(jnp.sum(x * x, axis=ax, keepdims=keepdim))
    if ord == 1:
        return jnp.sum(jnp.abs(x), axis=ax, keepdims=keepdim)
    if ord == float("inf"):
        return jnp.max(jnp.abs(x), axis=ax, keepdims=keepdim)
    return jnp.sum(jnp.abs(x) ** ord, axis=ax, keepdims=keepdim) ** (1.0 / ord)


# ------------------------------------------------------------------------ softmax


def softmax(x: Any, dim: int) -> Any:
    """torch's softmax: exp(x - max) / sum, the max held constant (it cancels exactly)."""
    top = lax.stop_gradient(jnp.max(x, axis=dim, keepdims=True))
    unnormalised = jnp.exp(x - top)
    return unnormalised / jnp.sum(unnormalised, axis=dim, keepdims=True)


def log_softmax(x: Any, dim: int) -> Any:
    top = lax.stop_gradient(jnp.max(x, axis=dim, keepdims=True))
    shifted = x - top
    return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=dim, keepdims=True))


def safe_softmax(x: Any, dim: int) -> Any:
    """Softmax whose fully masked rows (all -inf) are 0, not NaN (torch's ``_safe_softmax``)."""
    masked = jnp.all(x == -jnp.inf, axis=dim, keepdims=True)
    out = softmax(jnp.where(masked, 0.0, x), dim)
    return jnp.where(masked, 0.0, out)


@rule("aten._softmax.default", family=_F)
def softmax_rule(x: Any, dim: int, half_to_float: bool = False) -> Any:
    return softmax(x, int(dim))


@rule("aten._log_softmax.default", family=_F)
def log_softmax_rule(x: Any, dim: int, half_to_float: bool = False) -> Any:
    return log_softmax(x, int(dim))


@rule("aten.softmax.int", family=_F)
def softmax_int(x: Any, dim: int, dtype: Any = None) -> Any:
    return softmax(_cast(x, dtype), int(dim))


@rule("aten.log_softmax.int", family=_F)
def log_softmax_int(x: Any, dim: int, dtype: Any = None) -> Any:
    return log_softmax(_cast(x, dtype), int(dim))


@rule("aten._safe_softmax.default", family=_F)
def safe_softmax_rule(x: Any, dim: int, dtype: Any = None) -> Any:
    return safe_softmax(_cast(x, dtype), int(dim))

