"""Linear-algebra ATen rules: matrix products and ``linear`` (torch weight layout ``(out, in)``).

Products run at ``lax.Precision.HIGHEST`` so float32 on accelerators is true float32.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from ._common import HIGHEST
from ._registry import rule

_F = "linalg"


def matmul(a: Any, b: Any) -> Any:
    return jnp.matmul(a, b, precision=HIGHEST)


@rule("aten.mm.default", "aten.bmm.default", "aten.matmul.default", "aten.mv.default",
      "aten.dot.default", family=_F)
def mm(a: Any, b: Any) -> Any:
    return matmul(a, b)


@rule("aten.addmm.default", "aten.baddbmm.default", "aten.addmv.default", family=_F)
def addmm(bias: Any, a: Any, b: Any, *, beta: Any = 1, alpha: Any = 1) -> Any:
    product = matmul(a, b)
    if alpha != 1:
        product = product * alpha
    if beta == 0:  # torch ignores the input (even NaN) when beta is 0
        return product
    return product + (bias if beta == 1 else beta * bias)


@rule("aten.linear.default", family=_F)
def linear(x: Any, weight: Any, bias: Any = None) -> Any:
    y = matmul(x, weight.T)
    return y if bias is None else y + bias


@rule("aten.outer.default", family=_F)
def outer(a: Any, b: Any) -> Any:
    return jnp.outer(a, b)


@rule("aten.einsum.default", family=_F)
def einsum(equation: str, tensors: Any, *, path: Any = None) -> Any:
    return jnp.einsum(equation, *tensors, precision=HIGHEST)
