"""The JAX twin of a PyTorch model, built from ``torch.export``.

The model is exported *together with its loss* (:mod:`._export`), decomposed to core ATen,
and interpreted with ``jax.numpy`` / ``jax.lax`` (:mod:`._interpreter`) as a pure function
``f(params, inputs, targets)``, one ATen rule per operator (``_ops_<family>.py``, one table in
:mod:`._registry`). Parameters keep their torch names and layouts (:mod:`._alignment`), so the
alignment with the torch operator is by name.

Examples
--------
>>> import torch
>>> from jax_backend.twin import from_torch
>>> twin = from_torch(torch.nn.Linear(3, 2), torch.zeros(4, 3))
>>> twin(torch.ones(4, 3)).shape
(4, 2)
"""

from __future__ import annotations

from dualhess._errors import UnsupportedOpError

from ._alignment import ParamDict
from ._docs import supported_operators
from ._losses import batch_from_torch, loss_from_torch
from ._twin import Twin, from_torch

__all__ = [
    "from_torch",
    "Twin",
    "ParamDict",
    "UnsupportedOpError",
    "loss_from_torch",
    "batch_from_torch",
    "supported_operators",
]
