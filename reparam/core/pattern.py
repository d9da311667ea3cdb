"""Patterns: what a rule looks for, written like the expression it matches.

    P(Affine, P(Conv, X("x"), name="conv"), name="bn")     # matches BN(conv(x))

``P(op_types, *inputs, name=..., where=...)`` matches a node whose op is one of ``op_types``; with
inputs given, the node must have exactly that many inputs, each matching in order; with none given,
its inputs are not looked at. ``X(name)`` matches any node. A name bound twice must bind the same node
(``P(Sum, P(Conv, X("x")), P(Conv, X("x")))`` matches two convs of one input). ``where`` is a predicate
on the op.
"""
from __future__ import annotations

from typing import Callable

from reparam.core.ir import Node
from reparam.core.ops import Op


class Pattern:
    def match(self, node: Node, bound: dict[str, Node]) -> bool:
        raise NotImplementedError

    def root_types(self) -> tuple[type, ...] | None:
        """The op types a root node must have (None: any). Lets the engine skip rules cheaply."""
        return None

    def __call__(self, node: Node) -> dict[str, Node] | None:
        bound: dict[str, Node] = {}
        return bound if self.match(node, bound) else None


def _bind(bound: dict[str, Node], name: str | None, node: Node) -> bool:
    if name is None:
        return True
    if name in bound:
        return bound[name] is node
    bound[name] = node
    return True


class X(Pattern):
    """Any node."""

    def __init__(self, name: str | None = None):
        self.name = name

    def match(self, node, bound):
        return _bind(bound, self.name, node)

    def __repr__(self):
        return self.name or "_"


class P(Pattern):
    """A node whose op is one of ``types`` (and satisfies ``where``), with matching inputs."""

    def __init__(self, types: type[Op] | tuple[type[Op], ...], *inputs: Pattern, name: str | None = None,
                 where: Callable[[Op], bool] | None = None):
        self.types = types if isinstance(types, tuple) else (types,)
        self.inputs = inputs
        self.name = name
        self.where = where

    def root_types(self):
        return self.types

    def match(self, node, bound):
        if not isinstance(node.op, self.types):
            return False
        if self.where is not None and not self.where(node.op):
            return False
        if self.inputs:
            if len(node.inputs) != len(self.inputs):
                return False
            snapshot = dict(bound)
            for pat, inp in zip(self.inputs, node.inputs):
                if not pat.match(inp, bound):
                    bound.clear()
                    bound.update(snapshot)
                    return False
        return _bind(bound, self.name, node)

    def __repr__(self):
        types = "|".join(t.__name__ for t in self.types)
        args = ", ".join(map(repr, self.inputs))
        return f"{types}({args})" + (f" as {self.name}" if self.name else "")
