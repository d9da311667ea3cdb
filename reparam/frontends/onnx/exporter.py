"""IR → ONNX: write the rewritten graph back through onnx-graphsurgeon.

Unchanged nodes are copied, never rebuilt: same op, name, domain, and their attributes taken from the
original NodeProto byte for byte (so attributes onnx-graphsurgeon cannot re-encode, such as an empty ``axes``
list, survive); only their inputs are re-pointed. A multi-output node is written once, however many of its
outputs the graph reads (an omitted optional input included). Values the graph made constant (Constant
nodes, shape arithmetic on static dims) are written as initializers, not nodes. IR versions below 4 require
every initializer to be a graph input: there new tensors are written as Constant nodes instead, so the
interface is unchanged.  new ops become Conv/Gemm/MatMul/Mul/Add/Sub/Concat/Slice/Pad/
AveragePool/ReduceMean/Flatten/Transpose nodes whose tensors live in NEW uniquely named initializers cast to
the op's dtype (an existing initializer is never edited: several nodes may share it). Graph inputs,
outputs (names, order, types), opset, IR version, producer, functions and metadata are the original's.

Control-flow nodes keep their original attributes (subgraphs included) byte for byte. Their subgraphs read
outer tensors by name, so each such tensor is written under its original name before the node: a new op
computing it takes the name, and a value that ended up under another name gets an Identity to it. A
name already bound to a different value is refused (never a model whose subgraph reads the wrong tensor).

How a new op is written is its op kind's ONNX emitter (:mod:`reparam.core.vocabulary`); :class:`OnnxExporter` is
the emitter's ``ctx``: ``node`` (a new node), ``const`` / ``ints`` (new initializers), ``deploy_dtype``,
``input_rank``, ``opset``.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from reparam.core import vocabulary as vocab
from reparam.core.checks import check_shapes, random_input
from reparam.errors import ExportError, ReparamError
from reparam.core.ir import Graph, Node
from reparam.frontends.onnx.importer import OnnxOrigin, subgraph_names
from reparam.core.ops import (Affine, AvgPool, Cat, Conv, Flatten, Identity, Input, Linear, Mean, Opaque, Pad, Permute,
                              Slice, Sum)

_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}
_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}  # of the self-check, by deploy dtype (else 1e-2)


def _run(model: onnx.ModelProto, feeds: dict) -> list:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _const_name_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._/:-" else "_" for c in name) or "fused"


class OnnxExporter:
    """The writer of an ONNX graph; an emitter's ``ctx``."""

    def __init__(self, g: Graph, model: onnx.ModelProto, self_check: bool = True):
        self.g, self.model, self.self_check = g, model, self_check
        self.probes: list[tuple[Node, list[gs.Tensor], gs.Tensor, list[gs.Node]]] = []
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        graph = model.graph
        self.taken: set[str] = {i.name for i in graph.initializer} | {i.name for i in graph.input} | \
            {o for n in graph.node for o in n.output} | {n.name for n in graph.node if n.name}
        for node in graph.node:  # a new outer name must not collide with (or be shadowed by) a subgraph's
            self.taken |= subgraph_names(node)
        self.claimed: set[str] = set()
        self.nodes: list[gs.Node] = []
        self.tensors: dict[int, gs.Tensor] = {}
        self.emitted: dict[tuple, list[gs.Variable]] = {}
        self.emitted_nodes: set[int] = set()
        self.want: dict[int, str] = {}
        self.original_of: dict[str, Node] = {}
        self.known = g.meta.get("onnx_known", {})
        self.protos: dict[int, onnx.NodeProto] = g.meta.get("onnx_protos", {})
        self.initializers = g.meta.get("onnx_initializers", {})
        self.restore: dict[int, onnx.NodeProto] = {}  # index in self.nodes -> original proto (its attributes)
        self.outer_constants: set[str] = set()  # outer initializers some kept subgraph reads
        self.reserved: dict[str, int] = {}  # names claimed ahead for this IR node's value
        self.renamed: dict[tuple[int, str], gs.Variable] = {}  # (IR node, name): an Identity writing it
        self.proto_of: dict[str, onnx.NodeProto] = {}  # first output name -> the original node, to copy
        for proto in graph.node:
            first = next((o for o in proto.output if o), None)
            if first is not None:
                self.proto_of[first] = proto
        self.interface = {i.name for i in graph.input} | {o.name for o in graph.output}
        for n in g.nodes:  # and what subgraphs read by name (onnx.checker wants those computed, not initializers)
            if isinstance(n.origin, OnnxOrigin):
                self.interface.update(n.origin.outer)
        self.ir_version = model.ir_version
        for n in g.nodes:
            o = n.origin
            if isinstance(o, OnnxOrigin) and o.tensor:
                self.original_of[o.tensor] = n

    # --- names
    def fresh(self, base: str) -> str:
        base = _const_name_safe(base)
        for k in range(1_000_000):
            name = base if k == 0 else f"{base}_{k}"
            if name not in self.taken and name not in self.claimed:
                self.claimed.add(name)
                return name
        raise RuntimeError("no free name")  # unreachable

    def const(self, base: str, values: np.ndarray | torch.Tensor, dtype: torch.dtype | None = None) -> gs.Constant:
        """A new initializer (never an existing one), cast once to ``dtype`` (the op's deploy dtype)."""
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu()
            if dtype == torch.bfloat16:
                import ml_dtypes  # numpy's bfloat16 (an onnx dependency)

                bf16 = values.to(torch.float32).numpy().astype(ml_dtypes.bfloat16)
                return gs.Constant(self.fresh(base), np.ascontiguousarray(bf16))
            values = values.to(dtype or torch.float32).numpy()
        return gs.Constant(self.fresh(base), np.ascontiguousarray(values))

    def ints(self, base: str, values) -> gs.Constant:
        return self.const(base, np.asarray(list(values), dtype=np.int64))

    # --- the walk
    def live(self) -> list[Node]:
        seen: set[int] = set()
        stack = list(self.g.outputs)
        while stack:
            n = stack.pop()
            if n.id not in seen:
                seen.add(n.id)
                stack.extend(n.inputs)
        return [n for n in self.g.nodes if n.id in seen]

    def run(self) -> onnx.ModelProto:
        names = self.g.meta["onnx_outputs"]
        for name, n in zip(names, self.g.outputs):
            o = n.origin
            if isinstance(o, OnnxOrigin) and o.node is not None and o.tensor == name:
                continue
            if o is None and n.id not in self.want and not isinstance(n.op, Identity):
                self.want[n.id] = name
                self.claimed.add(name)
            else:  # written through an Identity at the end (or before a subgraph reading it)
                self.claimed.add(name)
            self.reserved.setdefault(name, n.id)
        live = self.live()
        for n in live:  # a new op whose value a subgraph reads by name is written under that name
            o = n.origin
            if not isinstance(o, OnnxOrigin) or not o.outer:
                continue
            for name, src in zip(o.inputs, n.inputs):
                if name in o.outer and src.origin is None and src.id not in self.want and name not in self.claimed:
                    self.want[src.id] = name
                    self.claimed.add(name)
                    self.reserved[name] = src.id
        inputs = [self.emit(n) for n in self.g.nodes if isinstance(n.op, Input)]
        for n in live:
            self.emit(n)
        outputs = []
        for name, n in zip(names, self.g.outputs):
            t = self.renamed.get((n.id, name)) or self.tensors[n.id]
            if t.name != name:
                out = gs.Variable(name)
                self.nodes.append(gs.Node("Identity", self.fresh(f"{name}_identity"), inputs=[t], outputs=[out]))
                t = out
            outputs.append(t)
        if self.self_check:
            self.check_emitted()
        return self.finish(inputs, outputs)

    def finish(self, inputs, outputs) -> onnx.ModelProto:
        graph = gs.Graph(nodes=self.nodes, inputs=inputs, outputs=outputs, opset=self.opset)
        exported = gs.export_onnx(graph, do_type_check=False).graph
        for k, proto in self.restore.items():  # subgraphs exactly as they were
            node = exported.node[k]
            if node.op_type != proto.op_type:
                raise ReparamError("internal error: the exported nodes are out of step with the emitted ones; "
                                   "please report it")
            del node.attribute[:]
            node.attribute.extend(proto.attribute)
        result = onnx.ModelProto()
        result.CopyFrom(self.model)
        g = result.graph
        produced = {o for n in exported.node for o in n.output}
        keep_inits = {i.name for i in self.model.graph.input} | self.outer_constants
        inits = [i for i in self.model.graph.initializer if i.name in keep_inits]
        have = {i.name for i in inits}
        inits += [i for i in exported.initializer if i.name not in have]
        value_info = [vi for vi in self.model.graph.value_info if vi.name in produced]
        del g.node[:], g.initializer[:], g.value_info[:]
        if result.ir_version < 4:  # initializers must be graph inputs there: new tensors become Constant nodes
            listed = {i.name for i in self.model.graph.input}
            constants = [onnx.helper.make_node("Constant", [], [i.name], name=self.fresh(f"{i.name}_constant"),
                                               value=i) for i in inits if i.name not in listed]
            inits = [i for i in inits if i.name in listed]
            g.node.extend(constants)
        g.node.extend(exported.node)
        g.initializer.extend(inits)
        g.value_info.extend(value_info)
        return result

    def emit(self, n: Node) -> gs.Tensor:
        if n.id in self.tensors:
            return self.tensors[n.id]
        o = n.origin
        if isinstance(o, OnnxOrigin) and self.foldable(n, o):
            t = gs.Constant(o.tensor, np.asarray(self.known[o.tensor]))
        elif isinstance(o, OnnxOrigin):
            t = self.emit_original(n, o)
        else:
            xs = [self.emit(i) for i in n.inputs]
            before = len(self.nodes)
            t = self.emit_new(n, xs)
            if self.self_check and len(self.nodes) > before:
                self.probes.append((n, xs, t, self.nodes[before:]))
        self.tensors[n.id] = t
        return t

    def foldable(self, n: Node, o: OnnxOrigin) -> bool:
        """A node whose value is known (folded on import) is written as an initializer under its own name:
        not for interface tensors or names a subgraph reads, nor where initializers must be graph inputs (IR < 4)."""
        if not (isinstance(n.op, Opaque) and n.op.value is not None and o.node is not None and o.tensor
                and o.tensor in self.known and self.ir_version >= 4 and o.tensor not in self.interface):
            return False
        if o.tensor in self.claimed:
            return False
        self.claimed.add(o.tensor)
        return True

    def check_emitted(self) -> None:
        """Run the nodes written for each new op (all in one onnxruntime session, each op on its own random
        inputs) against the op's own ``evaluate`` (float64); raise ExportError for the first that differs."""
        cases, nodes, inits, inputs, outputs = [], [], [], [], []
        for k, (n, xs, y, emitted) in enumerate(self.probes):
            shapes = check_shapes(n.inputs, [n.op])
            dtype = self.deploy_dtype(n)
            if shapes is None or dtype not in _NUMPY or any(not isinstance(x, gs.Variable) for x in xs):
                continue
            prefix = f"check{k}/"
            part = gs.export_onnx(gs.Graph(nodes=emitted, opset=self.opset), do_type_check=False).graph
            inside = {o for node in part.node for o in node.output} | {i.name for i in part.initializer}
            names = [x.name for x in xs]
            if any(i and i not in inside and i not in names for node in part.node for i in node.input):
                continue  # the nodes read a value that is not an input of the op: nothing to check alone
            for node in part.node:
                node.name = prefix + node.name
                node.input[:] = [prefix + i if i else i for i in node.input]
                node.output[:] = [prefix + o if o else o for o in node.output]
            for init in part.initializer:
                init.name = prefix + init.name
            nodes += part.node
            inits += part.initializer
            gen = torch.Generator().manual_seed(k)
            values = [random_input(s, gen) for s in shapes]
            elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(_NUMPY[dtype]))
            feeds = {}
            for name, s_, v in zip(names, shapes, values):
                if prefix + name not in feeds:
                    inputs.append(onnx.helper.make_tensor_value_info(prefix + name, elem, list(s_)))
                    feeds[prefix + name] = v.numpy().astype(_NUMPY[dtype])
            outputs.append(onnx.helper.make_tensor_value_info(prefix + y.name, elem, None))
            cases.append((n, feeds, n.op.evaluate(*values), dtype))
        if not cases:
            return
        graph = onnx.helper.make_graph(nodes, "self_check", inputs, outputs, inits)
        model = onnx.helper.make_model(graph, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
        feeds = {k: v for _, f, _, _ in cases for k, v in f.items()}
        try:
            got = _run(model, feeds)
        except Exception as err:
            for n, f, want, dtype in cases:  # which one: run them alone
                self.probe_alone(model, n, f, err)
            raise ExportError("ONNX", "op", "?", f"onnxruntime cannot run them: {err}") from err
        for (n, _, want, dtype), y in zip(cases, got):
            y = np.asarray(y, dtype=np.float64)
            if y.shape != tuple(want.shape):
                raise ExportError("ONNX", repr(n.op), n.name, f"output shape {y.shape} instead of {tuple(want.shape)}")
            err = float(np.abs(y - want.numpy()).max() / max(float(want.abs().max()), 1e-30))
            if not err <= _TOLERANCE.get(dtype, 1e-2):
                raise ExportError("ONNX", repr(n.op), n.name, f"relative error {err:.3g} on random inputs")

    def probe_alone(self, model: onnx.ModelProto, n: Node, feeds: dict, cause: Exception) -> None:
        """Raise ExportError naming ``n`` if its part of the self-check model cannot run on its own."""
        prefix = next(iter(feeds)).split("/")[0] + "/"
        out = [o for o in model.graph.output if o.name.startswith(prefix)]
        sub = onnx.utils.Extractor(model).extract_model([i.name for i in model.graph.input if i.name in feeds],
                                                        [o.name for o in out])
        try:
            _run(sub, feeds)
        except Exception as err:
            raise ExportError("ONNX", repr(n.op), n.name, f"onnxruntime cannot run them: {err}") from err

    def original(self, name: str) -> gs.Tensor:
        """The tensor an unchanged node read by this name (a constant input that is not an IR input)."""
        n = self.original_of.get(name)
        if n is not None and n.graph is self.g:
            return self.emit(n)
        if name in self.known:
            return gs.Constant(self.fresh(name), np.asarray(self.known[name]))
        raise ReparamError(f"internal error: tensor '{name}' is read by an unchanged node but no longer computed")

    def named(self, src: Node, name: str, reader: str) -> gs.Tensor:
        """``src``'s value under the name ``name`` (which a kept subgraph of ``reader`` reads)."""
        t = self.emit(src)
        if t.name == name:
            return t
        if (src.id, name) in self.renamed:
            return self.renamed[(src.id, name)]
        if name in self.claimed and self.reserved.get(name) != src.id:
            raise ReparamError(f"'{reader}': a subgraph reads the outer tensor '{name}', but after the rewrites that "
                               f"name holds another value; this graph cannot be written back with its subgraphs "
                               f"unchanged (disable the rule that rewrote '{name}')")
        self.claimed.add(name)
        out = gs.Variable(name)
        self.nodes.append(gs.Node("Identity", self.fresh(f"{name}_identity"), inputs=[t], outputs=[out]))
        self.renamed[(src.id, name)] = out
        return out

    def emit_original(self, n: Node, o: OnnxOrigin) -> gs.Tensor:
        if o.node is None:  # a graph input
            return gs.Variable(o.tensor, dtype=None)
        mapping = {name: self.emit(i) for name, i in zip(o.inputs, n.inputs)}
        for name, i in zip(o.inputs, n.inputs):  # written under the names the subgraphs read, before the node
            if name in o.outer:
                self.named(i, name, o.node.name or o.node.op)
        self.outer_constants.update(name for name in o.outer if name not in mapping and name in self.initializers)
        inputs = []
        for t in o.node.inputs:
            if isinstance(t, gs.Constant):
                inputs.append(t)
            elif t.name == "":
                inputs.append(gs.Variable.empty())
            else:
                inputs.append(mapping[t.name] if t.name in mapping else self.original(t.name))
        key = (id(o.node), tuple(t.name if t.name else "" for t in inputs))  # once per node and its inputs
        if key not in self.emitted:
            first = id(o.node) not in self.emitted_nodes
            self.emitted_nodes.add(id(o.node))
            outs = []
            for t in o.node.outputs:
                if t.name == "":
                    outs.append(gs.Variable.empty())
                elif first and t.name not in self.claimed:
                    self.claimed.add(t.name)
                    outs.append(gs.Variable(t.name))
                else:
                    outs.append(gs.Variable(self.fresh(t.name)))
            name = o.node.name if first else self.fresh(o.node.name or o.node.op)
            attrs = dict(o.node.attrs)
            first_out = next((t.name for t in o.node.outputs if t.name), None)
            proto = self.protos.get(id(o.node)) or self.proto_of.get(first_out)
            if proto is not None:  # copied: its attributes are restored from the original after the export
                attrs = {}
                self.restore[len(self.nodes)] = proto
            elif any(_holds_graph(v) for v in attrs.values()):
                raise ReparamError(f"internal error: the original of '{o.node.name}' was not found; please report it")
            self.nodes.append(gs.Node(o.node.op, name, attrs, inputs=inputs, outputs=outs, domain=o.node.domain))
            self.emitted[key] = outs
        return self.emitted[key][o.index]

    # --- new ops
    def node(self, op: str, base: str, inputs, attrs=None, out: str | None = None) -> gs.Variable:
        y = gs.Variable(out or self.fresh(f"{base}_{op}_output"))
        self.nodes.append(gs.Node(op, self.fresh(f"{base}_{op}"), attrs or {}, inputs=list(inputs), outputs=[y]))
        return y

    def emit_sum(self, op: Sum, base: str, xs, dt, out):
        terms = []
        for c, x in zip(op.coeffs, xs):
            if c in (1.0, -1.0):
                terms.append((x, c))
            else:
                last = out if len(op.coeffs) == 1 else None
                terms.append((self.node("Mul", base, [x, self.const(f"{base}.coeff", torch.tensor(c), dt)], out=last),
                              1.0))
                if last:
                    return terms[0][0]
        terms.sort(key=lambda t: -t[1])  # a positive term first, so the chain needs no Neg
        acc, sign = terms[0]
        if sign < 0:
            acc = self.node("Neg", base, [acc], out=out if len(terms) == 1 else None)
        if len(terms) == 1 and sign > 0 and out:
            return self.node("Identity", base, [acc], out=out)
        for k, (x, c) in enumerate(terms[1:], 2):
            acc = self.node("Add" if c > 0 else "Sub", base, [acc, x], out=out if k == len(terms) else None)
        return acc

    @staticmethod
    def deploy_dtype(n: Node) -> torch.dtype:
        """The dtype the new op's tensors are written in."""
        return n.op.dtype or n.dtype or torch.float32

    @staticmethod
    def input_rank(n: Node) -> int | None:
        """The rank of the new op's first input (its own when it has none), None when unknown."""
        return n.inputs[0].rank if n.inputs else n.rank

    def emit_new(self, n: Node, xs: list[gs.Tensor]) -> gs.Tensor:
        emitter = vocab.by_class(vocab.ONNX_EMITTERS, type(n.op))
        if emitter is None:
            raise ReparamError(f"cannot write a new {n.op!r} at '{n.name or 'fused'}' to ONNX: its op kind has no "
                               f"ONNX emitter (register one with reparam.core.vocabulary.onnx_emitter)")
        return emitter(self, n, n.op, xs, self.want.get(n.id))


def _known_rank(n: Node, rank: int | None) -> int:
    if rank is None:
        raise ReparamError(f"'{n.name or 'fused'}': the rank of the new {type(n.op).__name__} is unknown")
    return rank


# --- the built-in emitters, registered like any other ---------------------------------------------------------
@vocab.onnx_emitter(Conv)
def _emit_conv(ctx: OnnxExporter, n: Node, op: Conv, xs, out):
    base, dt = n.name or "fused", ctx.deploy_dtype(n)
    if op.padding_mode != "zeros":
        raise ReparamError(f"'{base}': ONNX Conv cannot pad with '{op.padding_mode}'")
    inputs = [xs[0], ctx.const(f"{base}.weight", op.weight, dt)]
    if op.bias is not None:
        inputs.append(ctx.const(f"{base}.bias", op.bias, dt))
    attrs = dict(kernel_shape=list(op.kernel_size), strides=list(op.stride), dilations=list(op.dilation),
                 group=op.groups, pads=[lo for lo, _ in op.padding] + [hi for _, hi in op.padding])
    return ctx.node("Conv", base, inputs, attrs, out)


@vocab.onnx_emitter(Linear)
def _emit_linear(ctx: OnnxExporter, n: Node, op: Linear, xs, out):
    base, dt = n.name or "fused", ctx.deploy_dtype(n)
    if ctx.input_rank(n) == 2:
        inputs = [xs[0], ctx.const(f"{base}.weight", op.weight, dt)]
        if op.bias is not None:
            inputs.append(ctx.const(f"{base}.bias", op.bias, dt))
        return ctx.node("Gemm", base, inputs, dict(transB=1), out)
    y = ctx.node("MatMul", base, [xs[0], ctx.const(f"{base}.weight", op.weight.T.contiguous(), dt)],
                 out=None if op.bias is not None else out)
    if op.bias is None:
        return y
    return ctx.node("Add", base, [y, ctx.const(f"{base}.bias", op.bias, dt)], out=out)


@vocab.onnx_emitter(Affine)
def _emit_affine(ctx: OnnxExporter, n: Node, op: Affine, xs, out):
    base, dt = n.name or "fused", ctx.deploy_dtype(n)
    r = n.rank or ctx.input_rank(n)
    if not op.is_scalar:
        _known_rank(n, r)
    r = r or 0
    has_shift = op.shift is not None and bool(op.shift.any())
    y = xs[0]
    if not bool((op.scale == 1).all()) or not has_shift:
        y = ctx.node("Mul", base, [y, ctx.const(f"{base}.scale", op.broadcast(op.scale, r), dt)],
                     out=None if has_shift else out)
    if has_shift:
        y = ctx.node("Add", base, [y, ctx.const(f"{base}.shift", op.broadcast(op.shift, r), dt)], out=out)
    return y


@vocab.onnx_emitter(Sum)
def _emit_sum(ctx: OnnxExporter, n: Node, op: Sum, xs, out):
    return ctx.emit_sum(op, n.name or "fused", xs, ctx.deploy_dtype(n), out)


@vocab.onnx_emitter(Pad)
def _emit_pad(ctx: OnnxExporter, n: Node, op: Pad, xs, out):
    base, rank = n.name or "fused", _known_rank(n, ctx.input_rank(n))
    k = len(op.pads)
    pads = [0] * (rank - k) + [lo for lo, _ in op.pads] + [0] * (rank - k) + [hi for _, hi in op.pads]
    return ctx.node("Pad", base, [xs[0], ctx.ints(f"{base}.pads", pads)], dict(mode="constant"), out)


@vocab.onnx_emitter(AvgPool)
def _emit_avg_pool(ctx: OnnxExporter, n: Node, op: AvgPool, xs, out):
    base = n.name or "fused"
    if op.divisor_override is not None or (op.ceil_mode and ctx.opset < 10):
        raise ReparamError(f"'{base}': this AvgPool has no ONNX AveragePool form at opset {ctx.opset}")
    attrs = dict(kernel_shape=list(op.kernel_size), strides=list(op.stride), pads=list(op.padding) * 2,
                 count_include_pad=int(op.count_include_pad))
    if op.ceil_mode:
        attrs["ceil_mode"] = 1
    return ctx.node("AveragePool", base, [xs[0]], attrs, out)


@vocab.onnx_emitter(Cat)
def _emit_cat(ctx: OnnxExporter, n: Node, op: Cat, xs, out):
    return ctx.node("Concat", n.name or "fused", xs, dict(axis=op.dim), out)


@vocab.onnx_emitter(Slice)
def _emit_slice(ctx: OnnxExporter, n: Node, op: Slice, xs, out):
    base = n.name or "fused"
    inputs = [xs[0], ctx.ints(f"{base}.starts", [op.start]), ctx.ints(f"{base}.ends", [op.stop]),
              ctx.ints(f"{base}.axes", [op.dim]), ctx.ints(f"{base}.steps", [1])]
    return ctx.node("Slice", base, inputs, None, out)


@vocab.onnx_emitter(Mean)
def _emit_mean(ctx: OnnxExporter, n: Node, op: Mean, xs, out):
    base, rank = n.name or "fused", ctx.input_rank(n)
    if op.keepdim and rank and rank > 2 and tuple(sorted(d % rank for d in op.dims)) == tuple(range(2, rank)):
        return ctx.node("GlobalAveragePool", base, [xs[0]], None, out)
    if ctx.opset >= 18:
        return ctx.node("ReduceMean", base, [xs[0], ctx.ints(f"{base}.axes", op.dims)],
                        dict(keepdims=int(op.keepdim)), out)
    return ctx.node("ReduceMean", base, [xs[0]], dict(axes=list(op.dims), keepdims=int(op.keepdim)), out)


@vocab.onnx_emitter(Flatten)
def _emit_flatten(ctx: OnnxExporter, n: Node, op: Flatten, xs, out):
    base, rank = n.name or "fused", _known_rank(n, ctx.input_rank(n))
    s, e = op.start_dim % rank, op.end_dim % rank
    if s == 1 and e == rank - 1:
        return ctx.node("Flatten", base, [xs[0]], dict(axis=1), out)
    shape = [0] * s + [-1] + list(n.inputs[0].shape[e + 1:])
    return ctx.node("Reshape", base, [xs[0], ctx.ints(f"{base}.shape", shape)], None, out)


@vocab.onnx_emitter(Permute)
def _emit_permute(ctx: OnnxExporter, n: Node, op: Permute, xs, out):
    return ctx.node("Transpose", n.name or "fused", [xs[0]], dict(perm=list(op.dims)), out)


@vocab.onnx_emitter(Identity)
def _emit_identity(ctx: OnnxExporter, n: Node, op: Identity, xs, out):
    return ctx.node("Identity", n.name or "fused", [xs[0]], None, out) if out else xs[0]


def _holds_graph(v) -> bool:
    return isinstance(v, gs.Graph) or (isinstance(v, (list, tuple)) and any(isinstance(x, gs.Graph) for x in v))


def export_onnx(g: Graph, model: onnx.ModelProto, self_check: bool = True) -> onnx.ModelProto:
    """``model`` rewritten as ``g`` says (``g`` was imported from ``model``). With ``self_check`` the nodes written
    for every new op are run in onnxruntime on small random inputs against the op's own ``evaluate``, so an
    emitter bug raises :class:`reparam.errors.ExportError` naming the op and the exporter."""
    return OnnxExporter(g, model, self_check).run()
