"""Drop what no output depends on before rewriting: shape asserts and unused pure computations.

A traced ``torch._assert(x.ndim == 4, ...)`` makes ``x`` look used twice, which would stop every fusion
through ``x``; the deploy graph only keeps what its outputs depend on anyway. A node is dropped only when
no output depends on it **and** it cannot change anything else: an assert (it computes nothing), or a call
without side effects (not in place, not a module with ``inplace=True``, not impure for torch.fx).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from reparam.frontends.fx.nodes import FxOrigin
from reparam.core.ir import Graph
from reparam.core.ops import Input

SHAPE_CHECKS = {torch._assert, getattr(torch, "_assert_async", torch._assert)}


def _harmless(n: fx.Node) -> bool:
    """Dropping ``n`` (whose value nobody reads) cannot change the values the graph computes."""
    if n.op == "get_attr":
        return True
    if n.op == "call_function":
        if n.target in SHAPE_CHECKS:
            return True
        name = getattr(n.target, "__name__", "")
        return not name.endswith("_") and not n.is_impure()
    if n.op == "call_method":
        return not str(n.target).endswith("_")
    if n.op == "call_module":
        m = n.graph.owning_module.get_submodule(n.target) if n.graph.owning_module is not None else None
        return m is not None and not getattr(m, "inplace", False) and not getattr(m, "_is_impure", False)
    return False


def prune_unused(graph: Graph) -> int:
    """Remove the IR nodes of ``graph`` that no output depends on and whose FX origin is harmless to drop.

    Returns how many nodes were removed."""
    live: set[int] = set()
    stack = list(graph.outputs)
    while stack:
        n = stack.pop()
        if n.id not in live:
            live.add(n.id)
            stack.extend(n.inputs)
    dead = [n for n in graph.nodes if n.id not in live and not isinstance(n.op, Input)]
    removable = [n for n in dead if isinstance(n.origin, FxOrigin) and _harmless(n.origin.node)]
    if len(removable) != len(dead):  # something unread may still have an effect: keep everything it reads
        keep = {n.id for n in dead if n not in removable}
        stack = [n for n in dead if n.id in keep]
        while stack:
            n = stack.pop()
            for i in n.inputs:
                if i.id not in keep:
                    keep.add(i.id)
                    stack.append(i)
        removable = [n for n in removable if n.id not in keep]
    before = len(graph)
    ids = {n.id for n in removable}
    for n in removable:  # consumers first, so each node is unused when its turn comes
        for i in n.inputs:
            i.users = [u for u in i.users if u.id not in ids]
    for n in removable:
        n.users = []
    graph.remove_dead(removable)
    return before - len(graph)
