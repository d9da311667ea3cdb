"""Checking an FX import node by node: each recognized op against the FX node it was read from.

A rewrite is checked against the ops it replaces, so an op read wrongly from the model (a capture bug)
looks like a wrong rewrite to every later check. When a fused model fails verification, this tells the
two apart: every recognized node is run both ways on random float64 inputs.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from reparam.frontends.fx.nodes import FxOrigin
from reparam.frontends.fx.importer import import_fx
from reparam.core.ops import Input, Opaque
from reparam.frontends.verify import copy_in, relative_error

TOLERANCE = 1e-9


def misread_nodes(gm: fx.GraphModule) -> list[str]:
    """Names of the nodes of ``gm`` (shapes attached) whose vocabulary op computes something else than the
    FX node it came from, on random float64 inputs."""
    gm64 = copy_in(gm, torch.float64)
    graph, _ = import_fx(gm64)
    runner = fx.Interpreter(gm64)
    bad = []
    for node in graph.nodes:
        origin = node.origin
        if not isinstance(origin, FxOrigin) or isinstance(node.op, (Input, Opaque)) or node.shape is None \
                or any(i.shape is None for i in node.inputs):
            continue
        gen = torch.Generator().manual_seed(node.id)
        xs = [torch.randn(i.shape, generator=gen, dtype=torch.float64) for i in node.inputs]
        try:
            want = _run_alone(runner, origin, xs)
            got = node.op.evaluate(*xs)
        except Exception:  # noqa: BLE001 - a node that cannot run alone is not evidence either way
            continue
        if not isinstance(want, torch.Tensor) or relative_error([got], [want]) > TOLERANCE:
            bad.append(node.name)
    return bad


def _run_alone(runner: fx.Interpreter, origin: FxOrigin, xs: list[torch.Tensor]):
    """The FX node's value with its data inputs set to ``xs`` (constant inputs computed as in the model)."""
    env = dict(zip(origin.inputs, xs))

    def value(n: fx.Node):
        if n not in env:
            for a in n.all_input_nodes:
                value(a)
            runner.env = env
            env[n] = runner.run_node(n)
        return env[n]

    for a in origin.node.all_input_nodes:
        value(a)
    runner.env = env
    return runner.run_node(origin.node)
