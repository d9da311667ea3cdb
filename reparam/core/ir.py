"""The graph the engine rewrites: nodes holding vocabulary ops, independent of FX or ONNX.

A backend imports its graph into a :class:`Graph` (keeping, on each node, an ``origin`` handle to the
node it came from) and exports it back; rules and the engine only ever see this module.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterable

import torch

from reparam.core.ops import Input, Op

_ids = itertools.count()


class Node:
    """One value of the graph: ``op`` applied to ``inputs``.

    ``name`` is where it came from (a module path or node name, for reports); ``shape``/``dtype`` are
    the traced output's, when known; ``origin`` is the backend's own node while the op is unchanged.
    """

    __slots__ = ("op", "inputs", "users", "name", "shape", "dtype", "origin", "id", "graph")

    def __init__(self, op: Op, inputs: Iterable["Node"] = (), *, name: str = "", shape=None, dtype=None,
                 origin: Any = None):
        self.op = op
        self.inputs: list[Node] = list(inputs)
        self.users: list[Node] = []
        self.name = name
        self.shape: tuple[int, ...] | None = tuple(shape) if shape is not None else None
        self.dtype: torch.dtype | None = dtype
        self.origin = origin
        self.id = next(_ids)
        self.graph: Graph | None = None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def channels(self) -> int | None:
        return None if self.shape is None or len(self.shape) < 2 else self.shape[1]

    def __repr__(self):
        return f"%{self.name or self.id}={self.op!r}"


class Graph:
    """Nodes, graph inputs and outputs; keeps users up to date.

    Nodes are kept in insertion order; ``nodes`` gives a topological order that follows it (a new
    node is placed just before its first consumer), computed on demand.
    """

    def __init__(self):
        self._nodes: dict[int, Node] = {}
        self.outputs: list[Node] = []
        self.meta: dict[str, Any] = {}

    @property
    def nodes(self) -> list[Node]:
        order: list[Node] = []
        done: set[int] = set()
        for start in self._nodes.values():
            stack = [(start, False)]
            while stack:
                n, expanded = stack.pop()
                if n.id in done:
                    continue
                if expanded:
                    done.add(n.id)
                    order.append(n)
                    continue
                stack.append((n, True))
                stack.extend((i, False) for i in reversed(n.inputs) if i.id not in done)
        return order

    def __len__(self) -> int:
        return len(self._nodes)

    def add(self, node: Node) -> Node:
        node.graph = self
        self._nodes[node.id] = node
        for i in node.inputs:
            i.users.append(node)
        return node

    def is_output(self, node: Node) -> bool:
        return any(o is node for o in self.outputs)

    def replace_uses(self, old: Node, new: Node) -> None:
        for user in list(old.users):
            user.inputs = [new if i is old else i for i in user.inputs]
            new.users.append(user)
        old.users = []
        self.outputs = [new if o is old else o for o in self.outputs]

    def remove_dead(self, candidates: Iterable[Node]) -> None:
        """Remove candidates that no longer have users (and are not outputs), recursively."""
        stack = list(candidates)
        while stack:
            n = stack.pop()
            if n.users or n.graph is not self or self.is_output(n) or isinstance(n.op, Input):
                continue
            del self._nodes[n.id]
            n.graph = None
            for i in n.inputs:
                i.users = [u for u in i.users if u is not n]
                stack.append(i)

    def add_all(self, nodes: Iterable[Node]) -> None:
        """Add new nodes whose inputs already exist (``nodes`` places each before its first consumer)."""
        for n in nodes:
            self.add(n)
