"""Patterns: what a rule looks for, written like the expression it matches.

    P(Affine, P(Conv, X("x"), name="conv"), name="bn")     # BN(conv(x))
    SumOf(Many(P(Conv, X("x"), one_use=True), min=2, name="convs"))   # a sum with ≥ 2 convs of one x
    P(Cat, Each(P(Conv, one_use=True)), name="cat")        # a cat of convs only

``P(op_types, *inputs, name=..., where=...)`` matches a node whose op is one of ``op_types``; with inputs
given, the node must have exactly that many inputs, each matching in order; with none given, its inputs are
not looked at (``Each(p)`` as the only input: any number of inputs, every one matching ``p``). ``X(name)``
matches any node. A name bound twice must bind the same node (two convs "of one input" share ``X("x")``).
``where`` is a predicate on the op. ``a | b`` matches what ``a`` or ``b`` matches.

Use constraints are part of the pattern and hold for every match: ``one_use=True`` (the value has exactly one
consumer), ``only_used_by=types`` (every consumer has one of these op types). A graph output among a value's
consumers is checked by the engine when the rewrite would absorb the value, with a reason.

``SumOf(*items, rest=..., name=...)`` matches a Sum by its terms, in any order: each item is a pattern that
one term must match (its Term is bound under ``One(p, name)``), or ``Many(p, min=k, alike=key, name=...)``:
all the remaining terms that match ``p`` (agreeing on the names ``p`` binds, and on ``alike(node)``), at least
``k``. Terms whose shape differs from the sum's (broadcast) go to ``rest`` unless ``broadcast=True``; ``rest``
binds the list of the terms no item took (``rest=None``: no term may be left over). A rule receives :class:`Term` s (node, coefficient,
position). A pattern may match a node in several ways: the engine tries each until one rewrites.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from reparam.core.ir import Node
from reparam.core.ops import Op, Sum

Bound = dict


@dataclass(frozen=True)
class Term:
    """One term c·node of a Sum, at position ``index`` among its inputs."""

    index: int
    node: Node
    coeff: float


class Pattern:
    one_use: bool = False
    only_used_by: tuple[type, ...] | None = None

    def matches(self, node: Node, bound: Bound) -> Iterator[Bound]:
        """Every way ``node`` matches, each as ``bound`` extended (``bound`` itself is never changed)."""
        raise NotImplementedError

    def root_types(self) -> tuple[type, ...] | None:
        """The op types a root node must have (None: any). Lets the engine skip rules cheaply."""
        return None

    def all(self, node: Node) -> Iterator[Bound]:
        return self.matches(node, {})

    def __call__(self, node: Node) -> Bound | None:
        """The first match of ``node``, or None."""
        return next(iter(self.all(node)), None)

    def __or__(self, other: "Pattern") -> "Pattern":
        return Alt(self, other)

    def _uses_ok(self, node: Node) -> bool:
        if self.one_use and len(node.users) != 1:
            return False
        return self.only_used_by is None or all(isinstance(u.op, self.only_used_by) for u in node.users)


def _bind(bound: Bound, name: str | None, value) -> Bound | None:
    """``bound`` with name → value (a copy), or None when the name is already bound to something else."""
    if name is None:
        return bound
    if name in bound:
        return bound if bound[name] is value else None
    out = dict(bound)
    out[name] = value
    return out


def _types(types) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


class X(Pattern):
    """Any node."""

    def __init__(self, name: str | None = None, *, one_use: bool = False, only_used_by=None):
        self.name = name
        self.one_use = one_use
        self.only_used_by = None if only_used_by is None else _types(only_used_by)

    def matches(self, node, bound):
        if self._uses_ok(node):
            out = _bind(bound, self.name, node)
            if out is not None:
                yield out

    def __repr__(self):
        return self.name or "_"


class Each:
    """As the only input pattern of P: any number of inputs, each matching ``pattern`` (in order)."""

    def __init__(self, pattern: Pattern):
        self.pattern = pattern


class P(Pattern):
    """A node whose op is one of ``types`` (and satisfies ``where``), with matching inputs."""

    def __init__(self, types: type[Op] | tuple[type[Op], ...], *inputs: Pattern | Each, name: str | None = None,
                 where: Callable[[Op], bool] | None = None, one_use: bool = False, only_used_by=None):
        self.types = _types(types)
        self.each = inputs[0].pattern if len(inputs) == 1 and isinstance(inputs[0], Each) else None
        self.inputs = () if self.each is not None else inputs
        self.name = name
        self.where = where
        self.one_use = one_use
        self.only_used_by = None if only_used_by is None else _types(only_used_by)

    def root_types(self):
        return self.types

    def matches(self, node, bound):
        if not isinstance(node.op, self.types) or not self._uses_ok(node):
            return
        if self.where is not None and not self.where(node.op):
            return
        if self.each is not None:
            pats = [self.each] * len(node.inputs)
        else:
            pats = list(self.inputs)
            if pats and len(node.inputs) != len(pats):
                return
        start = _bind(bound, self.name, node)
        if start is None:
            return
        yield from _seq(pats, node.inputs, start)

    def __repr__(self):
        types = "|".join(t.__name__ for t in self.types)
        args = f"Each({self.each!r})" if self.each is not None else ", ".join(map(repr, self.inputs))
        return f"{types}({args})" + (f" as {self.name}" if self.name else "")


def _seq(pats: list[Pattern], nodes: list[Node], bound: Bound) -> Iterator[Bound]:
    if not pats:
        yield bound
        return
    for b in pats[0].matches(nodes[0], bound):
        yield from _seq(pats[1:], nodes[1:], b)


class Alt(Pattern):
    """What any of ``options`` matches, tried in order."""

    def __init__(self, *options: Pattern):
        self.options = options

    def root_types(self):
        found: tuple[type, ...] = ()
        for o in self.options:
            t = o.root_types()
            if t is None:
                return None
            found += tuple(x for x in t if x not in found)
        return found

    def matches(self, node, bound):
        for o in self.options:
            yield from o.matches(node, bound)

    def __repr__(self):
        return " | ".join(map(repr, self.options))


class One:
    """A SumOf item: one term matching ``pattern``, its :class:`Term` bound as ``name``."""

    def __init__(self, pattern: Pattern, name: str | None = None):
        self.pattern = pattern
        self.name = name


class Many:
    """A SumOf item: every remaining term matching ``pattern`` that agrees with the first one on the names the
    pattern binds (and on ``alike(node)``, if given); at least ``min`` of them. Bound as a list of Terms."""

    def __init__(self, pattern: Pattern, *, min: int = 1, alike: Callable[[Node], object] | None = None,
                 name: str | None = None):
        self.pattern = pattern
        self.min = min
        self.alike = alike
        self.name = name


class SumOf(Pattern):
    """A Sum matched by its terms in any order (see the module docstring)."""

    def __init__(self, *items: Pattern | One | Many, rest: str | None = "rest", name: str | None = "total",
                 broadcast: bool = False, one_use: bool = False, only_used_by=None):
        self.items = [i if isinstance(i, (One, Many)) else One(i) for i in items]
        self.broadcast = broadcast
        self.rest = rest
        self.name = name
        self.one_use = one_use
        self.only_used_by = None if only_used_by is None else _types(only_used_by)

    def root_types(self):
        return (Sum,)

    def matches(self, node, bound):
        if not isinstance(node.op, Sum) or node.shape is None or not self._uses_ok(node):
            return
        start = _bind(bound, self.name, node)
        if start is None:
            return
        terms = [Term(k, n, c) for k, (n, c) in enumerate(zip(node.inputs, node.op.coeffs))]
        free = [t for t in terms if self.broadcast or t.node.shape == node.shape]
        broadcast = [t for t in terms if t not in free]
        seen: set = set()
        for b, left in self._items(0, free, start):
            if self.rest is None and (left or broadcast):
                continue
            key = tuple(sorted((k, id(v)) for k, v in b.items() if not isinstance(v, list)))
            key += tuple(sorted((k, tuple(t.index for t in v)) for k, v in b.items() if isinstance(v, list)))
            if key in seen:
                continue
            seen.add(key)
            if self.rest is not None:
                b = dict(b)
                b[self.rest] = sorted(left + broadcast, key=lambda t: t.index)
            yield b

    def _items(self, k: int, free: list[Term], bound: Bound) -> Iterator[tuple[Bound, list[Term]]]:
        if k == len(self.items):
            yield bound, free
            return
        item = self.items[k]
        if isinstance(item, One):
            for t in free:
                for b in item.pattern.matches(t.node, bound):
                    b = _bind(b, item.name, t)
                    if b is not None:
                        yield from self._items(k + 1, [u for u in free if u is not t], b)
            return
        groups: set = set()
        for seed in free:
            for b in item.pattern.matches(seed.node, bound):
                key = item.alike(seed.node) if item.alike else None
                group = [seed]
                for other in free:
                    if other is seed or next(iter(item.pattern.matches(other.node, b)), None) is None:
                        continue
                    if not item.alike or item.alike(other.node) == key:  # alike reads terms the pattern matched
                        group.append(other)
                if len(group) < item.min:
                    continue
                group.sort(key=lambda t: t.index)
                ids = tuple(t.index for t in group)
                if ids in groups:
                    continue
                groups.add(ids)
                out = _bind(b, item.name, group)
                if out is not None:
                    yield from self._items(k + 1, [u for u in free if u not in group], out)

    def __repr__(self):
        return f"Sum({', '.join(type(i).__name__ + '(' + repr(i.pattern) + ')' for i in self.items)}, …)"


def bound_nodes(bound: Bound) -> list[Node]:
    """The nodes of a match (Terms and lists of Terms unpacked), for logs."""
    out: list[Node] = []
    for v in bound.values():
        for item in v if isinstance(v, list) else [v]:
            node = item.node if isinstance(item, Term) else item
            if isinstance(node, Node):
                out.append(node)
    return out
