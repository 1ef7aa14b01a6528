"""The one table of ATen rules: ``"aten.add.Tensor" -> JAX function``.

A rule is a plain function of the node's arguments, already converted (tensors are JAX
arrays, lists stay lists, dtypes are torch dtypes) and returns a JAX array or a tuple of
them. Rules live in the ``_ops_<family>.py`` modules and register themselves with
:func:`rule`; the interpreter casts each result to the dtype torch recorded for the node, so
a rule need not reproduce torch's type promotion.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["RULES", "Rule", "RuleError", "rule", "lookup"]


class RuleError(Exception):
    """Raised by a rule for arguments it does not support; the interpreter adds the node."""


@dataclass(frozen=True)
class Rule:
    """One ATen operator's JAX implementation and the family it belongs to."""

    name: str
    family: str
    fn: Callable[..., Any]


RULES: dict[str, Rule] = {}


def rule(*names: str, family: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` as the JAX rule of the ATen operators ``names`` (``"aten.mm.default"``)."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        for name in names:
            if name in RULES:
                raise RuntimeError(f"two JAX rules for {name}")
            RULES[name] = Rule(name, family, fn)
        return fn

    return register


def lookup(name: str) -> Rule | None:
    """The rule for an operator name, or None (imports every family first)."""
    from . import (  # noqa: F401  (importing registers the rules)
        _ops_attention,
        _ops_conv,
        _ops_creation,
        _ops_elementwise,
        _ops_index,
        _ops_linalg,
        _ops_norm,
        _ops_reduction,
    )

    return RULES.get(name)
