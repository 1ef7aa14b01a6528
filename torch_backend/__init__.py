"""PyTorch backend of dualhess: Hessian, GGN and Fisher operators for any ``nn.Module``.

Everything that imports torch lives here; :mod:`dualhess` itself never imports torch.

Examples
--------
>>> import torch, dualhess
>>> import torch_backend as tb
>>> from torch_backend.examples import load_digits, make_mlp
>>> X, y = load_digits(n=64, flat=True)
>>> op = tb.hessian(make_mlp(), torch.nn.CrossEntropyLoss(), (X, y), method="func")
>>> op.matvec(torch.ones(op.n, dtype=torch.float64)).shape
torch.Size([1210])
"""

from __future__ import annotations

from ._backpack import exact_diagonal, exact_trace
from ._curvature import FisherOperator, GGNOperator, fisher, ggn
from ._data import differentiable_attention, label_count
from ._distributed import is_main_process
from ._hessian import HessianOperator, TorchCurvatureOperator, hessian
from ._input import InputHessianOperator, input_hessian
from .monitor import HessianMonitor

__all__ = [
    "HessianMonitor",
    "hessian",
    "ggn",
    "fisher",
    "exact_diagonal",
    "exact_trace",
    "HessianOperator",
    "GGNOperator",
    "FisherOperator",
    "TorchCurvatureOperator",
    "input_hessian",
    "InputHessianOperator",
    "is_main_process",
    "differentiable_attention",
    "label_count",
]
