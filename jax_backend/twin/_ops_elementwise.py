"""Elementwise ATen rules: arithmetic, comparisons, logic, activations, casts.

Derivative conventions follow torch's own backward formulas where they differ from the
obvious JAX expression (boundaries of ``hardtanh``/``clamp``, ``relu`` at 0), so first and
second derivatives agree with torch's double backward, not only the values.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ._common import asarray, jax_dtype
from ._registry import RuleError, rule

_F = "elementwise"


def _scaled(other: Any, alpha: Any) -> Any:
    return other if alpha == 1 else other * alpha


# ------------------------------------------------------------------------ arithmetic


@rule("aten.add.Tensor", "aten.add.Scalar", family=_F)
def add(x: Any, other: Any, *, alpha: Any = 1) -> Any:
    return jnp.add(x, _scaled(other, alpha))


@rule("aten.sub.Tensor", "aten.sub.Scalar", family=_F)
def sub(x: Any, other: Any, *, alpha: Any = 1) -> Any:
    return jnp.subtract(x, _scaled(other, alpha))


@rule("aten.rsub.Scalar", "aten.rsub.Tensor", family=_F)
def rsub(x: Any, other: Any, *, alpha: Any = 1) -> Any:
    return jnp.subtract(other, _scaled(x, alpha))


@rule("aten.mul.Tensor", "aten.mul.Scalar", family=_F)
def mul(x: Any, other: Any) -> Any:
    return jnp.multiply(x, other)


@rule("aten.div.Tensor", "aten.div.Scalar", family=_F)
def div(x: Any, other: Any) -> Any:
    x, other = asarray(x), asarray(other)
    if not jnp.issubdtype(x.dtype, jnp.inexact) and not jnp.issubdtype(other.dtype, jnp.inexact):
        x = x.astype(jnp.result_type(float))  # true division of integers
    return jnp.true_divide(x, other)


@rule("aten.div.Tensor_mode", "aten.div.Scalar_mode", family=_F)
def div_mode(x: Any, other: Any, *, rounding_mode: Any = None) -> Any:
    if rounding_mode is None:
        return div(x, other)
    x, other = asarray(x), asarray(other)
    if rounding_mode == "floor":
        return jnp.floor_divide(x, other)
    if rounding_mode == "trunc":
        if jnp.issubdtype(x.dtype, jnp.integer) and jnp.issubdtype(other.dtype, jnp.integer):
            x, other = jnp.broadcast_arrays(*(a.astype(jnp.result_type(x, other))
                                              for a in (x, other)))
            return lax.div(x, other)  # C division truncates towards zero
        return jnp.trunc(x / other)
    raise RuleError(f"rounding_mode={rounding_mode!r}")


@rule("aten.floor_divide.default", "aten.floor_divide.Scalar", family=_F)
def floor_divide(x: Any, other: Any) -> Any:
    return jnp.floor_divide(x, other)


@rule("aten.remainder.Tensor", "aten.remainder.Scalar", family=_F)
def remainder(x: Any, other: Any) -> Any:
    return jnp.remainder(x, other)  # sign of the divisor, as torch


@rule("aten.fmod.Tensor", "aten.fmod.Scalar", family=_F)
def fmod(x: Any, other: Any) -> Any:
    return jnp.fmod(x, other)


def _int_exponent(exponent: Any) -> Any:
    if isinstance(exponent, float) and exponent.is_integer() and abs(exponent) <= 64:
        return int(exponent)
    return exponent


@rule("aten.pow.Tensor_Scalar", family=_F)
def pow_tensor_scalar(x: Any, exponent: Any) -> Any:
    exponent = _int_exponent(exponent)
    if isinstance(exponent, int):
        if exponent < 0 and jnp.issubdtype(x.dtype, jnp.integer):
            raise RuleError("integers to negative integer powers are not allowed")
        return lax.integer_pow(x, exponent)
    return jnp.power(x, exponent)


@rule("aten.pow.Tensor_Tensor", family=_F)
def pow_tensor_tensor(x: Any, exponent: Any) -> Any:
    return jnp.power(x, exponent)


@rule("aten.pow.Scalar", family=_F)
def pow_scalar(base: Any, exponent: Any) -> Any:
    return jnp.power(jnp.asarray(base, exponent.dtype), exponent)


# ------------------------------------------------------------------------ unary maths


def _unary(name: str, fn: Any) -> None:
    rule(f"aten.{name}.default", family=_F)(lambda x: fn(x))


for _name, _fn in {
    "neg": jnp.negative, "abs": jnp.abs, "exp": jnp.exp, "exp2": jnp.exp2, "log": jnp.log,
    "log2": jnp.log2, "log10": jnp.log10, "log1p": jnp.log1p, "expm1": jnp.expm1,
    "sqrt": jnp.sqrt, "rsqrt": lax.rsqrt, "reciprocal": jnp.reciprocal, "sin": jnp.sin,
    "cos": jnp.cos, "tan": jnp.tan, "tanh": jnp.tanh, "sinh": jnp.sinh, "cosh": jnp.cosh,
    "asin": jnp.arcsin, "acos": jnp.arccos, "atan": jnp.arctan, "asinh": jnp.arcsinh,
    "acosh": jnp.arccosh, "atanh": jnp.arctanh, "erf": jax.scipy.special.erf,
    "erfc": jax.scipy.special.erfc, "erfinv": jax.scipy.special.erfinv,
    "sigmoid": jax.nn.sigmoid, "sign": jnp.sign, "sgn": jnp.sign, "floor": jnp.floor,
    "ceil": jnp.ceil, "trunc": jnp.trunc, "frac": lambda x: x - jnp.trunc(x),
    "square": jnp.square, "isnan": jnp.isnan, "isinf": jnp.isinf, "isfinite": jnp.isfinite,
    "logical_not": jnp.logical_not, "relu": jax.nn.relu, "silu": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)), "hardswish": None,
    "hardsigmoid": None,
}.items():
    if _fn is not None:
        _unary(_name, _fn)


@rule("aten.round.default", family=_F)
def round_(x: Any) -> Any:
    return jnp.round(x)  # half to even, as torch


@rule("aten.round.decimals", family=_F)
def round_decimals(x: Any, *, decimals: int = 0) -> Any:
    return jnp.round(x, decimals)


@rule("aten.bitwise_not.default", family=_F)
def bitwise_not(x: Any) -> Any:
    return jnp.logical_not(x) if x.dtype == jnp.bool_ else jnp.bitwise_not(x)


@rule("aten.atan2.default", family=_F)
def atan2(x: Any, other: Any) -> Any:
    return jnp.arctan2(x, other)


@rule("aten.xlogy.Tensor", family=_F)
def xlogy(x: Any, other: Any) -> Any:
    return jax.scipy.special.xlogy(x, other)


# ------------------------------------------------------------------------ activations


@rule("aten.gelu.default", family=_F)
def gelu(x: Any, *, approximate: str = "none") -> Any:
    if approximate == "tanh":
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1.0 + jnp.tanh(inner))
    if approximate != "none":
        raise RuleError(f"approximate={approximate!r}")
    return 0.5 * x * (1.0 + jax.scipy.special.erf(x * (1.0 / math.sqrt(2.0))))


@rule("aten.leaky_relu.default", family=_F)
def leaky_relu(x: Any, negative_slope: float = 0.01) -> Any:
    return jnp.where(x > 0, x, x * negative_slope)


@rule("aten.elu.default", family=_F)
def elu(x: Any, alpha: float = 1.0, scale: float = 1.0, input_scale: float = 1.0) -> Any:
    negative = alpha * jnp.expm1(jnp.minimum(x, 0) * input_scale)
    return scale * jnp.where(x > 0, x, negative)


@rule("aten.softplus.default", family=_F)
def softplus(x: Any, beta: float = 1.0, threshold: float = 20.0) -> Any:
    z = x * beta
    soft = jnp.log1p(jnp.exp(jnp.minimum(z, threshold))) / beta
    return jnp.where(z > threshold, x, soft)


@rule("aten.hardtanh.default", family=_F)
def hardtanh(x: Any, min_val: float = -1.0, max_val: float = 1.0) -> Any:
    # torch's gradient is 1 strictly inside (min, max) and 0 at and beyond the bounds
    inside = (x > min_val) & (x < max_val)
    return jnp.where(inside, x, jnp.where(x <= min_val, min_val, max_val).astype(x.dtype))


@rule("aten.hardsigmoid.default", family=_F)
def hardsigmoid(x: Any) -> Any:
    inside = (x > -3.0) & (x < 3.0)
    return jnp.where(inside, x / 6.0 + 0.5, jnp.where(x <= -3.0, 0.0, 1.0).astype(x.dtype))


@rule("aten.hardswish.default", family=_F)
def hardswish(x: Any) -> Any:
    # torch: x * relu6(x + 3) / 6; gradient (2x + 3) / 6 on [-3, 3] (inclusive at 3)
    return jnp.where(x < -3.0, 0.0, jnp.where(x <= 3.0, x * (x + 3.0) / 6.0, x)).astype(x.dtype)


@rule("aten.logit.default", family=_F)
def logit(x: Any, eps: Any = None) -> Any:
    if eps is not None:
        x = jnp.clip(x, eps, 1.0 - eps)
    return jnp.log(x / (1.0 - x))


# ------------------------------------------------------------------------ clamps, min/max


def _clamp(x: Any, lo: Any, hi: Any) -> Any:
    # torch's clamp gradient is 1 on the closed interval [min, max]
    if lo is not None:
        x = jnp.where(x < lo, jnp.asarray(lo, x.dtype) if not hasattr(lo, "shape") else lo, x)
    if hi is not None:
        x = jnp.where(x > hi, jnp.asarray(hi, x.dtype) if not hasattr(hi, "shape") else hi, x)
    return x


@rule("aten.clamp.default", "aten.clamp.Tensor", family=_F)
def clamp(x: Any, min: Any = None, max: Any = None) -> Any:  # noqa: A002
    return _clamp(x, min, max)


@rule("aten.clamp_min.default", "aten.clamp_min.Tensor", family=_F)
def clamp_min(x: Any, min: Any) -> Any:  # noqa: A002
    return _clamp(x, min, None)


@rule("aten.clamp_max.default", "aten.clamp_max.Tensor", family=_F)
def clamp_max(x: Any, max: Any) -> Any:  # noqa: A002
    return _clamp(x, None, max)


@rule("aten.maximum.default", family=_F)
def maximum(x: Any, other: Any) -> Any:
    return jnp.maximum(x, other)  # ties split the gradient evenly, as torch


@rule("aten.minimum.default", family=_F)
def minimum(x: Any, other: Any) -> Any:
    return jnp.minimum(x, other)


@rule("aten.where.self", "aten.where.ScalarSelf", "aten.where.ScalarOther",
      "aten.where.Scalar", family=_F)
def where(condition: Any, x: Any, other: Any) -> Any:
    return jnp.where(condition, x, other)


@rule("aten.masked_fill.Scalar", "aten.masked_fill.Tensor", family=_F)
def masked_fill(x: Any, mask: Any, value: Any) -> Any:
    return jnp.where(mask, jnp.asarray(value, x.dtype), x)


@rule("aten.nan_to_num.default", family=_F)
def nan_to_num(x: Any, nan: Any = None, posinf: Any = None, neginf: Any = None) -> Any:
    return jnp.nan_to_num(x, nan=0.0 if nan is None else nan, posinf=posinf, neginf=neginf)


@rule("aten.lerp.Scalar", "aten.lerp.Tensor", family=_F)
def lerp(x: Any, end: Any, weight: Any) -> Any:
    return x + weight * (end - x)


@rule("aten.addcmul.default", family=_F)
def addcmul(x: Any, t1: Any, t2: Any, *, value: Any = 1) -> Any:
    return x + value * t1 * t2


@rule("aten.addcdiv.default", family=_F)
def addcdiv(x: Any, t1: Any, t2: Any, *, value: Any = 1) -> Any:
    return x + value * t1 / t2


# ------------------------------------------------------------------------ comparisons, logic

for _name, _fn in {
    "eq": jnp.equal, "ne": jnp.not_equal, "lt": jnp.less, "le": jnp.less_equal,
    "gt": jnp.greater, "ge": jnp.greater_equal,
}.items():
    rule(f"aten.{_name}.Tensor", f"aten.{_name}.Scalar", family=_F)(
        lambda x, other, _fn=_fn: _fn(x, other)
    )

for _name, _fn in {
    "logical_and": jnp.logical_and, "logical_or": jnp.logical_or,
    "logical_xor": jnp.logical_xor,
}.items():
    rule(f"aten.{_name}.default", family=_F)(lambda x, other, _fn=_fn: _fn(x, other))


def _bitwise(logical: Any, bitwise: Any) -> Any:
    def fn(x: Any, other: Any) -> Any:
        x, other = asarray(x), asarray(other)
        if x.dtype == jnp.bool_ and other.dtype == jnp.bool_:
            return logical(x, other)
        return bitwise(x, other)

    return fn


for _name, _pair in {
    "bitwise_and": (jnp.logical_and, jnp.bitwise_and),
    "bitwise_or": (jnp.logical_or, jnp.bitwise_or),
    "bitwise_xor": (jnp.logical_xor, jnp.bitwise_xor),
}.items():
    rule(f"aten.{_name}.Tensor", f"aten.{_name}.Scalar", family=_F)(_bitwise(*_pair))
rule("aten.__and__.Tensor", family=_F)(_bitwise(jnp.logical_and, jnp.bitwise_and))
rule("aten.__or__.Tensor", family=_F)(_bitwise(jnp.logical_or, jnp.bitwise_or))


# ------------------------------------------------------------------------ casts and copies


@rule("aten._to_copy.default", family=_F)
def to_copy(x: Any, *, dtype: Any = None, layout: Any = None, device: Any = None,
            pin_memory: Any = None, non_blocking: bool = False, memory_format: Any = None) -> Any:
    return x if dtype is None else x.astype(jax_dtype(dtype))


@rule("aten.to.dtype", family=_F)
def to_dtype(x: Any, dtype: Any, non_blocking: bool = False, copy: bool = False,
             memory_format: Any = None) -> Any:
    return x.astype(jax_dtype(dtype))


@rule("aten.to.dtype_layout", family=_F)
def to_dtype_layout(x: Any, *, dtype: Any = None, layout: Any = None, device: Any = None,
                    pin_memory: Any = None, non_blocking: bool = False, copy: bool = False,
                    memory_format: Any = None) -> Any:
    return x if dtype is None else x.astype(jax_dtype(dtype))


@rule("aten.clone.default", "aten.alias.default", "aten.lift_fresh_copy.default",
      "aten.detach.default", "aten.contiguous.default", "aten.positive.default", family=_F)
def identity(x: Any, *, memory_format: Any = None) -> Any:
    return x


@rule("aten.copy.default", family=_F)
def copy(x: Any, src: Any, non_blocking: bool = False) -> Any:
    return jnp.broadcast_to(jnp.asarray(src, x.dtype), x.shape)


@rule("aten.dropout.default", "aten.feature_dropout.default", "aten.alpha_dropout.default",
      family=_F)
def dropout(x: Any, p: float, train: bool) -> Any:
    if train and p > 0:
        raise ValueError(
            "dropout(train=True) draws random masks, which give no fixed Hessian; call "
            "model.eval() before building the twin"
        )
    return x
