"""Is the input a well-formed ONNX model? Errors found here are the user's (their file), told in one line.

The main graph's data flow is a networkx DiGraph (node → node through the tensors one writes and the other
reads, subgraph reads of outer names included): a tensor read but written by no node, input or initializer is
a dangling input; a cycle is found with ``networkx.find_cycle``. Both are told with the names involved, before
``onnx.checker`` (whose message for these is a bare name), which then judges everything else.
"""
from __future__ import annotations

import networkx as nx
import numpy as np
import onnx

from reparam.errors import ReparamError
from reparam.frontends.onnx.importer import outer_reads

_MAX_INPUT_BYTES = 1 << 31  # one input larger than 2 GiB: verification could not even allocate it


def _label(node: onnx.NodeProto, k: int) -> str:
    return f"'{node.name}' ({node.op_type})" if node.name else f"node {k} ({node.op_type})"


def dataflow(graph: onnx.GraphProto) -> tuple[nx.DiGraph, list[tuple[int, str]]]:
    """The node graph of ``graph`` (node indices; an edge per tensor passed) and the (node, tensor) reads
    that nothing defines."""
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {
        s.values.name for s in graph.sparse_initializer}
    writer: dict[str, int] = {}
    for k, node in enumerate(graph.node):
        for o in node.output:
            if o:
                writer[o] = k
    g = nx.DiGraph()
    g.add_nodes_from(range(len(graph.node)))
    dangling = []
    for k, node in enumerate(graph.node):
        for name in list(node.input) + outer_reads(node):
            if not name:
                continue
            if name in writer:
                g.add_edge(writer[name], k, tensor=name)
            elif name not in defined:
                dangling.append((k, name))
    return g, dangling


def check_input(model: onnx.ModelProto, where: str = "the model") -> None:
    """Raise ReparamError (one line) when ``model`` is not a model that could run: no graph, dangling reads,
    a cycle, an output nothing computes, or whatever ``onnx.checker`` refuses."""
    graph = model.graph
    if not graph.node and not graph.output:
        raise ReparamError(f"{where} has no graph (an empty or truncated file?)")
    g, dangling = dataflow(graph)
    if dangling:
        k, name = dangling[0]
        more = f" (and {len(dangling) - 1} more)" if len(dangling) > 1 else ""
        raise ReparamError(f"{where} is not a valid ONNX graph: node {_label(graph.node[k], k)} reads '{name}', "
                           f"which no node, graph input or initializer defines{more}")
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        cycle = None
    if cycle:
        names = " → ".join(_label(graph.node[a], a) for a, _ in cycle[:6]) + (" → …" if len(cycle) > 6 else "")
        raise ReparamError(f"{where} is not a valid ONNX graph: its nodes form a cycle ({names})")
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input} | {
        i.name for i in graph.initializer}
    missing = [o.name for o in graph.output if o.name not in produced]
    if missing:
        raise ReparamError(f"{where} is not a valid ONNX graph: output(s) {missing} are computed by nothing")
    try:
        onnx.checker.check_model(model)
    except Exception as err:  # onnx.checker.ValidationError, or a protobuf too large to check in memory
        text = " ".join(str(err).split())
        raise ReparamError(f"{where} fails onnx.checker, so it is not a valid ONNX model: {text[:300]}") from err


def check_input_size(name: str, shape: tuple[int, ...], itemsize: int) -> None:
    """Refuse an input whose feed could not be allocated (instead of a MemoryError deep inside)."""
    size = int(np.prod([max(int(d), 0) for d in shape], dtype=object)) * itemsize
    if size > _MAX_INPUT_BYTES:
        raise ReparamError(f"input '{name}' of shape {list(shape)} would take {size / 2 ** 30:.3g} GiB for "
                           f"verification; pass a smaller shape (input_shapes / --input-shape) or verify=False "
                           f"(--no-verify)")
