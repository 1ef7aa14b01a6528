"""Docstring fragments that several public functions share, written once.

A docstring names a fragment with a line holding only ``%(name)s``; :func:`fill_doc` replaces
that line with the fragment, indented as the placeholder is. numpydoc renders the result as
if the text had been written in place.

Examples
--------
>>> from dualhess._docs import fill_doc
>>> @fill_doc
... def f(checkpoint=None, checkpoint_every=None):
...     '''Parameters
...     ----------
...     %(checkpoint)s
...     '''
>>> "checkpoint_every : int, optional" in f.__doc__
True
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

__all__ = ["DOCS", "fill_doc"]

T = TypeVar("T", bound=Callable[..., object])

DOCS: dict[str, str] = {
    "checkpoint": """\
checkpoint : str or path, optional
    Save progress to this ``.npz`` file every ``checkpoint_every`` products (default 10)
    and resume from it when the same call is made again (needs an integer ``seed``); a
    file made with other settings or another operator is refused. See
    :class:`dualhess._checkpoint.Checkpoint`.
checkpoint_every : int, optional
    Products between two saves.""",
    "monitor_measurement": """\
metrics : sequence of {"top_eigenvalue", "trace", "gradient_overlap"}
    What to measure (default ``("top_eigenvalue", "trace")``). ``"gradient_overlap"`` logs
    ``||P_k g||^2 / ||g||^2``, the fraction of the gradient in the top-``overlap_k``
    eigenspace (Gur-Ari et al. 2018, https://arxiv.org/abs/1812.04754), with
    ``gradient_norm``.
tol : float
    Relative residual tolerance of the top eigenvalue: the logged value is within
    ``tol * |lambda|`` of an eigenvalue of the Hessian at that step.
num_steps : int
    Lanczos vectors kept between restarts of one measurement (``eigsh``'s ``max_basis``).
max_matvecs : int, optional
    Product budget of one eigenvalue measurement.
trace_method : str
    ``"hutchinson"`` (default), ``"hutch++"`` or ``"xtrace"`` (see :func:`dualhess.trace`).
trace_matvecs : int
    Products per trace estimate.
seed : int
    Base seed; the cold start vector at step ``s`` comes from
    ``numpy.random.default_rng([seed, s, 0])`` and the trace probes from
    ``numpy.random.default_rng([seed, s, 1])``, so a logged value can be reproduced exactly.
warm_start : bool
    Start each top-eigenvalue measurement from the previous top eigenvector
    (``eigsh(v0=...)``; default True).
overlap_k : int
    The dimension of the eigenspace of ``"gradient_overlap"`` (default 10, the number of
    classes in Gur-Ari et al.; capped at ``n - 1``).""",
}

_PLACEHOLDER = re.compile(r"^(?P<indent>[ \t]*)%\((?P<name>\w+)\)s[ \t]*$", re.M)


def fill_doc(obj: T) -> T:
    """Replace every ``%(name)s`` line of ``obj.__doc__`` by the fragment ``DOCS[name]``."""
    doc = obj.__doc__
    if not doc:
        return obj

    def expand(match: re.Match[str]) -> str:
        name, indent = match.group("name"), match.group("indent")
        if name not in DOCS:
            raise KeyError(f"{getattr(obj, '__qualname__', obj)}: no docstring fragment {name!r}")
        return "\n".join(indent + line if line else line for line in DOCS[name].splitlines())

    obj.__doc__ = _PLACEHOLDER.sub(expand, doc)
    return obj
