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
import torch.nn.functional as F
from onnx import numpy_helper

from reparam.errors import ReparamError
from reparam.core.ir import Graph, Node
from reparam.frontends.onnx.importer import OnnxOrigin, _array, node_proto, node_reference
from reparam.core.ops import Input, Opaque, pool_len


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
            pooled = _pool(o.node, xs[0]) if o.node.op in ("MaxPool", "AveragePool") and xs else None
            if pooled is not None:
                self.runs[key] = [pooled.numpy(), None]
            elif direct is not None and not o.node.attrs and all(x is not None and x.dtype == np.float64 for x in xs):
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


def _pool(node: gs.Node, x: np.ndarray | None) -> torch.Tensor | None:
    """MaxPool / AveragePool (output 0) in float64 as ONNX Runtime computes it, or None to leave the node to
    ``onnx.reference`` (whose AveragePool is wrong in ceil mode: it averages the wrong windows).

    The input is padded explicitly, at the end by as much more as the ceil mode's last partial window overhangs
    (:func:`reparam.core.ops.pool_len`: a window starting in the right padding is dropped), with −∞ for a max and
    zeros for an average, whose divisor counts the input (and the pads with ``count_include_pad``), never the
    overhang. Explicit pads only, each smaller than the window."""
    a = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in node.attrs.items()}
    ks = list(a.get("kernel_shape") or [])
    nd = len(ks)
    if (x is None or x.dtype != np.float64 or not nd or x.ndim != nd + 2 or a.get("auto_pad", "NOTSET") != "NOTSET"
            or (len(node.outputs) > 1 and node.outputs[1].name) or a.get("storage_order", 0) or nd > 3):
        return None
    strides = list(a.get("strides") or [1] * nd)
    dilations = list(a.get("dilations") or [1] * nd)
    pads = list(a.get("pads") or [0] * (2 * nd))
    extents = [d * (k - 1) + 1 for d, k in zip(dilations, ks)]
    if node.op == "AveragePool" and any(d != 1 for d in dilations):
        return None
    if any(p >= e for p, e in zip(pads, extents + extents)):
        return None
    ceil = bool(a.get("ceil_mode", 0))
    sizes = x.shape[2:]
    outs = [pool_len(n, pads[i], pads[i + nd], extents[i], strides[i], ceil) for i, n in enumerate(sizes)]
    over = [max((o - 1) * s + e - (n + pads[i] + pads[i + nd]), 0)
            for i, (o, s, e, n) in enumerate(zip(outs, strides, extents, sizes))]
    t = torch.from_numpy(x)
    widths = [w for i in reversed(range(nd)) for w in (pads[i], pads[i + nd] + over[i])]
    if node.op == "MaxPool":
        padded = F.pad(t, widths, value=float("-inf"))
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
        y = fn(padded, ks, strides, 0, dilations)
        if bool(torch.isinf(y).any()) and not bool(torch.isinf(t).any()):
            return None  # a dilated window that sees padding only: ONNX Runtime gives its dtype's lowest value
    else:
        ones = torch.ones((1, 1, *sizes), dtype=torch.float64)
        if a.get("count_include_pad", 0):
            ones = F.pad(ones, [w for i in reversed(range(nd)) for w in (pads[i], pads[i + nd])], value=1.0)
            ones = F.pad(ones, [w for i in reversed(range(nd)) for w in (0, over[i])])
        else:
            ones = F.pad(ones, widths)
        fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
        y = fn(F.pad(t, widths), ks, strides) / fn(ones, ks, strides)
    return y if tuple(y.shape[2:]) == tuple(outs) else None


def evaluate_f64(g: Graph, feeds: dict[str, np.ndarray], opset: int) -> list[np.ndarray]:
    """The graph's outputs in float64 for ``feeds`` (by graph input name). Runs single-threaded: the ops are
    many and small (batch 1), where a thread pool costs more than it gives, and far more on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _Evaluator(g, opset).run(feeds)
    finally:
        torch.set_num_threads(threads)
