"""Parameter-only folding: a linear op whose tensors the model computes from its parameters and buffers.

The importer evaluates every computation that depends only on parameters and buffers (weights built in
forward, ``torch.nn.utils.parametrize`` / ``weight_norm`` parametrizations, weight standardization, low-rank
``W + B @ A``, masks) once, from their float64 values, and reads a conv / linear / affine on such a tensor as
an op holding the result (in float64, with the dtype the model computes it in). Left unchanged, that op would
be written back as the original calls, recomputing its weights on every run. :func:`materialize` marks such
ops as new, so the exporter writes them as plain layers holding the folded tensors: cast once to the model's
dtype and device in the deploy model, kept in float64 in the verification twin (which therefore computes what
the float64 reference computes: no false alarm).
"""
from __future__ import annotations

import torch.fx as fx

from reparam.core.ir import Graph
from reparam.core.ops import Affine, Conv, Linear
from reparam.frontends.fx.nodes import FxOrigin


_HOLDS_TENSORS = (Conv, Linear, Affine)  # ops whose other inputs are all constants


def _computed(a: fx.Node) -> bool:
    """``a`` is a value computed from constants (not a parameter or buffer read as it is)."""
    return a.op in ("call_function", "call_method", "call_module")


def _owner(n: fx.Node) -> str | None:
    stack = n.meta.get("nn_module_stack") or {}
    scope = next(reversed(stack.values()), None) if stack else None
    return scope[0] if isinstance(scope, tuple) and scope[0] else None


def materialize(graph: Graph) -> list[str]:
    """Mark every recognized op of ``graph`` that reads a computed constant as new (its FX origin dropped),
    named after the module it was computed in. Returns the names of the ops so marked."""
    done = []
    for node in graph.nodes:
        origin = node.origin
        if not isinstance(origin, FxOrigin) or not isinstance(node.op, _HOLDS_TENSORS):
            continue
        data = set(origin.inputs)
        constants = [a for a in origin.node.all_input_nodes if a not in data]
        if any(_computed(a) for a in constants):
            node.origin = None
            node.name = _owner(origin.node) or node.name
            done.append(node.name)
    return done
