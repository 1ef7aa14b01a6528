"""Attention: ``aten.scaled_dot_product_attention`` in PyTorch's math formulation.

``softmax(q kᵀ · scale + mask) v`` with a causal mask when ``is_causal``, boolean masks as
``-inf`` where False, float masks added, grouped-query attention by repeating key/value
heads, and fully masked rows 0 (torch's ``_safe_softmax``) rather than NaN.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp

from ._ops_linalg import matmul
from ._ops_reduction import safe_softmax
from ._registry import RuleError, rule

_F = "attention"


@rule("aten.scaled_dot_product_attention.default", family=_F)
def scaled_dot_product_attention(q: Any, k: Any, v: Any, attn_mask: Any = None,
                                 dropout_p: float = 0.0, is_causal: bool = False,
                                 scale: Any = None, enable_gqa: bool = False) -> Any:
    if dropout_p > 0:
        raise ValueError(
            f"scaled_dot_product_attention(dropout_p={dropout_p}) draws random masks; call "
            "model.eval() (or pass dropout_p=0 outside training) before building the twin"
        )
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        repeats = q.shape[-3] // k.shape[-3]
        k = jnp.repeat(k, repeats, axis=-3)
        v = jnp.repeat(v, repeats, axis=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = matmul(q, jnp.swapaxes(k, -1, -2)) * scale
    length, source = q.shape[-2], k.shape[-2]
    if is_causal:
        if attn_mask is not None:
            raise RuleError("attn_mask together with is_causal=True")
        causal = jnp.tril(jnp.ones((length, source), dtype=bool))
        scores = jnp.where(causal, scores, -jnp.inf)
    if attn_mask is not None:
        if attn_mask.dtype == jnp.bool_:
            scores = jnp.where(attn_mask, scores, -jnp.inf)
        else:
            scores = scores + attn_mask
    return matmul(safe_softmax(scores, -1), v)
