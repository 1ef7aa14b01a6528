"""Every ATen rule of the twin against torch's own operator: values, gradients and HVPs.

For each case, torch runs ``torch.ops.aten.<op>.<overload>`` and the twin runs its JAX rule on
the same float64 arguments. Values must agree to 1e-12 (relative to their magnitude); for a
differentiable operator, so must the gradient and the Hessian-vector product of the scalar
``s = sum(w * op(x))`` with respect to every floating argument (torch: double backward;
JAX: ``jax.grad`` and forward-over-reverse). ``test_every_rule_has_a_case`` keeps the table
complete, and ``test_operator_docs_are_up_to_date`` the generated docs page.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

from jax_backend.twin._docs import operators_markdown  # noqa: E402
from jax_backend.twin._interpreter import _conform  # noqa: E402
from jax_backend.twin._registry import RULES, lookup  # noqa: E402

pytestmark = pytest.mark.both

RTOL = 1e-12
_GEN = torch.Generator().manual_seed(0)
F64 = torch.float64


def r(*shape):
    return torch.randn(*shape, generator=_GEN, dtype=F64)


def pos(*shape, low=0.5, high=2.0):
    return low + (high - low) * torch.rand(*shape, generator=_GEN, dtype=F64)


def unit(*shape):
    return 0.9 * (2 * torch.rand(*shape, generator=_GEN, dtype=F64) - 1)


def idx(high, *shape):
    return torch.randint(0, high, shape, generator=_GEN)


def mask(*shape):
    return torch.rand(*shape, generator=_GEN) > 0.5


class C:
    """One case: ``op(*args, **kwargs)``; ``grad`` = positions of arguments to differentiate
    (default: every floating tensor argument; ``()`` for a non-differentiable operator)."""

    def __init__(self, name, *args, grad=None, id=None, reference=None, **kwargs):  # noqa: A002
        self.name, self.args, self.kwargs, self.id = name, args, kwargs, id
        self.reference = reference  # a torch function to differentiate instead of the op
        if grad is None:
            grad = tuple(i for i, a in enumerate(args)
                         if isinstance(a, torch.Tensor) and a.is_floating_point())
        self.grad = tuple(grad)

    def label(self):
        return self.name + (f"[{self.id}]" if self.id else "")


S = (3, 4)
_UNARY = {
    "neg": r, "abs": r, "exp": r, "exp2": r, "log": pos, "log2": pos, "log10": pos,
    "log1p": pos, "expm1": r, "sqrt": pos, "rsqrt": pos, "reciprocal": pos, "sin": r,
    "cos": r, "tan": unit, "tanh": r, "sinh": r, "cosh": r, "asin": unit, "acos": unit,
    "atan": r, "asinh": r, "acosh": lambda *s: pos(*s, low=1.2, high=3.0), "atanh": unit,
    "erf": r, "erfc": r, "erfinv": unit, "sigmoid": r, "sgn": r, "frac": r, "square": r,
    "relu": r, "silu": r, "mish": r, "round": r,
    "hardswish": lambda *s: 4 * r(*s),
    "positive": r, "clone": r, "alias": r, "lift_fresh_copy": r, "contiguous": r,
}
_NO_GRAD_UNARY = {"sign": r, "floor": r, "ceil": r, "trunc": r, "isnan": r, "isinf": r,
                  "isfinite": r, "logical_not": mask, "detach": r}

CASES = [C(f"aten.{n}.default", f(*S)) for n, f in _UNARY.items()]
CASES += [C(f"aten.{n}.default", f(*S), grad=()) for n, f in _NO_GRAD_UNARY.items()]
CASES += [
    # arithmetic
    C("aten.add.Tensor", r(*S), r(4), alpha=2.0), C("aten.add.Scalar", r(*S), 1.5),
    C("aten.sub.Tensor", r(*S), r(*S), alpha=0.5), C("aten.sub.Scalar", r(*S), 2.0),
    C("aten.rsub.Scalar", r(*S), 2.0), C("aten.rsub.Tensor", r(*S), r(*S), alpha=3),
    C("aten.mul.Tensor", r(*S), r(3, 1)), C("aten.mul.Scalar", r(*S), -1.5),
    C("aten.div.Tensor", r(*S), pos(*S)), C("aten.div.Scalar", r(*S), 3.0),
    C("aten.div.Tensor", idx(9, *S), idx(3, *S) + 1, id="ints"),
    C("aten.div.Tensor_mode", 5 * r(*S), pos(*S), rounding_mode="floor", grad=()),
    C("aten.div.Tensor_mode", idx(20, *S) - 10, idx(3, *S) + 1, rounding_mode="trunc",
      id="int_trunc"),
    C("aten.div.Tensor_mode", 5 * r(*S), pos(*S), rounding_mode="trunc", grad=(), id="trunc"),
    C("aten.div.Scalar_mode", 5 * r(*S), 2.0, rounding_mode="floor", grad=()),
    C("aten.floor_divide.default", idx(20, *S) - 10, idx(3, *S) + 1),
    C("aten.floor_divide.Scalar", idx(20, *S) - 10, 3),
    C("aten.remainder.Tensor", 5 * r(*S), pos(*S), grad=(1,)),
    C("aten.remainder.Scalar", 5 * r(*S), 1.5),
    C("aten.fmod.Tensor", 5 * r(*S), pos(*S), grad=(1,)), C("aten.fmod.Scalar", 5 * r(*S), 1.5),
    C("aten.pow.Tensor_Scalar", r(*S), 2), C("aten.pow.Tensor_Scalar", r(*S), 3.0, id="3.0"),
    C("aten.pow.Tensor_Scalar", pos(*S), 0.5, id="sqrt"),
    C("aten.pow.Tensor_Scalar", pos(*S), -2, id="neg"),
    C("aten.pow.Tensor_Tensor", pos(*S), r(*S)), C("aten.pow.Scalar", 2.0, r(*S)),
    C("aten.round.decimals", 3 * r(*S), decimals=2, grad=()),
    C("aten.bitwise_not.default", mask(*S)),
    C("aten.bitwise_not.default", idx(9, *S), id="int"),
    C("aten.atan2.default", r(*S), r(*S)), C("aten.xlogy.Tensor", pos(*S), pos(*S)),
    # activations
    C("aten.gelu.default", r(*S)), C("aten.gelu.default", r(*S), approximate="tanh", id="tanh"),
    C("aten.leaky_relu.default", r(*S), 0.2), C("aten.elu.default", r(*S), 0.7, 1.2, 0.9),
    C("aten.softplus.default", 3 * r(*S), 2.0, 4.0),
    C("aten.hardtanh.default", 2 * r(*S), -1.0, 1.5), C("aten.logit.default", pos(*S, low=0.1,
                                                                               high=0.9)),
    C("aten.logit.default", pos(*S, low=0.01, high=0.99), 0.05, id="eps"),
    # clamps, min/max, selection
    C("aten.clamp.default", r(*S), -0.5, 0.5), C("aten.clamp.Tensor", r(*S), -pos(*S), pos(*S)),
    C("aten.clamp_min.default", r(*S), 0.1), C("aten.clamp_min.Tensor", r(*S), r(*S)),
    C("aten.clamp_max.default", r(*S), 0.1), C("aten.clamp_max.Tensor", r(*S), r(*S)),
    C("aten.maximum.default", r(*S), r(*S)), C("aten.minimum.default", r(*S), r(*S)),
    C("aten.where.self", mask(*S), r(*S), r(*S)),
    C("aten.where.ScalarSelf", mask(*S), 1.5, r(*S)),
    C("aten.where.ScalarOther", mask(*S), r(*S), -2.0),
    C("aten.where.Scalar", mask(*S), 1.0, -2.0),
    C("aten.masked_fill.Scalar", r(*S), mask(*S), -3.0),
    C("aten.masked_fill.Tensor", r(*S), mask(*S), torch.tensor(2.5, dtype=F64), grad=(0,)),
    C("aten.nan_to_num.default", torch.tensor([1.0, float("nan"), float("inf"), -float("inf")],
                                              dtype=F64), 0.5, 10.0, -10.0),
    C("aten.lerp.Scalar", r(*S), r(*S), 0.3), C("aten.lerp.Tensor", r(*S), r(*S), r(*S)),
    C("aten.addcmul.default", r(*S), r(*S), r(*S), value=0.5),
    C("aten.addcdiv.default", r(*S), r(*S), pos(*S), value=0.5),
    # casts and copies
    C("aten._to_copy.default", r(*S), dtype=torch.float32, grad=()),
    C("aten._to_copy.default", r(*S), id="same"),
    C("aten.to.dtype", 3 * r(*S), torch.int64), C("aten.to.dtype_layout", r(*S), dtype=F64),
    # aten.copy has no autograd formula: derivatives against src broadcast to self's shape
    C("aten.copy.default", r(*S), r(4), grad=(1,), reference=lambda x, src: src.expand(x.shape)),
    # torch's hardsigmoid_backward multiplies by 1/6 rounded to float32 (a 7e-9 error in
    # float64): the derivatives are checked against torch's exact formula clamp(x+3, 0, 6)/6
    C("aten.hardsigmoid.default", 4 * r(*S),
      reference=lambda x: torch.clamp(x + 3.0, 0.0, 6.0) / 6.0),
    C("aten.dropout.default", r(*S), 0.5, False), C("aten.feature_dropout.default", r(*S), 0.5,
                                                    False),
    C("aten.alpha_dropout.default", r(*S), 0.5, False),
]
for _n in ("eq", "ne", "lt", "le", "gt", "ge"):
    _x = r(*S)
    CASES += [C(f"aten.{_n}.Tensor", _x, torch.where(mask(*S), _x, r(*S))),
              C(f"aten.{_n}.Scalar", _x, 0.1)]
for _n in ("logical_and", "logical_or", "logical_xor"):
    CASES.append(C(f"aten.{_n}.default", mask(*S), mask(*S)))
for _n in ("bitwise_and", "bitwise_or", "bitwise_xor"):
    CASES += [C(f"aten.{_n}.Tensor", mask(*S), mask(*S)),
              C(f"aten.{_n}.Tensor", idx(9, *S), idx(9, *S), id="int"),
              C(f"aten.{_n}.Scalar", idx(9, *S), 5)]
CASES += [C("aten.__and__.Tensor", mask(*S), mask(*S)), C("aten.__or__.Tensor", mask(*S), mask(*S))]

X3 = (2, 3, 4)
CASES += [  # reductions
    C("aten.sum.dim_IntList", r(*X3), [0, 2]), C("aten.sum.dim_IntList", r(*X3), [1], True,
                                                 id="keepdim"),
    C("aten.sum.dim_IntList", mask(*X3), [1], id="bool"), C("aten.sum.default", r(*X3)),
    C("aten.mean.dim", r(*X3), [-1], True), C("aten.mean.default", r(*X3)),
    C("aten.prod.default", pos(*S)), C("aten.prod.dim_int", r(*X3), 1),
    C("aten.amax.default", r(*X3), [1, 2]), C("aten.amin.default", r(*X3), [0]),
    C("aten.amax.default", torch.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 0.0]], dtype=F64), [1],
      id="ties"),
    C("aten.max.default", r(*X3)), C("aten.min.default", r(*X3)),
    C("aten.max.dim", r(*X3), 1), C("aten.min.dim", r(*X3), 2, True),
    C("aten.argmax.default", r(*X3), 1), C("aten.argmax.default", r(*X3), id="flat"),
    C("aten.argmin.default", r(*X3), 2, True),
    C("aten.var.correction", r(*X3), [1]), C("aten.var.correction", r(*X3), [0, 2],
                                                  correction=0, keepdim=True, id="biased"),
    C("aten.std.correction", r(*X3), [2]), C("aten.var_mean.correction", r(*X3), [1]),
    C("aten.any.default", mask(*X3)), C("aten.any.dim", mask(*X3), 1),
    C("aten.any.dims", mask(*X3), [0, 2]), C("aten.all.default", mask(*X3)),
    C("aten.all.dim", mask(*X3), 1), C("aten.all.dims", mask(*X3), [1, 2], True),
    C("aten.cumsum.default", r(*X3), 1), C("aten.cumsum.default", mask(*X3), 2, id="bool"),
    C("aten.cumprod.default", r(*X3), 2), C("aten.logsumexp.default", r(*X3), [1]),
    C("aten.linalg_vector_norm.default", r(*X3)),
    C("aten.linalg_vector_norm.default", r(*X3), 1, [1], id="l1"),
    C("aten._softmax.default", r(*X3), 1, False), C("aten._log_softmax.default", r(*X3), 2,
                                                     False),
    C("aten.softmax.int", r(*X3), -1), C("aten.log_softmax.int", r(*X3), 0),
    C("aten._safe_softmax.default", torch.where(mask(*X3), r(*X3), -torch.inf), 2),
]
CASES += [  # linear algebra
    C("aten.mm.default", r(3, 4), r(4, 2)), C("aten.bmm.default", r(2, 3, 4), r(2, 4, 2)),
    C("aten.matmul.default", r(2, 3, 4), r(4, 5)), C("aten.mv.default", r(3, 4), r(4)),
    C("aten.dot.default", r(4), r(4)),
    C("aten.addmm.default", r(2), r(3, 4), r(4, 2), beta=0.5, alpha=2.0),
    C("aten.baddbmm.default", r(2, 3, 2), r(2, 3, 4), r(2, 4, 2)),
    C("aten.addmv.default", r(3), r(3, 4), r(4)),
    C("aten.linear.default", r(2, 3, 4), r(5, 4), r(5)), C("aten.outer.default", r(3), r(4)),
    C("aten.einsum.default", "bij,jk->bik", [r(2, 3, 4), r(4, 2)], grad=()),
]
CASES += [  # convolution and pooling
    C("aten.convolution.default", r(2, 4, 7, 6), r(6, 2, 3, 2), r(6), [2, 1], [1, 0], [1, 2],
      False, [0, 0], 2),
    C("aten.convolution.default", r(2, 3, 9), r(4, 3, 3), None, [1], [2], [2], False, [0], 1,
      id="1d"),
    C("aten.convolution.default", r(1, 2, 4, 4, 3), r(2, 2, 2, 2, 2), None, [1, 1, 1],
      [0, 1, 0], [1, 1, 1], False, [0, 0, 0], 1, id="3d"),
    C("aten.convolution.default", r(2, 4, 4, 3), r(4, 3, 3, 2), r(6), [2, 1], [1, 0], [1, 1],
      True, [1, 0], 2, id="transposed"),
    C("aten.max_pool2d_with_indices.default", r(2, 3, 7, 7), [3, 3], [2, 2], [1, 1], [1, 1],
      True),
    C("aten.max_pool3d_with_indices.default", r(1, 2, 4, 4, 4), [2, 2, 2], [2, 2, 2]),
    C("aten.max_pool1d.default", r(2, 3, 9), [3], [2], [1]),
    C("aten.max_pool2d.default", r(2, 3, 6, 6), [2, 2], [], [0, 0], [2, 2]),
    C("aten.max_pool3d.default", r(1, 2, 4, 4, 4), [2, 2, 2]),
    C("aten.avg_pool1d.default", r(2, 3, 9), [3], [2], [1], False, False),
    C("aten.avg_pool2d.default", r(2, 3, 7, 7), [3, 3], [2, 2], [1, 1], True, True),
    C("aten.avg_pool2d.default", r(2, 3, 7, 7), [3, 3], [2, 2], [1, 1], True, False,
      id="exclude_pad"),
    C("aten.avg_pool2d.default", r(2, 3, 6, 6), [2, 2], [], [0, 0], False, True, 3,
      id="divisor"),
    C("aten.avg_pool3d.default", r(1, 2, 4, 4, 4), [2, 2, 2]),
    C("aten.adaptive_avg_pool1d.default", r(2, 3, 7), [3]),
    C("aten._adaptive_avg_pool2d.default", r(2, 3, 7, 6), [3, 2]),
    C("aten.adaptive_avg_pool2d.default", r(2, 3, 4, 4), [2, 2]),
    C("aten._adaptive_avg_pool3d.default", r(1, 2, 4, 5, 3), [2, 3, 1]),
    C("aten.adaptive_avg_pool3d.default", r(1, 2, 4, 4, 4), [2, 2, 2]),
]
_BN = (r(4, 3, 5, 2), 1 + 0.2 * r(3), 0.1 * r(3), 0.3 * r(3), pos(3))
CASES += [  # normalisation
    C("aten._native_batch_norm_legit_no_training.default", *_BN, 0.1, 1e-5, grad=(0, 1, 2)),
    C("aten._native_batch_norm_legit.no_stats", r(4, 3, 5), pos(3), r(3), True, 0.1, 1e-5),
    C("aten._native_batch_norm_legit.default", *_BN, False, 0.1, 1e-5, grad=(0, 1, 2)),
    C("aten.native_batch_norm.default", *_BN, False, 0.1, 1e-5, grad=(0, 1, 2)),
    C("aten.batch_norm.default", *_BN, False, 0.1, 1e-5, True, grad=(0, 1, 2)),
    C("aten.native_layer_norm.default", r(2, 3, 4), [3, 4], pos(3, 4), r(3, 4), 1e-5),
    C("aten.layer_norm.default", r(2, 3, 4), [4], pos(4), r(4)),
    C("aten.native_group_norm.default", r(2, 4, 3, 2), pos(4), r(4), 2, 4, 6, 2, 1e-5),
    C("aten.group_norm.default", r(2, 6, 5), 3, pos(6), r(6)),
    C("aten.rms_norm.default", r(2, 3, 4), [4], pos(4), 1e-6),
]
CASES += [  # indexing and views
    C("aten.view.default", r(2, 3, 4), [6, -1]), C("aten._unsafe_view.default", r(2, 3, 4), [4, 6]),
    C("aten.reshape.default", r(2, 3, 4), [-1]), C("aten.view_copy.default", r(2, 3, 4), [3, 8]),
    C("aten.permute.default", r(2, 3, 4), [2, 0, 1]),
    C("aten.permute_copy.default", r(2, 3, 4), [1, 2, 0]),
    C("aten.transpose.int", r(2, 3, 4), 0, -1), C("aten.t.default", r(3, 4)),
    C("aten.expand.default", r(3, 1), [2, 3, 4]), C("aten.expand_copy.default", r(1, 4), [3, -1]),
    C("aten.unsqueeze.default", r(3, 4), -1), C("aten.unsqueeze_copy.default", r(3, 4), 1),
    C("aten.squeeze.dims", r(3, 1, 4, 1), [1, 3]), C("aten.squeeze.dim", r(3, 1, 4), 1),
    C("aten.squeeze_copy.dims", r(1, 4, 1), [0]), C("aten.squeeze.default", r(3, 1, 4, 1)),
    C("aten.slice.Tensor", r(5, 6), 1, 1, 2**63 - 1, 2),
    C("aten.slice.Tensor", r(5, 6), 0, -3, None, id="negative"),
    C("aten.slice_copy.Tensor", r(5, 6), 1, 0, 4),
    C("aten.select.int", r(3, 4, 5), 1, -1), C("aten.select_copy.int", r(3, 4), 0, 2),
    C("aten.narrow.default", r(5, 6), 1, 2, 3),
    C("aten.index.Tensor", r(5, 6, 7), [None, idx(6, 2, 3), idx(7, 2, 3)]),
    C("aten.index.Tensor", r(5, 6, 7), [idx(5, 4), None, idx(7, 4)], id="split"),
    C("aten.index_put.default", r(5, 6), [torch.tensor([4, 0, 2])], r(3, 6)),
    C("aten.index_put.default", r(5, 6), [torch.tensor([0, 2, 0])], r(3, 6), True,
      id="accumulate"),
    C("aten.index_select.default", r(5, 6), 1, idx(6, 4)),
    C("aten.gather.default", r(4, 5), 1, idx(5, 3, 2)),
    C("aten.scatter.src", r(4, 5), 1, torch.tensor([[0, 1], [2, 3], [4, 0]]), r(3, 2)),
    C("aten.scatter.value", r(4, 5), 0, torch.tensor([[0, 1, 2]]), 2.0),
    C("aten.scatter_add.default", r(4, 5), 0, idx(4, 3, 5), r(3, 5)),
    C("aten.slice_scatter.default", r(5, 6), r(5, 2), 1, 1, 5, 2),
    C("aten.select_scatter.default", r(5, 6), r(6), 0, 3),
    C("aten.cat.default", [r(2, 3), r(4, 3)], grad=()),
    C("aten.cat.default", [r(2, 3), r(2, 1)], -1, grad=(), id="dim"),
    C("aten.stack.default", [r(2, 3), r(2, 3)], 1, grad=()),
    C("aten.split_with_sizes.default", r(5, 6), [2, 4], 1),
    C("aten.split_with_sizes_copy.default", r(5, 6), [3, 2]),
    C("aten.split.Tensor", r(5, 6), 2), C("aten.split_copy.Tensor", r(5, 6), 4, 1),
    C("aten.unbind.int", r(3, 4), 1), C("aten.flip.default", r(3, 4, 2), [0, 2]),
    C("aten.roll.default", r(3, 4), [1, -1], [0, 1]), C("aten.roll.default", r(3, 4), [5],
                                                        id="flat"),
    C("aten.repeat.default", r(2, 3), [2, 1, 2]),
    C("aten.constant_pad_nd.default", r(2, 3, 4), [1, 2, 0, -1], 0.5),
    C("aten.reflection_pad1d.default", r(2, 3, 5), [2, 1]),
    C("aten.reflection_pad2d.default", r(2, 3, 4, 5), [1, 1, 2, 0]),
    C("aten.reflection_pad3d.default", r(1, 2, 3, 3, 3), [1, 0, 1, 1, 0, 1]),
    C("aten.replication_pad1d.default", r(2, 3, 5), [2, 1]),
    C("aten.replication_pad2d.default", r(2, 3, 4, 5), [1, 1, 2, 0]),
    C("aten.replication_pad3d.default", r(1, 2, 3, 3, 3), [1, 0, 1, 1, 0, 1]),
    C("aten.embedding.default", r(7, 3), idx(7, 2, 5)),
    C("aten.embedding.default", r(7, 3), torch.tensor([[0, 1, 0], [2, 0, 3]]), 0, id="padding"),
    # bags of 3, 0 (empty), 2 and 3 indices; index 0 is padding where padding_idx=0
    C("aten._embedding_bag.default", r(7, 3), torch.tensor([1, 2, 4, 5, 0, 3, 2, 6]),
      torch.tensor([0, 3, 3, 5]), False, 0, id="sum"),
    C("aten._embedding_bag.default", r(7, 3), torch.tensor([1, 2, 4, 5, 0, 3, 2, 6]),
      torch.tensor([0, 3, 3, 5]), False, 1, False, None, False, 0, id="mean_padding"),
    C("aten._embedding_bag.default", r(7, 3), torch.tensor([1, 2, 4, 5, 0, 3, 2, 6]),
      torch.tensor([0, 3, 3, 5]), False, 2, id="max"),
    C("aten._embedding_bag.default", r(7, 3), torch.tensor([1, 2, 4, 5, 0, 3, 2, 6]),
      torch.tensor([0, 3, 3, 5, 8]), False, 0, False, r(8), True, id="weighted_last_offset"),
    C("aten._embedding_bag_forward_only.default", r(7, 3), torch.tensor([1, 2, 4, 5, 3]),
      torch.tensor([0, 2]), False, 1, grad=()),  # torch: no autograd through forward_only
    C("aten.tril.default", r(4, 5), -1), C("aten.triu.default", r(2, 4, 5), 1),
    C("aten.diagonal.default", r(3, 4, 5), 1, 1, 2),
    C("aten.diagonal_copy.default", r(4, 5)),
    C("aten.unfold.default", r(3, 8), 1, 3, 2),
    C("aten._assert_tensor_metadata.default", r(3), grad=()),
    C("aten._assert_scalar.default", True, "ok", grad=()),
    C("aten.sym_constrain_range_for_size.default", 3, grad=()),
]
CASES += [  # attention
    C("aten.scaled_dot_product_attention.default", r(2, 2, 4, 3), r(2, 2, 5, 3), r(2, 2, 5, 3)),
    C("aten.scaled_dot_product_attention.default", r(2, 2, 4, 3), r(2, 2, 4, 3), r(2, 2, 4, 3),
      is_causal=True, id="causal"),
    C("aten.scaled_dot_product_attention.default", r(2, 2, 4, 3), r(2, 2, 5, 3), r(2, 2, 5, 3),
      torch.tensor([True, True, False, True, False]), scale=0.7, id="bool_mask"),
    C("aten.scaled_dot_product_attention.default", r(2, 1, 4, 3), r(2, 1, 5, 3),
      r(2, 1, 5, 3), 0.3 * r(4, 5), id="float_mask"),
    C("aten.scaled_dot_product_attention.default", r(1, 4, 3, 2), r(1, 2, 3, 2), r(1, 2, 3, 2),
      enable_gqa=True, id="gqa"),
]
CASES += [  # creation
    C("aten.full.default", [2, 3], 1.5, dtype=F64), C("aten.full.default", [2, 3], 7, id="int"),
    C("aten.full_like.default", r(2, 3), -2.0), C("aten.new_full.default", r(2), [3, 1], 4.0),
    C("aten.zeros.default", [2, 3], dtype=F64), C("aten.ones.default", [4], dtype=torch.int64),
    C("aten.zeros_like.default", r(2, 3)), C("aten.ones_like.default", idx(3, 2, 2)),
    C("aten.new_zeros.default", r(2), [3]), C("aten.new_ones.default", idx(3, 2), [2, 2]),
    C("aten.scalar_tensor.default", 2.5, dtype=F64),
    C("aten.arange.default", 5), C("aten.arange.start", 2, 7, dtype=F64),
    C("aten.arange.start_step", 0.5, 3.0, 0.5, dtype=F64), C("aten.eye.default", 3, dtype=F64),
    C("aten.linspace.default", 0.0, 1.0, 5, dtype=F64),
]
# empty tensors hold arbitrary values: their shapes and dtypes are checked, not the values
SHAPE_ONLY = [
    C("aten.empty.memory_format", [2, 3], dtype=F64),
    C("aten.empty_like.default", r(2, 3)), C("aten.new_empty.default", r(2), [3, 2]),
    C("aten.empty_strided.default", [2, 3], [3, 1], dtype=F64),
]


def _torch_op(name):
    _, op, overload = name.split(".")
    return getattr(getattr(torch.ops.aten, op), overload)


def _to_jax(x):
    if isinstance(x, torch.Tensor):
        return jnp.asarray(x.detach().numpy())
    if isinstance(x, (list, tuple)):
        return type(x)(_to_jax(v) for v in x)
    return x


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.size == 0:
        return 0.0
    finite = np.isfinite(a)
    np.testing.assert_array_equal(finite, np.isfinite(b))
    np.testing.assert_array_equal(a[~finite], b[~finite])
    a, b = a[finite], b[finite]
    scale = max(float(np.max(np.abs(a))), 1.0) if a.size else 1.0
    return float(np.max(np.abs(a - b))) / scale if a.size else 0.0


def _jax_fn(case):
    rule = lookup(case.name)
    assert rule is not None, f"no rule for {case.name}"
    return lambda *args: rule.fn(*args, **{k: _to_jax(v) if isinstance(v, torch.Tensor) else v
                                           for k, v in case.kwargs.items()})


def _torch_call(case, *args):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # the fused kernels have no double backward
        return _torch_op(case.name)(*args, **case.kwargs)


def _values(case):
    expected = _torch_call(case, *case.args)
    got = _jax_fn(case)(*_to_jax(list(case.args)))
    return expected, _conform(got, expected, case.name)


def _arrays_only(out):
    if isinstance(out, (tuple, list)):
        return [o if hasattr(o, "shape") and o.shape is not None else None for o in out]
    return out


def _torch_derivatives(case, weight, probes):
    """Gradient and HVP of ``sum(weight * op)`` by torch autograd (HVP None where torch has
    no double backward, or None for both when the result does not depend on the inputs)."""
    leaves = [case.args[i].detach().clone().requires_grad_(True) for i in case.grad]
    args = list(case.args)
    for i, x in zip(case.grad, leaves):
        args[i] = x
    out = _first(case.reference(*args) if case.reference else _torch_call(case, *args))
    if not out.requires_grad:
        return None, None  # an integer or boolean result, or creation from a shape only
    grads = torch.autograd.grad((weight * out).sum(), leaves, create_graph=True,
                                allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
    inner = sum((g * p).sum() for g, p in zip(grads, probes))
    try:
        hvps = (torch.autograd.grad(inner, leaves, allow_unused=True)
                if inner.requires_grad else [None] * len(leaves))
    except RuntimeError as exc:  # e.g. hardsigmoid_backward, copy: no double backward
        assert "not implemented" in str(exc)
        hvps = None
    else:
        hvps = [torch.zeros_like(x) if h is None else h for h, x in zip(hvps, leaves)]
    return grads, hvps


def _jax_everything(case, weight, probes):
    """Values, gradient and HVP of the rule, as one compiled program (fast to build)."""
    fn = _jax_fn(case)
    fixed = _to_jax(list(case.args))

    def call(xs):
        args = list(fixed)
        for i, x in zip(case.grad, xs):
            args[i] = x
        return fn(*args)

    def everything(xs, ps):
        value = _arrays_only(call(xs))
        if weight is None:
            return value, None, None
        w = jnp.asarray(weight.numpy())

        def scalar(ys):
            return jnp.sum(w * _first(call(ys)))

        grads, hvps = jax.jvp(jax.grad(scalar), (xs,), (ps,))
        return value, grads, hvps

    xs = [fixed[i] for i in case.grad]
    ps = [jnp.asarray(p.numpy()) for p in probes]
    compiled = jax.jit(everything).lower(xs, ps).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    return compiled(xs, ps)


@pytest.mark.parametrize("case", CASES, ids=[c.label() for c in CASES])
def test_rule_matches_torch_values_gradient_and_hvp(case):
    expected = _torch_call(case, *case.args)
    out0 = _first(expected)
    weight = probes = None
    if case.grad:
        weight = torch.randn(out0.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
        probes = [torch.randn(case.args[i].shape, dtype=F64,
                              generator=torch.Generator().manual_seed(2 + i)) for i in case.grad]
    t_grads, t_hvps = _torch_derivatives(case, weight, probes) if case.grad else (None, None)
    if t_grads is None:
        weight = None
    got, j_grads, j_hvps = _jax_everything(case, weight, probes or [])
    got = _conform(got, expected, case.name)
    flat_e = expected if isinstance(expected, (tuple, list)) else [expected]
    flat_g = got if isinstance(got, (tuple, list)) else [got]
    for e, g in zip(flat_e, flat_g):
        if g is None or (e.numel() == 0 and "batch_norm" in case.name):
            continue  # max-pool indices (backward only), batch norm's empty save_mean
        assert np.dtype(g.dtype) == np.dtype(str(e.dtype).replace("torch.", "")), case.name
        assert _rel(e.numpy(), g) <= RTOL, case.label()
    if t_grads is None:
        return
    for t_g, j_g in zip(t_grads, j_grads):
        assert _rel(t_g.detach().numpy(force=True), j_g) <= RTOL, f"{case.label()}: gradient"
    if t_hvps is None:
        return
    for t_h, j_h in zip(t_hvps, j_hvps):
        assert _rel(t_h.detach().numpy(force=True), j_h) <= RTOL, f"{case.label()}: HVP"


@pytest.mark.parametrize("case", SHAPE_ONLY, ids=[c.label() for c in SHAPE_ONLY])
def test_empty_creation_has_torch_shape_and_dtype(case):
    expected, got = _values(case)
    assert tuple(got.shape) == tuple(expected.shape) and got.dtype == jnp.float64


def test_every_rule_has_a_case():
    lookup("")
    covered = {c.name for c in CASES + SHAPE_ONLY}
    assert sorted(set(RULES) - covered) == []
    assert sorted(covered - set(RULES)) == []


def test_operator_docs_are_up_to_date():
    page = Path(__file__).resolve().parents[3] / "docs" / "twin-operators.md"
    assert page.read_text() == operators_markdown(), (
        "docs/twin-operators.md is stale: run "
        "`python -m jax_backend.twin._docs > docs/twin-operators.md`"
    )
