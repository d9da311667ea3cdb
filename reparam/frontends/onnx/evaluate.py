"""Float64 evaluation of an imported ONNX graph: vocabulary ops by their reference semantics, every other
node by the ONNX reference implementation (``onnx.reference``) on float64 inputs. A control-flow node
runs as a one-node model whose inputs are its own and the outer tensors its subgraphs read.

Evaluating the IR before and after the rewrites gives the float64 end-to-end error (the rewrites' own
exactness, free of float32 rounding); onnxruntime then checks the written file itself in float32.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from onnx import numpy_helper

from reparam.errors import ReparamError
from reparam.core.ir import Graph, Node
from reparam.frontends.onnx.importer import OnnxOrigin, _array, node_proto, node_reference
from reparam.core.ops import Input, Opaque


_DIRECT = {"Erf": torch.special.erf, "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh,
           "Exp": torch.exp, "Sqrt": torch.sqrt, "Abs": torch.abs, "Neg": torch.neg, "Add": torch.add,
           "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div, "Identity": lambda x: x}  # float64 in, no attributes


def _f64(a) -> np.ndarray:
    a = np.asarray(a)
    return a.astype(np.float64) if a.dtype.kind == "f" or a.dtype.kind not in "iub" else a


class _Evaluator:
    def __init__(self, g: Graph, opset: int):
        self.g, self.opset = g, opset
        self.known = g.meta.get("onnx_known", {})
        self.values: dict[int, torch.Tensor | np.ndarray] = {}
        self.runs: dict[tuple, list] = {}

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        needed: set[int] = set()
        stack = list(self.g.outputs)
        while stack:
            n = stack.pop()
            if n.id not in needed:
                needed.add(n.id)
                stack.extend(n.inputs)
        for n in self.g.nodes:
            if n.id in needed:
                self.values[n.id] = self.evaluate(n, feeds)
        return [np.asarray(self.as_numpy(self.values[o.id])) for o in self.g.outputs]

    @staticmethod
    def as_numpy(v):
        return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)

    def evaluate(self, n: Node, feeds):
        if isinstance(n.op, Input):
            return torch.from_numpy(_f64(feeds[n.origin.tensor]))
        if isinstance(n.op, Opaque):
            if n.op.value is not None:
                return n.op.value.double() if n.op.value.is_floating_point() else n.op.value
            return self.opaque(n)
        xs = [self.values[i.id] for i in n.inputs]
        xs = [x if isinstance(x, torch.Tensor) else torch.from_numpy(_f64(x)) for x in xs]
        return n.op.evaluate(*xs)

    def opaque(self, n: Node):
        o: OnnxOrigin = n.origin
        if o is None or o.node is None or o.node.domain not in ("", "ai.onnx", None):
            raise ReparamError(f"'{n.name}' ({n.op.what}) has no float64 reference")
        data = {name: self.as_numpy(self.values[i.id]) for name, i in zip(o.inputs, n.inputs)}
        key = (id(o.node), tuple(i.id for i in n.inputs))
        proto = self.g.meta.get("onnx_protos", {}).get(id(o.node))
        if proto is not None:
            if key not in self.runs:
                self.runs[key] = self.control_flow(n, o, proto, data)
            out = np.asarray(self.runs[key][o.tensor])
            return torch.from_numpy(out) if out.dtype.kind in "fiub" else out
        if key not in self.runs:
            feeds = {}
            for t in o.node.inputs:
                if not t.name:
                    continue
                if isinstance(t, gs.Constant):
                    feeds[t.name] = _f64(_array(t))
                elif t.name in data:
                    feeds[t.name] = _f64(data[t.name])
                elif t.name in self.known:
                    feeds[t.name] = _f64(self.known[t.name])
                else:
                    raise ReparamError(f"'{n.name}': input '{t.name}' is not available for the float64 check")
            xs = [feeds.get(t.name) for t in o.node.inputs]
            direct = _DIRECT.get(o.node.op)
            if direct is not None and not o.node.attrs and all(x is not None and x.dtype == np.float64 for x in xs):
                self.runs[key] = [direct(*[torch.from_numpy(x) for x in xs]).numpy()]
            else:
                cache = self.g.meta.setdefault("onnx_reference", {})
                if id(o.node) not in cache:
                    cache[id(o.node)] = node_reference(node_proto(o.node, self.opset), self.opset)
                self.runs[key] = cache[id(o.node)](feeds)
        out = np.asarray(self.runs[key][o.index])
        return torch.from_numpy(out) if out.dtype.kind in "fiub" else out

    def control_flow(self, n: Node, o: OnnxOrigin, proto: onnx.NodeProto, data) -> dict[str, np.ndarray]:
        """A node with subgraphs, run as a model whose inputs are the node's inputs and the outer names its
        subgraphs read (``onnx.reference`` resolves those from the enclosing scope)."""
        from onnx import helper
        from onnx.reference import ReferenceEvaluator

        initializers = self.g.meta.get("onnx_initializers", {})
        feeds = {}
        for t in [t.name for t in o.node.inputs if t.name] + list(o.outer):
            if t in feeds:
                continue
            c = next((x for x in o.node.inputs if x.name == t and isinstance(x, gs.Constant)), None)
            if c is not None:
                feeds[t] = _f64(_array(c))
            elif t in data:
                feeds[t] = _f64(data[t])
            elif t in self.known:
                feeds[t] = _f64(self.known[t])
            elif isinstance(initializers.get(t), onnx.TensorProto):
                feeds[t] = _f64(numpy_helper.to_array(initializers[t]))
            else:
                raise ReparamError(f"'{n.name}': input '{t}' is not available for the float64 check")
        inputs = [helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(v.dtype), None)
                  for t, v in feeds.items()]
        outputs = [helper.make_empty_tensor_value_info(t) for t in proto.output if t]
        graph = helper.make_graph([proto], "control_flow", inputs, outputs)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        results = ReferenceEvaluator(model).run(None, feeds)
        return dict(zip([t for t in proto.output if t], results))


def evaluate_f64(g: Graph, feeds: dict[str, np.ndarray], opset: int) -> list[np.ndarray]:
    """The graph's outputs in float64 for ``feeds`` (by graph input name). Runs single-threaded: the ops are
    many and small (batch 1), where a thread pool costs more than it gives, and far more on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _Evaluator(g, opset).run(feeds)
    finally:
        torch.set_num_threads(threads)
