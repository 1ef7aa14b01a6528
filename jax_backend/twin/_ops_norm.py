"""Normalisation ATen rules: batch norm (eval statistics or batch statistics), layer norm,
group norm. The extra outputs torch returns for its backward (mean, inverse std) are given
where they are cheap, otherwise as empty arrays."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import lax

from ._registry import RuleError, rule

_F = "norm"


def _channel(x: Any, v: Any) -> Any:
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


def _affine(x: Any, y: Any, weight: Any, bias: Any) -> Any:
    if weight is not None:
        y = y * _channel(x, weight)
    if bias is not None:
        y = y + _channel(x, bias)
    return y


def _empty(x: Any) -> Any:
    return jnp.zeros((0,), x.dtype)


@rule("aten._native_batch_norm_legit_no_training.default", family=_F)
def batch_norm_eval(x: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any,
                    momentum: float, eps: float) -> Any:
    rstd = lax.rsqrt(running_var + eps)
    y = (x - _channel(x, running_mean)) * _channel(x, rstd)
    return _affine(x, y, weight, bias), _empty(x), _empty(x)


def _batch_stats(x: Any, eps: float) -> tuple[Any, Any]:
    reduce = (0,) + tuple(range(2, x.ndim))
    mean = jnp.mean(x, axis=reduce)
    var = jnp.mean(jnp.square(x - _channel(x, mean)), axis=reduce)
    return mean, lax.rsqrt(var + eps)


@rule("aten._native_batch_norm_legit.no_stats", family=_F)
def batch_norm_batch_stats(x: Any, weight: Any, bias: Any, training: bool, momentum: float,
                           eps: float) -> Any:
    mean, rstd = _batch_stats(x, eps)
    y = (x - _channel(x, mean)) * _channel(x, rstd)
    return _affine(x, y, weight, bias), mean, rstd


@rule("aten._native_batch_norm_legit.default", "aten.native_batch_norm.default", family=_F)
def batch_norm_legit(x: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any,
                     training: bool, momentum: float, eps: float) -> Any:
    if training:
        raise ValueError(
            "batch_norm in training mode uses batch statistics and updates the running "
            "statistics; call model.eval() before building the twin"
        )
    return batch_norm_eval(x, weight, bias, running_mean, running_var, momentum, eps)


@rule("aten.batch_norm.default", family=_F)
def batch_norm(x: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any,
               training: bool, momentum: float, eps: float, cudnn_enabled: bool = True) -> Any:
    if running_mean is None:
        return batch_norm_batch_stats(x, weight, bias, True, momentum, eps)[0]
    return batch_norm_legit(x, weight, bias, running_mean, running_var, training, momentum,
                            eps)[0]


def _layer_norm(x: Any, normalized_shape: Any, weight: Any, bias: Any, eps: float) -> Any:
    reduce = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    mean = jnp.mean(x, axis=reduce, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=reduce, keepdims=True)
    rstd = lax.rsqrt(var + eps)
    y = (x - mean) * rstd
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y, mean, rstd


@rule("aten.native_layer_norm.default", family=_F)
def native_layer_norm(x: Any, normalized_shape: Any, weight: Any, bias: Any,
                      eps: float) -> Any:
    return _layer_norm(x, normalized_shape, weight, bias, eps)


@rule("aten.layer_norm.default", family=_F)
def layer_norm(x: Any, normalized_shape: Any, weight: Any = None, bias: Any = None,
               eps: float = 1e-5, cudnn_enable: bool = True) -> Any:
    return _layer_norm(x, normalized_shape, weight, bias, eps)[0]


@rule("aten.native_group_norm.default", family=_F)
def native_group_norm(x: Any, weight: Any, bias: Any, n: int, c: int, hxw: int, group: int,
                      eps: float) -> Any:
    if c % group:
        raise RuleError(f"{c} channels are not divisible into {group} groups")
    grouped = x.reshape(n, group, -1)
    mean = jnp.mean(grouped, axis=2, keepdims=True)
    var = jnp.mean(jnp.square(grouped - mean), axis=2, keepdims=True)
    rstd = lax.rsqrt(var + eps)
    y = ((grouped - mean) * rstd).reshape(x.shape)
    return _affine(x, y, weight, bias), mean.reshape(n, group), rstd.reshape(n, group)


@rule("aten.group_norm.default", family=_F)
def group_norm(x: Any, num_groups: int, weight: Any = None, bias: Any = None,
               eps: float = 1e-5, cudnn_enabled: bool = True) -> Any:
    n, c = x.shape[0], x.shape[1]
    return native_group_norm(x, weight, bias, n, c, x.size // max(n * c, 1), num_groups, eps)[0]


@rule("aten.rms_norm.default", family=_F)
def rms_norm(x: Any, normalized_shape: Any, weight: Any = None, eps: Any = None) -> Any:
    reduce = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    if eps is None:
        eps = float(jnp.finfo(x.dtype).eps)
    y = x * lax.rsqrt(jnp.mean(jnp.square(x), axis=reduce, keepdims=True) + eps)
    return y if weight is None else y * weight
