"""Rebuilding a Sum after a rule has rewritten some of its terms (the parallel-branch rules' shared helper)."""
from __future__ import annotations

import torch

from reparam.core.expr import Expr
from reparam.core.ir import Node
from reparam.core.ops import Affine, Sum


def rebuild(total: Node, replace: dict[int, tuple[Expr | Node, float]], drop=frozenset()):
    """The Sum with terms (by position) replaced by (expression, coefficient) or dropped; a single remaining
    term stands alone (scaled if needed)."""
    items = []
    for k, (n, c) in enumerate(zip(total.inputs, total.op.coeffs)):
        if k in drop:
            continue
        items.append(replace.get(k, (n, c)))
    if len(items) == 1:
        e, c = items[0]
        return e if c == 1 else Affine(torch.tensor(float(c), dtype=torch.float64), None, None)(e)
    return Sum(tuple(float(c) for _, c in items))(*[e for e, _ in items])


def merged(total: Node, group, new) -> Expr | Node:
    """The Sum with the terms ``group`` (Terms) replaced by one term ``new`` (coefficient 1) in place of the first."""
    first = min(group, key=lambda t: t.index)
    return rebuild(total, {first.index: (new, 1.0)}, {t.index for t in group if t is not first})


# what parallel convs of one input must share to be one conv (kernels.parallel_offsets checks the alignment)
MERGE_FIELDS = ("nd", "stride", "dilation", "groups", "padding_mode", "in_channels", "out_channels")


def merge_key(op, free=()) -> tuple:
    """The fields of a conv that parallel convs of one input must share to be summed into one, except ``free``."""
    return tuple(getattr(op, f) for f in MERGE_FIELDS if f not in free)


def slack(op) -> tuple[int, ...]:
    """lo + hi − (extent − 1) per axis: convs of one input with equal stride line up iff these are equal."""
    return tuple(lo + hi - (e - 1) for (lo, hi), e in zip(op.padding, op.extent))
