"""Parameters of the twin by torch name, and the alignment with the torch operator's order.

The twin's ``params`` is a :class:`ParamDict`: a dict keyed by the torch names of the
trainable parameters, in :meth:`torch.nn.Module.named_parameters` order (a tied weight
appears once, under its first name, as there), each in torch's own layout. It is a JAX
pytree that flattens in that insertion order, so ``ravel_pytree(twin.params)`` is exactly
the torch operator's flat vector and the alignment between the two is the identity
permutation with one named block per parameter.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

from dualhess._alignment import Alignment
from dualhess._operator import ParamLayout

__all__ = ["ParamDict", "alignment_by_name", "canonical_names"]


class ParamDict(dict):
    """A dict of parameters that JAX flattens in insertion order (torch's), not sorted.

    Examples
    --------
    >>> import jax, numpy as np
    >>> from jax_backend.twin import ParamDict
    >>> p = ParamDict({"weight": np.ones(2), "bias": np.zeros(1)})
    >>> [leaf.shape for leaf in jax.tree_util.tree_leaves(p)]
    [(2,), (1,)]
    """


def _flatten_with_keys(d: ParamDict) -> tuple[list[tuple[Any, Any]], tuple[str, ...]]:
    return [(jax.tree_util.DictKey(k), v) for k, v in d.items()], tuple(d)


jax.tree_util.register_pytree_with_keys(
    ParamDict,
    _flatten_with_keys,
    lambda keys, values: ParamDict(zip(keys, values)),
    lambda d: (list(d.values()), tuple(d)),
)


def canonical_names(module: Any, prefix: str = "") -> dict[str, str]:
    """Every name a parameter is reachable under (``prefix`` + path) -> its first name.

    ``named_parameters()`` lists a tied weight once; :func:`torch.export.export` lists every
    path to it. This map sends each exported name to the one ``named_parameters()`` uses.
    """
    first: dict[int, str] = {}
    for name, p in module.named_parameters():
        first.setdefault(id(p), name)
    out = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        out[prefix + name] = first[id(p)]
    return out


def alignment_by_name(named_shapes: Iterable[tuple[str, tuple[int, ...]]]) -> tuple[
        Alignment, ParamLayout]:
    """The identity alignment with one block per named tensor, and its layout."""
    layout = ParamLayout.from_shapes(list(named_shapes))
    blocks = [(e.name, np.arange(e.start, e.stop)) for e in layout.entries]
    return Alignment.identity(layout.size, blocks), layout
