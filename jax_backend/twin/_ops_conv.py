"""Convolution and pooling ATen rules; activations stay in torch's layout (N, C, *spatial)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax

from ._common import HIGHEST, ntuple
from ._registry import RuleError, rule

_F = "conv"

_LETTERS = {1: "W", 2: "HW", 3: "DHW"}


@rule("aten.convolution.default", family=_F)
def convolution(x: Any, weight: Any, bias: Any, stride: Any, padding: Any, dilation: Any,
                transposed: bool, output_padding: Any, groups: int) -> Any:
    nd = weight.ndim - 2
    if nd not in _LETTERS:
        raise RuleError(f"{nd}-D convolutions")
    unbatched = x.ndim == nd + 1
    if unbatched:
        x = x[None]
    stride, dilation = ntuple(stride, nd), ntuple(dilation, nd)
    pads = ntuple(padding, nd)
    spec = "NC" + _LETTERS[nd]
    kernel_spec = "OI" + _LETTERS[nd]
    if not transposed:
        y = lax.conv_general_dilated(
            x, weight, window_strides=stride, padding=[(p, p) for p in pads],
            rhs_dilation=dilation, dimension_numbers=(spec, kernel_spec, spec),
            feature_group_count=int(groups), precision=HIGHEST,
        )
    else:
        # a transposed convolution is the gradient of a convolution: dilate the input by the
        # stride, pad by d(k-1)-p (plus output_padding on the high side), flip the kernel and
        # swap its in/out channels within each group.
        out_pad = ntuple(output_padding, nd)
        cin, cout_g = weight.shape[0], weight.shape[1]
        g = int(groups)
        kernel = weight.reshape((g, cin // g, cout_g) + weight.shape[2:])
        kernel = jnp.swapaxes(kernel, 1, 2).reshape((g * cout_g, cin // g) + weight.shape[2:])
        kernel = jnp.flip(kernel, axis=tuple(range(2, 2 + nd)))
        full = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
        y = lax.conv_general_dilated(
            x, kernel, window_strides=(1,) * nd,
            padding=[(f - p, f - p + op) for f, p, op in zip(full, pads, out_pad)],
            lhs_dilation=stride, rhs_dilation=dilation,
            dimension_numbers=(spec, kernel_spec, spec), feature_group_count=g,
            precision=HIGHEST,
        )
    if bias is not None:
        y = y + bias.reshape((1, -1) + (1,) * nd)
    return y[0] if unbatched else y


def _batched(x: Any, nd: int) -> tuple[Any, bool]:
    if x.ndim == nd + 1:
        return x[None], True
    if x.ndim != nd + 2:
        raise RuleError(f"expected a {nd + 2}-D input (N, C, *spatial), got shape {x.shape}")
    return x, False


def _pool_geometry(sizes: Any, kernel: Any, stride: Any, padding: Any, dilation: Any,
                   ceil_mode: bool) -> list[tuple[int, int]]:
    """(low, high) padding per spatial dim giving torch's output size (incl. ceil_mode)."""
    pads = []
    for size, k, s, p, d in zip(sizes, kernel, stride, padding, dilation):
        span = size + 2 * p - d * (k - 1) - 1
        out = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (out - 1) * s >= size + p:  # last window must start inside
            out -= 1
        pads.append((p, max((out - 1) * s + d * (k - 1) + 1 - size - p, 0)))
    return pads


def _max_pool(nd: int) -> Any:
    def fn(x: Any, kernel_size: Any, stride: Any = (), padding: Any = 0, dilation: Any = 1,
           ceil_mode: bool = False) -> Any:
        x, unbatched = _batched(x, nd)
        k = ntuple(kernel_size, nd)
        s = ntuple(stride, nd) if stride not in (None, [], ()) else k
        d = ntuple(dilation, nd)
        pads = _pool_geometry(x.shape[2:], k, s, ntuple(padding, nd), d, ceil_mode)
        # a Python scalar init lets JAX recognise the max monoid (and differentiate it)
        init = -np.inf if jnp.issubdtype(x.dtype, jnp.floating) else int(jnp.iinfo(x.dtype).min)
        if all(dd == 1 for dd in d):
            y = lax.reduce_window(x, init, lax.max, (1, 1, *k), (1, 1, *s),
                                  [(0, 0), (0, 0), *pads])
        else:  # JAX has no derivative of a dilated reduce_window: max over strided slices
            padded = jnp.pad(x, [(0, 0), (0, 0), *pads], constant_values=init)
            out = [(size + lo + hi - dd * (kk - 1) - 1) // ss + 1 for size, (lo, hi), kk, ss, dd
                   in zip(x.shape[2:], pads, k, s, d)]
            windows = []
            for offset in np.ndindex(*k):
                index = tuple(slice(o * dd, o * dd + (n - 1) * ss + 1, ss)
                              for o, dd, n, ss in zip(offset, d, out, s))
                windows.append(padded[(slice(None), slice(None), *index)])
            y = jnp.max(jnp.stack(windows), axis=0)
        return y[0] if unbatched else y

    return fn


class _NoIndices:
    """Placeholder for max-pool indices: only backward formulas use them."""

    shape = dtype = None


for _nd in (1, 2, 3):
    _pool = _max_pool(_nd)
    rule(f"aten.max_pool{_nd}d.default", family=_F)(_pool)
    if _nd > 1:
        rule(f"aten.max_pool{_nd}d_with_indices.default", family=_F)(
            lambda *args, _pool=_pool, **kwargs: (_pool(*args, **kwargs), _NoIndices())
        )


def _avg_pool(nd: int) -> Any:
    def fn(x: Any, kernel_size: Any, stride: Any = (), padding: Any = 0, ceil_mode: bool = False,
           count_include_pad: bool = True, divisor_override: Any = None) -> Any:
        x, unbatched = _batched(x, nd)
        k = ntuple(kernel_size, nd)
        s = ntuple(stride, nd) if stride not in (None, [], ()) else k
        p = ntuple(padding, nd)
        pads = [(0, 0), (0, 0), *_pool_geometry(x.shape[2:], k, s, p, (1,) * nd, ceil_mode)]
        total = lax.reduce_window(x, 0.0, lax.add, (1, 1, *k), (1, 1, *s), pads)
        if divisor_override:
            y = total / divisor_override
        else:
            # torch divides by the window's overlap with the input, plus the declared padding
            # when count_include_pad (never the extra ceil_mode padding)
            ones = np.ones((1, 1, *x.shape[2:]), dtype=np.float64)
            if count_include_pad:
                ones = np.pad(ones, [(0, 0), (0, 0), *[(q, q) for q in p]], constant_values=1.0)
                pads_c = [(lo - q, hi - q) for (lo, hi), q in zip(pads[2:], p)]
            else:
                pads_c = pads[2:]
            counts = lax.reduce_window(jnp.asarray(ones), 0.0, lax.add, (1, 1, *k),
                                       (1, 1, *s), [(0, 0), (0, 0), *pads_c])
            y = total / counts.astype(x.dtype)
        return y[0] if unbatched else y

    return fn


for _nd in (1, 2, 3):
    rule(f"aten.avg_pool{_nd}d.default", family=_F)(_avg_pool(_nd))


def _adaptive_matrix(size_in: int, size_out: int) -> np.ndarray:
    """torch's adaptive-pool bins ``[floor(i L / o), ceil((i + 1) L / o))`` as a matrix."""
    mat = np.zeros((size_out, size_in))
    for i in range(size_out):
        start = (i * size_in) // size_out
        stop = -(-((i + 1) * size_in) // size_out)
        mat[i, start:stop] = 1.0 / (stop - start)
    return mat


def _adaptive_avg_pool(nd: int) -> Any:
    def fn(x: Any, output_size: Any) -> Any:
        x, unbatched = _batched(x, nd)
        sizes = ntuple(output_size, nd)
        y = x
        for axis, out in enumerate(sizes):
            dim = 2 + axis
            size_in = y.shape[dim]
            if out == size_in:
                continue
            if size_in % out == 0:
                shape = y.shape[:dim] + (out, size_in // out) + y.shape[dim + 1:]
                y = jnp.mean(y.reshape(shape), axis=dim + 1)
            else:
                mat = jnp.asarray(_adaptive_matrix(size_in, out), y.dtype)
                y = jnp.moveaxis(jnp.tensordot(y, mat, axes=([dim], [1]), precision=HIGHEST),
                                 -1, dim)
        return y[0] if unbatched else y

    return fn


rule("aten.adaptive_avg_pool1d.default", family=_F)(_adaptive_avg_pool(1))
rule("aten._adaptive_avg_pool2d.default", "aten.adaptive_avg_pool2d.default",
     family=_F)(_adaptive_avg_pool(2))
rule("aten._adaptive_avg_pool3d.default", "aten.adaptive_avg_pool3d.default",
     family=_F)(_adaptive_avg_pool(3))


