"""ONNX → IR: see each onnx-graphsurgeon node as a vocabulary op (or as opaque, kept exactly as it was).

Recognized (default domain): Conv (groups, dilations, strides, asymmetric pads, auto_pad), inference
BatchNormalization, Add/Sub (two data inputs → Sum; a per-axis constant → Affine), Mul/Div by a
constant, Neg, Concat, Split, single-axis unit-step Slice, Transpose (as Permute), Identity, inference Dropout, constant-zero
Pad, AveragePool, GlobalAveragePool, ReduceMean, Flatten(axis=1), a Reshape merging one run of axes (as Flatten), Gemm and MatMul with constant weights.
Subgraphs ONNX Runtime fuses into one kernel (the erf GELU) stay opaque.
Control-flow nodes (If/Loop/Scan, any node with a graph attribute) are opaque and their subgraphs are
kept untouched; every outer tensor a subgraph reads by name (through nested subgraphs too) counts as an
input of the node, for the order and for consumer counts, so no rewrite absorbs a value a subgraph reads.
Constant nodes, and nodes whose inputs are all constants (shape arithmetic on static dimensions
included), become Opaque nodes carrying their value. Shapes come from ONNX shape inference on a copy
of the model whose dynamic input dimensions were fixed; decisions that must hold for every input size
(Split/Slice bounds, SAME padding, folded Shape values) only use dimensions static in the original.

Every recognizer, built-in or a user's, sits in :mod:`reparam.core.vocabulary` by (domain, op type);
:class:`OnnxImporter` is what a recognizer gets as ``ctx``: ``const``, ``is_data``, ``shape``, ``static_dim``,
``dtype``, ``attr``, ``auto_pads``, ``only_output``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from reparam.math import kernels
from reparam.core import vocabulary as vocab
import reparam.rules  # noqa: F401  (the built-in op kinds beyond the core vocabulary register themselves)
from reparam.errors import ReparamError
from reparam.core.ir import Graph, Node
from reparam.frontends.onnx.shapes import Shape, infer, value_infos, with_known
from reparam.core.ops import (Affine, AvgPool, Cat, Conv, Flatten, Identity, Input, Linear, Mean, Opaque, Pad, Permute,
                              Slice, Sum, output_shape, per_axis)

ONNX_TO_TORCH = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16,
                 onnx.TensorProto.BFLOAT16: torch.bfloat16, onnx.TensorProto.DOUBLE: torch.float64}
_NOT_FOLDED = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
               "Bernoulli", "If", "Loop", "Scan"}
_FOLD_LIMIT = 1 << 22  # elements: larger constant computations are left to the runtime


@dataclass
class OnnxOrigin:
    """Where an unchanged IR node came from: output ``index`` of ``node``; ``inputs`` are the names of
    the original tensors the IR inputs stand for (in order)."""

    node: gs.Node | None
    index: int
    inputs: list[str] = field(default_factory=list)
    tensor: str = ""  # the original output tensor's name
    outer: tuple[str, ...] = ()  # outer-scope names the node's subgraphs read (data ones are also in ``inputs``)


# --- constants ---------------------------------------------------------------------------------
def _array(t: gs.Constant) -> np.ndarray:
    v = t.values
    return np.asarray(v.load() if hasattr(v, "load") else v)


def _f64(a) -> torch.Tensor | None:
    if a is None:
        return None
    a = np.asarray(a)
    if a.dtype.kind not in "fiub":  # bfloat16 and friends
        a = a.astype(np.float32)
    return torch.from_numpy(np.array(a, dtype=np.float64))


def _held(a) -> torch.Tensor | None:
    """A floating-point initializer as a tensor in its own dtype, sharing the array's memory (the weights of
    the ops that hold the model's tensors as they are); anything else as ``_f64`` reads it."""
    if a is None:
        return None
    a = np.asarray(a)
    if a.dtype not in (np.float16, np.float32, np.float64):
        return _f64(a)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs held by ``node``'s attributes (If branches, Loop/Scan bodies, any GRAPH(S) attribute)."""
    out: list[onnx.GraphProto] = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def outer_reads(node: onnx.NodeProto) -> list[str]:
    """The names ``node``'s subgraphs read from the scope around ``node``, recursively through nested
    subgraphs: used (as a node input or a graph output) and not defined in the subgraph (as its input,
    initializer or a node output). In first-use order."""
    found: dict[str, None] = {}
    for g in subgraphs(node):
        found.update(dict.fromkeys(_free(g)))
    return list(found)


def _free(g: onnx.GraphProto) -> list[str]:
    defined = {i.name for i in g.input} | {i.name for i in g.initializer} | {
        s.values.name for s in g.sparse_initializer} | {o for n in g.node for o in n.output if o}
    used: dict[str, None] = {}
    for n in g.node:
        used.update(dict.fromkeys(i for i in n.input if i))
        for s in subgraphs(n):
            used.update(dict.fromkeys(_free(s)))
    used.update(dict.fromkeys(o.name for o in g.output if o.name))
    return [name for name in used if name not in defined]


def subgraph_names(node: onnx.NodeProto) -> set[str]:
    """Every value name appearing anywhere inside ``node``'s subgraphs (so new outer names avoid them)."""
    names: set[str] = set()
    for g in subgraphs(node):
        names |= {i.name for i in g.input} | {o.name for o in g.output} | {i.name for i in g.initializer} | {
            s.values.name for s in g.sparse_initializer}
        for n in g.node:
            names |= set(n.input) | set(n.output)
            names |= subgraph_names(n)
    names.discard("")
    return names


def node_proto(n: gs.Node, opset: int) -> onnx.NodeProto:
    """The NodeProto of one onnx-graphsurgeon node (through the public ``gs.export_onnx``)."""
    return gs.export_onnx(gs.Graph(nodes=[n], opset=opset), do_type_check=False).graph.node[0]


def node_reference(proto: onnx.NodeProto, opset: int):
    """``feeds → outputs`` (aligned with ``proto.output``, None for an omitted one) of one node in
    ``onnx.reference`` at the model's opset. The node runs inside a one-node model: given a bare NodeProto,
    ``ReferenceEvaluator`` ignores ``opsets`` and runs the newest version of the op (a Squeeze of opset 11 would
    drop its ``axes`` attribute and squeeze every unit dim)."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    domain = proto.domain or ""
    graph = helper.make_graph([proto], "node", [helper.make_empty_tensor_value_info(i) for i in
                                                dict.fromkeys(proto.input) if i],
                              [helper.make_empty_tensor_value_info(o) for o in proto.output if o])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(domain, opset)])
    evaluator = ReferenceEvaluator(model)

    def run(feeds: dict) -> list:
        results = iter(evaluator.run(None, feeds))
        return [next(results) if o else None for o in proto.output]
    return run


def _attr(node: gs.Node, name: str, default=None):
    v = node.attrs.get(name, default)
    return v.decode() if isinstance(v, bytes) else v


class OnnxImporter:
    """The walk over an ONNX graph; a recognizer's ``ctx``."""

    attr = staticmethod(_attr)

    def __init__(self, model: onnx.ModelProto, shaped: onnx.ModelProto):
        self.model = model
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.gs = gs.import_onnx(model)
        self.protos: dict[int, onnx.NodeProto] = {}  # control-flow nodes: their original NodeProto
        self.outer: dict[int, list[str]] = {}  # control-flow nodes: the outer names their subgraphs read
        protos = list(model.graph.node)
        if any(subgraphs(p) for p in protos):
            if len(protos) != len(self.gs.nodes) or any(
                    p.op_type != n.op or list(p.output) != [t.name for t in n.outputs] for p, n in
                    zip(protos, self.gs.nodes)):
                raise ReparamError("internal error: onnx-graphsurgeon's nodes do not match the model's; please "
                                   "report it")
            for p, n in zip(protos, self.gs.nodes):
                if subgraphs(p):
                    self.protos[id(n)] = p
                    self.outer[id(n)] = outer_reads(p)
        self.initializers = {i.name: i for i in model.graph.initializer}
        self.initializers.update((s.values.name, s) for s in model.graph.sparse_initializer)
        self.graph = Graph()
        self.env: dict[str, Node] = {}
        self.known: dict[str, np.ndarray] = {}
        self.partial: dict[str, list] = {}  # Shape outputs with some dynamic dims
        self.arrays: dict[int, np.ndarray] = {}
        self.static, _ = value_infos(infer(model))  # the original's own (None = dynamic)
        for rounds in range(3):  # folded shape arithmetic lets inference see further, which may fold more
            before = len(self.known)
            for n in self.gs.nodes:
                if not all(t.name in self.known for t in n.outputs if t.name):
                    self.fold(n)
            if len(self.known) == before and rounds:
                break
            self.static, _ = value_infos(infer(with_known(model, self.known)))
        self.shapes, self.types = value_infos(infer(with_known(shaped, self.known)))  # fixed input dims
        self.sealed = runtime_fused(self.gs, self.const)
        self.consumers: dict[str, int] = {}
        for n in self.gs.nodes:
            for t in n.inputs:
                self.consumers[t.name] = self.consumers.get(t.name, 0) + 1
            for name in self.outer.get(id(n), ()):  # read by a subgraph: as real a use as any
                self.consumers[name] = self.consumers.get(name, 0) + 1
        for t in self.gs.outputs:
            self.consumers[t.name] = self.consumers.get(t.name, 0) + 1

    # --- helpers
    def shape(self, name: str) -> Shape | None:
        s = self.shapes.get(name)
        return None if s is None or any(d is None for d in s) else tuple(s)

    def static_dim(self, name: str, axis: int) -> int | None:
        s = self.static.get(name)
        return None if s is None or axis >= len(s) else s[axis]

    def dtype(self, name: str) -> torch.dtype | None:
        return ONNX_TO_TORCH.get(self.types.get(name))

    def const(self, t: gs.Tensor) -> np.ndarray | None:
        if isinstance(t, gs.Constant):
            if id(t) not in self.arrays:  # large initializers load lazily: once
                self.arrays[id(t)] = _array(t)
            return self.arrays[id(t)]
        return self.known.get(t.name)

    def is_data(self, t: gs.Tensor) -> bool:
        return isinstance(t, gs.Variable) and t.name != "" and t.name not in self.known

    def used(self, t: gs.Tensor) -> bool:
        return self.consumers.get(t.name, 0) > 0

    def only_output(self, n: gs.Node, k: int) -> bool:
        """True for output 0 of a node whose other outputs nobody reads (BN statistics, a dropout mask)."""
        return k == 0 and not any(self.used(t) for t in n.outputs[1:])

    # --- the walk
    def run(self) -> Graph:
        for k, t in enumerate(self.gs.inputs):
            if isinstance(t, gs.Constant):
                continue
            node = Node(Input(k), name=t.name, shape=self.shape(t.name), dtype=self.dtype(t.name),
                        origin=OnnxOrigin(None, 0, [], t.name))
            self.graph.add(node)
            self.env[t.name] = node
        for n in self.gs.nodes:
            for k, out in enumerate(n.outputs):
                self.graph.add(self.recognize(n, k, out))
        missing = [t.name for t in self.gs.outputs if t.name not in self.env]
        if missing:
            raise ReparamError(f"graph output(s) {missing} are not computed by any node (constant outputs are "
                               f"not supported)")
        self.graph.outputs = [self.env[t.name] for t in self.gs.outputs]
        self.graph.meta["onnx_outputs"] = [t.name for t in self.gs.outputs]
        self.graph.meta["onnx_known"] = self.known
        self.graph.meta["onnx_protos"] = self.protos
        self.graph.meta["onnx_initializers"] = self.initializers
        return self.graph

    def node(self, op, n: gs.Node, k: int, data: list[gs.Tensor]) -> Node:
        out = n.outputs[k]
        names = [t.name for t in data]
        outer = tuple(self.outer.get(id(n), ()))
        for name in outer:  # what the subgraphs read: inputs of the node like the explicit ones
            if name in self.env:
                if name not in names:
                    names.append(name)
            elif name not in self.initializers:
                raise ReparamError(f"node '{n.name or out.name}' ({n.op}): a subgraph reads '{name}', which the "
                                   f"graph does not compute before the node (the model is not topologically sorted "
                                   f"or the name is undefined)")
        shape = self.shape(out.name)
        value = getattr(op, "value", None)
        if shape is None and isinstance(value, torch.Tensor):
            shape = tuple(value.shape)
        if shape is None and not isinstance(op, Opaque):
            shape = output_shape(op, [self.env[t.name].shape for t in data])
        node = Node(op, [self.env[name] for name in names], name=n.name or out.name, shape=shape,
                    dtype=self.dtype(out.name), origin=OnnxOrigin(n, k, names, out.name, outer))
        self.env[out.name] = node
        return node

    def recognize(self, n: gs.Node, k: int, out: gs.Variable) -> Node:
        data = [t for t in n.inputs if isinstance(t, gs.Variable) and t.name in self.env]
        if out.name in self.known:
            return self.node(Opaque(n.op, torch.from_numpy(np.array(self.known[out.name]))), n, k, data)
        found = None
        if id(n) not in self.protos:
            try:
                found = self.op(n, k)
            except (TypeError, ValueError, IndexError, KeyError, ZeroDivisionError):
                found = None
        if found is None:
            return self.node(Opaque(n.op), n, k, data)
        op, inputs = found
        return self.node(op, n, k, inputs)

    # --- constant folding
    def fold(self, n: gs.Node) -> None:
        if n.op == "Constant":
            value = n.attrs.get("value")
            if isinstance(value, gs.Constant):
                self.known[n.outputs[0].name] = _array(value)
            return
        if n.domain not in ("", "ai.onnx", None) or n.op in _NOT_FOLDED or id(n) in self.protos:
            return
        if n.op == "Shape":
            self.fold_shape(n)
            return
        if n.op == "Gather" and n.inputs[0].name in self.partial:
            idx = self.const(n.inputs[1])
            dims = self.partial[n.inputs[0].name]
            if idx is not None and _attr(n, "axis", 0) == 0:
                picked = np.asarray(np.asarray(dims, dtype=object)[np.asarray(idx)], dtype=object)
                if all(d is not None for d in picked.ravel()):
                    self.known[n.outputs[0].name] = picked.astype(np.int64)
            return
        inputs = [t for t in n.inputs if t.name != ""]
        if not inputs or any(self.const(t) is None for t in inputs):
            return
        if sum(np.asarray(self.const(t)).size for t in inputs) > _FOLD_LIMIT:
            return
        try:
            feeds = {t.name: self.const(t) for t in inputs}
            results = node_reference(node_proto(n, self.opset), self.opset)(feeds)
        except Exception:
            return
        for t, v in zip(n.outputs, results):
            if t.name:
                self.known[t.name] = np.asarray(v)

    def fold_shape(self, n: gs.Node) -> None:
        dims = self.static.get(n.inputs[0].name)
        if dims is None:
            return
        start, end = _attr(n, "start", 0), _attr(n, "end", None)
        dims = list(dims)[start:end]
        if all(d is not None for d in dims):
            self.known[n.outputs[0].name] = np.asarray(dims, dtype=np.int64)
        else:
            self.partial[n.outputs[0].name] = dims

    # --- recognizers: (op, data inputs) or None
    def op(self, n: gs.Node, k: int):
        fn = vocab.onnx_recognizer(n.domain, n.op)
        if fn is None or id(n) in self.sealed:
            return None
        return fn(self, n, k)

    def op_Conv(self, n):
        x, w = n.inputs[0], self.const(n.inputs[1])
        b = self.const(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2].name else None
        if not self.is_data(x) or w is None or (len(n.inputs) > 2 and n.inputs[2].name and b is None):
            return None
        nd = w.ndim - 2
        stride = tuple(_attr(n, "strides", [1] * nd))
        dilation = tuple(_attr(n, "dilations", [1] * nd))
        ks = _attr(n, "kernel_shape")
        if ks is not None and tuple(ks) != tuple(w.shape[2:]):
            return None
        pads = self.auto_pads(n, x.name, stride, [d * (kk - 1) + 1 for d, kk in zip(dilation, w.shape[2:])])
        if pads is None:
            return None
        return Conv(_held(w), _held(b), stride, pads, dilation, int(_attr(n, "group", 1)), "zeros",
                    dtype=self.dtype(x.name)), [x]

    def auto_pads(self, n, x: str, stride, extent):
        nd = len(stride)
        mode = _attr(n, "auto_pad", "NOTSET")
        if mode == "NOTSET":
            p = list(_attr(n, "pads", [0] * (2 * nd)))
            return tuple((p[i], p[i + nd]) for i in range(nd))
        if mode == "VALID":
            return ((0, 0),) * nd
        if mode not in ("SAME_UPPER", "SAME_LOWER"):
            return None
        out = []
        for i, (s, e) in enumerate(zip(stride, extent)):
            size = self.static_dim(x, 2 + i)
            if size is None and s != 1:
                return None  # the padding would depend on the input size
            total = e - 1 if s == 1 else max((-(-size // s) - 1) * s + e - size, 0)
            small = total // 2
            out.append((small, total - small) if mode == "SAME_UPPER" else (total - small, small))
        return tuple(out)

    def op_BatchNormalization(self, n):
        x = n.inputs[0]
        params = [self.const(t) for t in n.inputs[1:5]]
        if not self.is_data(x) or any(p is None for p in params) or _attr(n, "training_mode", 0):
            return None
        scale, bias, mean, var = params
        s, t = kernels.bn_scale_shift(_f64(mean), _f64(var), _f64(scale), _f64(bias), float(_attr(n, "epsilon", 1e-5)))
        return Affine(s, t, 1, dtype=self.dtype(x.name)), [x]

    def binary(self, n):
        a, b = n.inputs
        if self.is_data(a) and self.is_data(b):
            return a, b, None, None
        ca, cb = self.const(a), self.const(b)
        if (ca is None) == (cb is None):
            return None
        x, c = (a, cb) if ca is None else (b, ca)
        if not self.is_data(x) or self.dtype(x.name) is None:
            return None
        per_axis = _per_axis(c, self.shape(x.name), self.shape(n.outputs[0].name))
        if per_axis is None:
            return None
        return x, None, per_axis, x is a

    def op_Add(self, n, sign=1.0):
        found = self.binary(n)
        if found is None:
            return None
        x, y, per_axis, x_first = found
        if y is not None:
            return Sum((1.0, sign)), [x, y]
        values, axis = per_axis
        one = torch.ones((), dtype=torch.float64)
        meta = dict(dtype=self.dtype(x.name))
        if x_first:
            return Affine(one, sign * values, axis, **meta), [x]
        return Affine(sign * one, values, axis, **meta), [x]

    def op_Sub(self, n):
        return self.op_Add(n, -1.0)

    def op_Mul(self, n, divide=False):
        found = self.binary(n)
        if found is None or found[1] is not None:
            return None
        x, _, (values, axis), x_first = found
        if divide:
            if not x_first or bool((values == 0).any()):
                return None
            values = 1.0 / values
        return Affine(values, None, axis, dtype=self.dtype(x.name)), [x]

    def op_Div(self, n):
        return self.op_Mul(n, divide=True)

    def op_Neg(self, n):
        x = n.inputs[0]
        if not self.is_data(x):
            return None
        return Affine(torch.tensor(-1.0, dtype=torch.float64), None, None, dtype=self.dtype(x.name)), [x]

    def op_Concat(self, n):
        if not n.inputs or not all(self.is_data(t) for t in n.inputs):
            return None
        rank = len(self.shapes.get(n.outputs[0].name) or ()) or None
        axis = int(_attr(n, "axis"))
        return Cat(axis % rank if rank else axis), list(n.inputs)

    def op_Split(self, n, k):
        x = n.inputs[0]
        s = self.static.get(x.name)
        if not self.is_data(x) or s is None:
            return None
        axis = int(_attr(n, "axis", 0)) % len(s)
        total = s[axis]
        if total is None:
            return None
        sizes = None
        if len(n.inputs) > 1 and n.inputs[1].name:
            sizes = self.const(n.inputs[1])
            if sizes is None:
                return None
        elif _attr(n, "split") is not None:
            sizes = _attr(n, "split")
        elif _attr(n, "num_outputs") is not None:
            step = -(-total // int(_attr(n, "num_outputs")))
            sizes = [min(step, total - j) for j in range(0, total, step)]
        else:
            if total % len(n.outputs):
                return None
            sizes = [total // len(n.outputs)] * len(n.outputs)
        sizes = [int(v) for v in np.ravel(sizes)]
        if len(sizes) != len(n.outputs) or sum(sizes) != total:
            return None
        start = sum(sizes[:k])
        return Slice(axis, start, start + sizes[k]), [x]

    def op_Slice(self, n):
        x = n.inputs[0]
        vals = [self.const(t) if len(n.inputs) > j and n.inputs[j].name else None for j, t in
                zip(range(1, 5), list(n.inputs[1:]) + [None] * 4)]
        starts, ends, axes, steps = vals
        s = self.static.get(x.name)
        if not self.is_data(x) or starts is None or ends is None or s is None:
            return None
        if len(n.inputs) > 3 and n.inputs[3].name and axes is None:
            return None
        if len(n.inputs) > 4 and n.inputs[4].name and (steps is None or not (np.asarray(steps) == 1).all()):
            return None
        starts, ends = np.ravel(starts), np.ravel(ends)
        axes = np.ravel(axes) if axes is not None else np.arange(len(starts))
        if len(starts) != 1 or len(ends) != 1 or len(axes) != 1:
            return None
        axis = int(axes[0]) % len(s)
        dim = s[axis]
        if dim is None:
            return None

        def clamp(v):
            v = int(max(min(int(v), 2 ** 62), -(2 ** 62)))
            v = v + dim if v < 0 else v
            return max(0, min(v, dim))

        start, stop = clamp(starts[0]), clamp(ends[0])
        return Slice(axis, start, max(start, stop)), [x]

    def op_Transpose(self, n):
        """Transpose(perm) as Permute(perm): output axis k is input axis perm[k] (no perm: the axes reversed)."""
        x = n.inputs[0]
        rank = len(self.shapes.get(x.name) or ()) or None
        if not self.is_data(x) or rank is None:
            return None
        perm = _attr(n, "perm")
        dims = tuple(int(d) % rank for d in perm) if perm is not None else tuple(reversed(range(rank)))
        if sorted(dims) != list(range(rank)):
            return None
        return Permute(dims), [x]

    def op_Identity(self, n):
        return (Identity(), [n.inputs[0]]) if self.is_data(n.inputs[0]) else None

    def op_Dropout(self, n):
        if len(n.inputs) > 2 and n.inputs[2].name:
            mode = self.const(n.inputs[2])
            if mode is None or bool(np.ravel(mode)[0]):
                return None
        return self.op_Identity(n)

    def op_Pad(self, n):
        x = n.inputs[0]
        rank = len(self.shapes.get(x.name) or ()) or None
        if not self.is_data(x) or rank is None or _attr(n, "mode", "constant") != "constant":
            return None
        if self.opset < 11:
            pads, value, axes = _attr(n, "pads"), _attr(n, "value", 0.0), None
        else:
            pads = self.const(n.inputs[1])
            value = self.const(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2].name else 0.0
            axes = self.const(n.inputs[3]) if len(n.inputs) > 3 and n.inputs[3].name else None
            if len(n.inputs) > 3 and n.inputs[3].name and axes is None:
                return None
        if pads is None or value is None or float(np.ravel(value)[0] if np.size(value) else 0.0) != 0.0:
            return None
        pads = [int(p) for p in np.ravel(pads)]
        axes = [int(a) % rank for a in np.ravel(axes)] if axes is not None else list(range(rank))
        half = len(pads) // 2
        per_axis = {a: (pads[j], pads[j + half]) for j, a in enumerate(axes)}
        pairs = [per_axis.get(a, (0, 0)) for a in range(rank)]
        if any(lo < 0 or hi < 0 for lo, hi in pairs):
            return None
        first = next((a for a, p in enumerate(pairs) if p != (0, 0)), None)
        if first is None:
            return Identity(), [x]
        return Pad(tuple(pairs[first:])), [x]

    def op_AveragePool(self, n):
        """AveragePool with symmetric pads of at most half the kernel (what AvgPool's torch semantics take),
        ceil_mode included: onnxruntime sizes and divides its windows as torch does (tests/test_onnx_pools.py)."""
        x = n.inputs[0]
        ks = tuple(_attr(n, "kernel_shape"))
        nd = len(ks)
        if not self.is_data(x) or any(d != 1 for d in _attr(n, "dilations", [1] * nd)):
            return None
        ceil = bool(_attr(n, "ceil_mode", 0))
        if ceil and _attr(n, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return None
        pads = self.auto_pads(n, x.name, tuple(_attr(n, "strides", [1] * nd)), ks)
        if pads is None or any(lo != hi or 2 * lo > k for (lo, hi), k in zip(pads, ks)):
            return None
        return AvgPool(ks, tuple(_attr(n, "strides", [1] * nd)), tuple(lo for lo, _ in pads), ceil,
                       bool(_attr(n, "count_include_pad", 0))), [x]

    def op_GlobalAveragePool(self, n):
        x = n.inputs[0]
        rank = len(self.shapes.get(x.name) or ()) or None
        return (Mean(tuple(range(2, rank)), keepdim=True), [x]) if self.is_data(x) and rank else None

    def op_ReduceMean(self, n):
        x = n.inputs[0]
        rank = len(self.shapes.get(x.name) or ()) or None
        if not self.is_data(x) or rank is None:
            return None
        if self.opset >= 18:
            axes = self.const(n.inputs[1]) if len(n.inputs) > 1 and n.inputs[1].name else None
            if len(n.inputs) > 1 and n.inputs[1].name and axes is None:
                return None
        else:
            axes = _attr(n, "axes")
        if axes is None or np.size(axes) == 0:
            if _attr(n, "noop_with_empty_axes", 0):
                return Identity(), [x]
            axes = range(rank)
        dims = tuple(sorted({int(a) % rank for a in np.ravel(axes)}))
        return Mean(dims, bool(_attr(n, "keepdims", 1))), [x]

    def op_Flatten(self, n):
        x = n.inputs[0]
        rank = len(self.shapes.get(x.name) or ()) or None
        if not self.is_data(x) or rank is None or int(_attr(n, "axis", 1)) % rank != 1:
            return None
        return Flatten(1, -1), [x]

    def op_Reshape(self, n):
        """A Reshape that merges one run of axes [s, e] and keeps every other axis is Flatten(s, e) (as the ATen
        view is), where that holds for every input size: the merged axes are static in the original, and each
        kept axis is copied (0) or given as its static size; the merged one is -1 or the product. A Reshape
        that changes nothing is Identity."""
        x = n.inputs[0]
        target = self.const(n.inputs[1]) if len(n.inputs) > 1 else None
        src, dst = self.shape(x.name), self.shape(n.outputs[0].name)
        static = self.static.get(x.name)
        if not self.is_data(x) or target is None or src is None or dst is None or static is None:
            return None
        target = [int(v) for v in np.ravel(target)]
        if len(static) != len(src) or len(target) != len(dst) or (_attr(n, "allowzero", 0) and 0 in target):
            return None

        def kept(k: int, j: int) -> bool:  # output axis j copies input axis k for every input size
            return target[j] == 0 and j == k or (static[k] is not None and target[j] == static[k])
        if tuple(src) == tuple(dst):
            return (Identity(), [x]) if all(kept(k, k) or (target[k] == -1 and static[k] is not None)
                                            for k in range(len(src))) else None
        for s in range(len(src)):
            for e in range(s + 1, len(src)):
                if tuple(src[:s]) + (int(np.prod(src[s:e + 1])),) + tuple(src[e + 1:]) != tuple(dst):
                    continue
                merged = static[s:e + 1]
                if any(d is None for d in merged) or target[s] not in (-1, int(np.prod(merged))):
                    return None
                if all(kept(k, k) for k in range(s)) and all(kept(k, k - (e - s)) for k in range(e + 1, len(src))):
                    return Flatten(s, e), [x]
                return None
        return None

    def op_Gemm(self, n):
        x, b = n.inputs[0], self.const(n.inputs[1])
        c = self.const(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2].name else None
        if not self.is_data(x) or b is None or _attr(n, "transA", 0) or (len(n.inputs) > 2 and n.inputs[2].name
                                                                         and c is None):
            return None
        w = _f64(b) * float(_attr(n, "alpha", 1.0))
        w = w if _attr(n, "transB", 0) else w.T
        bias = None
        if c is not None:
            c = _f64(c) * float(_attr(n, "beta", 1.0))
            if c.numel() == 1:
                c = c.reshape(()).expand(w.shape[0])
            elif c.shape not in ((w.shape[0],), (1, w.shape[0])):
                return None
            bias = c.reshape(-1).clone()
        return Linear(w.contiguous(), bias, dtype=self.dtype(x.name)), [x]

    def op_MatMul(self, n):
        x, b = n.inputs[0], self.const(n.inputs[1])
        rank = len(self.shapes.get(x.name) or ()) or None
        if not self.is_data(x) or b is None or b.ndim != 2 or rank is None or rank < 2:
            return None
        return Linear(_f64(b).T.contiguous(), None, dtype=self.dtype(x.name)), [x]



def _first_output(method):
    """A recognizer of output 0 of a node (its other outputs unread) from an ``OnnxImporter.op_*`` method."""
    def recognize(ctx: OnnxImporter, n: gs.Node, k: int):
        return method(ctx, n) if ctx.only_output(n, k) else None
    return recognize


for _name in [a for a in vars(OnnxImporter) if a.startswith("op_") and a != "op_Split"]:  # the built-ins
    vocab.onnx_op(_name[3:], fn=_first_output(getattr(OnnxImporter, _name)))
vocab.onnx_op("Split", fn=OnnxImporter.op_Split)

def runtime_fused(graph: gs.Graph, const) -> set[int]:
    """Nodes of subgraphs ONNX Runtime fuses into one kernel, kept opaque so a rewrite (a scalar folded into
    the next conv) does not break that fusion: the erf GELU x·½·(1 + erf(x/√2)) in the orders torch emits."""
    users: dict[str, list[gs.Node]] = {}
    for n in graph.nodes:
        for t in n.inputs:
            users.setdefault(t.name, []).append(n)

    def scalar(n: gs.Node) -> bool:
        return n.op in ("Add", "Mul", "Div") and any(
            const(t) is not None and np.size(const(t)) == 1 for t in n.inputs)

    sealed: set[int] = set()
    for erf in graph.nodes:
        if erf.op != "Erf" or not erf.inputs[0].inputs:
            continue
        pre = erf.inputs[0].inputs[0]
        after = users.get(erf.outputs[0].name, [])
        if not (scalar(pre) and len(after) == 1 and after[0].op == "Add" and scalar(after[0])):
            continue
        x = next(t for t in pre.inputs if const(t) is None)
        group, frontier = [pre, erf, after[0]], [after[0]]
        for _ in range(2):  # the two products with x and ½, in either order
            frontier = [u for f in frontier for u in users.get(f.outputs[0].name, []) if u.op == "Mul"]
            group += frontier
            for m in frontier:  # ½·x computed first
                group += [t.inputs[0] for t in m.inputs if t.inputs and t.inputs[0].op == "Mul" and scalar(
                    t.inputs[0]) and any(i is x for i in t.inputs[0].inputs)]
        sealed.update(id(n) for n in group)
    return sealed


def _per_axis(c, shape: Shape | None, out_shape: Shape | None):
    """A constant broadcasting along at most one axis of ``shape`` without changing it: (values, axis)."""
    if shape is None or out_shape is None or tuple(shape) != tuple(out_shape):
        return None
    t = _f64(c)
    return per_axis(t, shape)


def import_onnx(model: onnx.ModelProto, shaped: onnx.ModelProto) -> Graph:
    """The IR of ``model``; ``shaped`` is the same model with fixed input dims, shape-inferred."""
    return OnnxImporter(model, shaped).run()
