"""Looking at a Sum as terms cᵢ·branchᵢ(source): the shared helper of the parallel-branch rules."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from reparam.core.expr import Expr
from reparam.core.ir import Node
from reparam.core.ops import Affine, AvgPool, Conv, Linear, Sum

_BRANCH_OPS = (Conv, Linear, AvgPool)


@dataclass
class Term:
    index: int  # position among the Sum's inputs
    node: Node  # the branch (an input of the Sum)
    coeff: float
    source: Node  # what the branch reads: a conv's input, or the node itself for an identity branch
    broadcast: bool = False  # its shape differs from the sum's (branch rules leave it alone)

    @property
    def is_identity(self) -> bool:
        return self.source is self.node


def sum_terms(total: Node) -> list[Term]:
    """The Sum's terms; a conv/linear/avgpool branch's source is its input, any other branch is x itself.

    Empty when the output shape is unknown. A term whose shape differs from the sum's is broadcast."""
    if total.shape is None:
        return []
    out = []
    for k, (n, c) in enumerate(zip(total.inputs, total.op.coeffs)):
        src = n.inputs[0] if isinstance(n.op, _BRANCH_OPS) else n
        out.append(Term(k, n, c, src, n.shape != total.shape))
    return out


def by_source(terms: list[Term]) -> list[list[Term]]:
    """Terms that are not broadcast, grouped by the node they read, in first-seen order."""
    groups: dict[int, list[Term]] = {}
    for t in terms:
        if not t.broadcast:
            groups.setdefault(t.source.id, []).append(t)
    return list(groups.values())


def nested_sum(term: Node, total: Node) -> tuple[Node, float] | None:
    """(y, α) when the term ``term`` of the Sum ``total`` is y or α·y (a scalar, no shift) for a Sum y of
    ``total``'s shape that nothing else reads: y's terms can join ``total``'s (sum_flatten does it)."""
    inner, alpha = term, 1.0
    op = term.op
    if isinstance(op, Affine) and op.is_scalar and (op.shift is None or not bool(op.shift.any())) \
            and len(term.users) == 1 and term.inputs and isinstance(term.inputs[0].op, Sum):
        inner, alpha = term.inputs[0], float(op.scale)
    if isinstance(inner.op, Sum) and len(inner.users) == 1 and inner.shape == total.shape:
        return inner, alpha
    return None


def joins_outer_sum(total: Node) -> bool:
    """True when the Sum ``total`` will be flattened into the Sum that reads it (directly or scaled):
    merging its branches is then left to the outer sum, which sees all of them at once."""
    if len(total.users) != 1:
        return False
    user = total.users[0]
    term, outer = (user, user.users[0]) if isinstance(user.op, Affine) and len(user.users) == 1 else (total, user)
    if not isinstance(outer.op, Sum):
        return False
    found = nested_sum(term, outer)
    return found is not None and found[0] is total


def affine_source(node: Node) -> tuple[Node, Affine | None]:
    """For a branch a(x) with a per-channel (axis 1) or scalar affine: (x, a); else (node, None)."""
    if isinstance(node.op, Affine) and node.rank and node.op.acts_on(1, node.rank):
        return node.inputs[0], node.op
    return node, None


def rebuild(total: Node, replace: dict[int, tuple[Expr | Node, float]], drop: set[int] = frozenset()):
    """The Sum with terms replaced/dropped; a single remaining term stands alone (scaled if needed)."""
    items = []
    for k, (n, c) in enumerate(zip(total.inputs, total.op.coeffs)):
        if k in drop:
            continue
        items.append(replace.get(k, (n, c)))
    if len(items) == 1:
        e, c = items[0]
        return e if c == 1 else Affine(torch.tensor(float(c), dtype=torch.float64), None, None)(e)
    return Sum(tuple(float(c) for _, c in items))(*[e for e, _ in items])
