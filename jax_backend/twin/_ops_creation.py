"""Creation ATen rules: ``full``, ``zeros``/``ones`` (and ``*_like``, ``new_*``), ``arange``,
``scalar_tensor``, ``eye``. Random creation (``rand``, ``bernoulli``) has no rule: a random
graph has no fixed Hessian. The interpreter casts the result to the dtype torch recorded."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from ._common import jax_dtype, static_shape
from ._registry import rule

_F = "creation"


def _dtype(dtype: Any, like: Any = None) -> Any:
    if dtype is not None:
        return jax_dtype(dtype)
    return None if like is None else like.dtype


@rule("aten.full.default", family=_F)
def full(size: Any, fill_value: Any, *, dtype: Any = None, layout: Any = None,
         device: Any = None, pin_memory: Any = None) -> Any:
    return jnp.full(static_shape(size), fill_value, dtype=_dtype(dtype))


@rule("aten.full_like.default", family=_F)
def full_like(x: Any, fill_value: Any, *, dtype: Any = None, layout: Any = None,
              device: Any = None, pin_memory: Any = None, memory_format: Any = None) -> Any:
    return jnp.full(x.shape, fill_value, dtype=_dtype(dtype, x))


@rule("aten.new_full.default", family=_F)
def new_full(x: Any, size: Any, fill_value: Any, *, dtype: Any = None, layout: Any = None,
             device: Any = None, pin_memory: Any = None) -> Any:
    return jnp.full(static_shape(size), fill_value, dtype=_dtype(dtype, x))


def _filled(value: float) -> None:
    def make(size: Any, *, dtype: Any = None, layout: Any = None, device: Any = None,
             pin_memory: Any = None, memory_format: Any = None) -> Any:
        return jnp.full(static_shape(size), value, dtype=_dtype(dtype) or jnp.result_type(float))

    def like(x: Any, *, dtype: Any = None, layout: Any = None, device: Any = None,
             pin_memory: Any = None, memory_format: Any = None) -> Any:
        return jnp.full(x.shape, value, dtype=_dtype(dtype, x))

    def new(x: Any, size: Any, *, dtype: Any = None, layout: Any = None, device: Any = None,
            pin_memory: Any = None) -> Any:
        return jnp.full(static_shape(size), value, dtype=_dtype(dtype, x))

    return make, like, new


# empty tensors hold arbitrary values in torch; zeros are one valid choice
for _name, _value in (("zeros", 0), ("ones", 1), ("empty", 0)):
    _make, _like, _new = _filled(_value)
    rule(f"aten.{_name}.memory_format" if _name == "empty" else f"aten.{_name}.default",
         family=_F)(_make)
    rule(f"aten.{_name}_like.default", family=_F)(_like)
    rule(f"aten.new_{_name}.default", family=_F)(_new)
rule("aten.empty_strided.default", family=_F)(
    lambda size, stride, **kwargs: _filled(0)[0](size, dtype=kwargs.get("dtype"))
)


@rule("aten.scalar_tensor.default", family=_F)
def scalar_tensor(value: Any, *, dtype: Any = None, layout: Any = None, device: Any = None,
                  pin_memory: Any = None) -> Any:
    return jnp.asarray(value, dtype=_dtype(dtype))


def _arange(start: Any, end: Any, step: Any, dtype: Any) -> Any:
    return jnp.arange(start, end, step, dtype=_dtype(dtype))


@rule("aten.arange.default", family=_F)
def arange(end: Any, *, dtype: Any = None, layout: Any = None, device: Any = None,
           pin_memory: Any = None) -> Any:
    return _arange(0, end, 1, dtype)


@rule("aten.arange.start", family=_F)
def arange_start(start: Any, end: Any, *, dtype: Any = None, layout: Any = None,
                 device: Any = None, pin_memory: Any = None) -> Any:
    return _arange(start, end, 1, dtype)


@rule("aten.arange.start_step", family=_F)
def arange_start_step(start: Any, end: Any, step: Any = 1, *, dtype: Any = None,
                      layout: Any = None, device: Any = None, pin_memory: Any = None) -> Any:
    return _arange(start, end, step, dtype)


@rule("aten.eye.default", family=_F)
def eye(n: int, *, dtype: Any = None, layout: Any = None, device: Any = None,
        pin_memory: Any = None) -> Any:
    return jnp.eye(n, dtype=_dtype(dtype))


@rule("aten.linspace.default", family=_F)
def linspace(start: Any, end: Any, steps: int, *, dtype: Any = None, layout: Any = None,
             device: Any = None, pin_memory: Any = None) -> Any:
    return jnp.linspace(start, end, steps, dtype=_dtype(dtype))
