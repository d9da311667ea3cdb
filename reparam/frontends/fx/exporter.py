"""IR → FX: write the rewritten graph back as a GraphModule.

Unchanged nodes are copied from the source graph (same modules, same targets); new ops become fresh
modules (nn.Conv*, nn.Linear) or plain calls, with tensors cast once to the dtype and device recorded
on the op. New modules are named after the module path they replace, so the deploy model reads like
the training model. How a new op is written is its op kind's FX emitter (:mod:`reparam.core.vocabulary`);
:class:`FxExporter` is the emitter's ``ctx``: ``call`` (a call_function node), ``module`` (a new submodule and
its call), ``attr`` (a new constant), ``cast`` (an op's tensor to its deploy dtype and device).
"""
from __future__ import annotations

import copy
import itertools
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from reparam.core import vocabulary as vocab
from reparam.core.checks import check_shapes, random_input
from reparam.errors import ExportError
from reparam.frontends.fx.nodes import FxOrigin
from reparam.core.ir import Graph, Node
from reparam.core.ops import (Affine, AvgPool, Cat, Conv, Flatten, Identity, Input, Linear, Mean, Op, Pad, Permute,
                              Slice, Sum, borrowed, remember_exact, symmetric)


def _cast(t: torch.Tensor | None, op: Op) -> torch.Tensor | None:
    """An op's tensor in its deploy dtype and device, rounded once (a rewrite's float64 result) or as it is (a
    model tensor the op holds, copied: the deploy model never shares the original's storage)."""
    if t is None:
        return None
    out = t.to(device=op.device or "cpu", dtype=op.dtype or torch.float32)
    if out.data_ptr() == t.data_ptr() and borrowed(t):
        out = out.clone(memory_format=torch.contiguous_format)
    remember_exact(out, t)
    return out


_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}  # of the self-check, by deploy dtype (else 1e-2)


def _in_dtype(op: Op, dtype: torch.dtype | None) -> Op:
    return op if dtype is None else op.with_(dtype=dtype)


def conv_module(op: Conv) -> nn.Module:
    cls = (None, nn.Conv1d, nn.Conv2d, nn.Conv3d)[op.nd]
    padding = tuple(lo for lo, _ in op.padding) if symmetric(op.padding) else 0
    m = cls(op.in_channels, op.out_channels, op.kernel_size, stride=op.stride, padding=padding,
            dilation=op.dilation, groups=op.groups, bias=op.bias is not None, padding_mode=op.padding_mode,
            device="meta", dtype=op.dtype)  # built without data: its tensors are set next
    m.weight = nn.Parameter(_cast(op.weight, op))
    if op.bias is not None:
        m.bias = nn.Parameter(_cast(op.bias, op))
    return m


def linear_module(op: Linear) -> nn.Module:
    m = nn.Linear(op.in_features, op.out_features, bias=op.bias is not None, device="meta", dtype=op.dtype)
    m.weight = nn.Parameter(_cast(op.weight, op))
    if op.bias is not None:
        m.bias = nn.Parameter(_cast(op.bias, op))
    return m


class _Namer:
    """Unique attribute paths that never collide with (or nest inside) paths already in use."""

    def __init__(self, taken: set[str]):
        self.taken: set[str] = set()
        self.prefixes: set[str] = set()
        for t in taken:
            self.claim(t)

    def claim(self, path: str) -> None:
        self.taken.add(path)
        parts = path.split(".")
        for k in range(1, len(parts)):
            self.prefixes.add(".".join(parts[:k]))

    def free(self, path: str) -> bool:
        parts = path.split(".")
        if path in self.taken or path in self.prefixes:
            return False
        return not any(".".join(parts[:k]) in self.taken for k in range(1, len(parts)))

    def __call__(self, wanted: str, suffix: str = "") -> str:
        base = "".join(c if c.isalnum() or c in "._" else "_" for c in (wanted or "fused")).strip(".") or "fused"
        parts = base.split(".")
        blocked = next((k for k in range(1, len(parts)) if ".".join(parts[:k]) in self.taken), None)
        if blocked is not None:  # a leaf already sits on a prefix: no suffix could free the path, so join below it
            base = ".".join(parts[:blocked - 1] + ["_".join(parts[blocked - 1:])])
        candidates = itertools.chain([base + suffix], (f"{base}_fused{k or ''}{suffix}" for k in itertools.count()))
        for c in candidates:
            if self.free(c):
                self.claim(c)
                return c


class FxExporter:
    """The writer of an FX graph; an emitter's ``ctx``."""

    def __init__(self, g: Graph, source: fx.GraphModule, dtype: torch.dtype | None, copy_modules: bool,
                 self_check: bool = True, checked: set | None = None):
        self.g, self.source, self.dtype, self.self_check = g, source, dtype, self_check
        # signatures of new ops whose written nodes were checked (see check_emitted), shared by the exports of a run
        self.checked: set = set() if checked is None else checked
        self.memo: dict | None = {} if copy_modules else None  # one memo: tied modules stay tied
        self.out = fx.Graph()
        self.attrs: dict[str, Any] = {}
        self.env: dict[int, fx.Node] = {}
        self.copied: dict[fx.Node, fx.Node] = {}
        self.splits: dict[tuple, fx.Node] = {}

    def live_nodes(self) -> list[Node]:
        live: set[int] = set()
        stack = list(self.g.outputs) + [n for n in self.g.nodes if isinstance(n.op, Input)]
        while stack:
            n = stack.pop()
            if n.id not in live:
                live.add(n.id)
                stack.extend(n.inputs)
        return [n for n in self.g.nodes if n.id in live]

    def fetch(self, target: str):
        obj: Any = self.source
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def copy_fx(self, n: fx.Node, mapping: dict[fx.Node, fx.Node]) -> fx.Node:
        """Copy a source FX node; its inputs come from ``mapping`` or are copied constants."""
        def arg(a: fx.Node):
            if a in mapping:
                return mapping[a]
            return self.copy_const(a)

        new = self.out.node_copy(n, arg)
        if n.op in ("call_module", "get_attr") and n.target not in self.attrs:
            value = self.fetch(n.target)
            self.attrs[n.target] = value if self.memo is None else copy.deepcopy(value, self.memo)
        return new

    def copy_const(self, a: fx.Node) -> fx.Node:
        if a not in self.copied:
            self.copied[a] = self.copy_fx(a, {})
        return self.copied[a]

    def run(self) -> fx.GraphModule:
        nodes = self.live_nodes()
        taken = {n.origin.node.target for n in nodes
                 if isinstance(n.origin, FxOrigin) and n.origin.node.op in ("call_module", "get_attr")}
        self.name = _Namer(taken)
        for n in nodes:
            self.env[n.id] = self.emit(n)
        out = self.g.meta["fx_output"]
        mapping = {old: self.env[new.id] for old, new in zip(out.inputs, self.g.outputs)}
        self.out.output(fx.map_arg(out.node.args[0], lambda a: mapping[a]))
        gm = fx.GraphModule(self.attrs, self.out, class_name=type(self.source).__name__)
        gm.eval()
        return gm

    def emit(self, n: Node) -> fx.Node:
        if isinstance(n.origin, FxOrigin):
            o = n.origin
            if isinstance(n.op, Slice) and o.node.target is operator.getitem and isinstance(o.node.args[1], int):
                return self.emit_split_item(n)
            mapping = {old: self.env[new.id] for old, new in zip(o.inputs, n.inputs)}
            if o.node.op in ("placeholder", "get_attr") and o.node in self.copied:
                return self.copied[o.node]
            new = self.copy_fx(o.node, mapping)
            if o.node.op == "get_attr":
                self.copied[o.node] = new
            return new
        xs = [self.env[i.id] for i in n.inputs]
        last = next(iter(reversed(self.out.nodes)), None)
        y = self.emit_new(n, xs)
        if self.self_check:
            self.check_emitted(n, xs, y, last)
        return y

    def check_emitted(self, n: Node, xs: list[fx.Node], y: fx.Node, last: fx.Node | None) -> None:
        """Run the nodes just written for the new op ``n`` on random inputs against ``n.op.evaluate`` (float64);
        raise ExportError when they differ. Skipped when the input shapes are unknown."""
        new = []
        for node in reversed(self.out.nodes):
            if node is last:
                break
            new.append(node)
        new.reverse()
        shapes = check_shapes(n.inputs, [n.op])
        if not new or shapes is None:
            return
        signature = _signature(n.op, self.dtype, shapes, [(node.op, type(self.attrs[node.target]) if node.op == "call_module"
                                                  else None if node.op == "get_attr" else node.target)
                                                 for node in new])
        if signature in self.checked:
            return  # the same emitter wrote this geometry already, and was checked on it
        if any(a not in xs and a not in new for node in new for a in node.all_input_nodes):
            return  # the emitter read a value that is not an input of the op: nothing to check alone
        op = _in_dtype(n.op, self.dtype)
        dtype = op.dtype or (n.dtype if n.dtype is not None and n.dtype.is_floating_point else torch.float32)
        gen = torch.Generator().manual_seed(0)
        inputs = [random_input(s, gen) for s in shapes]
        detail = None
        with torch.no_grad():
            want = n.op.evaluate(*inputs)
            try:
                got = self._run_nodes(new, dict(zip(xs, (x.to(device=op.device or "cpu", dtype=dtype)
                                                         for x in inputs))), y)
            except Exception as err:
                detail = f"they fail to run: {type(err).__name__}: {err}"
            else:
                if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
                    detail = f"output shape {tuple(getattr(got, 'shape', ()))} instead of {tuple(want.shape)}"
                else:
                    err = float((got.to("cpu", torch.float64) - want).abs().max() / want.abs().max().clamp_min(1e-30))
                    if not err <= _TOLERANCE.get(dtype, 1e-2):
                        detail = f"relative error {err:.3g} on random inputs"
        if detail is not None:
            raise ExportError("FX", repr(n.op), n.name, detail)
        if signature is not None:
            self.checked.add(signature)

    def _run_nodes(self, nodes: list[fx.Node], env: dict, result: fx.Node):
        """Run ``nodes`` (just written, in order) on the values ``env`` gives their inputs, as a GraphModule of
        them would (without building one): get_attr / call_module read this exporter's attributes."""
        env = dict(env)
        for node in nodes:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: env[a])
            if node.op == "get_attr":
                env[node] = self.attrs[node.target]
            elif node.op == "call_module":
                env[node] = self.attrs[node.target](*args, **kwargs)
            elif node.op == "call_function":
                env[node] = node.target(*args, **kwargs)
            elif node.op == "call_method":
                env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                raise RuntimeError(f"unexpected node {node.op}")
        return env[result]

    def emit_split_item(self, n: Node) -> fx.Node:
        getitem = n.origin.node
        split = getitem.args[0]
        x = self.env[n.inputs[0].id]
        key = (split, x)
        if key not in self.splits:
            self.splits[key] = self.copy_fx(split, {split.all_input_nodes[0]: x})
        return self.out.call_function(operator.getitem, (self.splits[key], getitem.args[1]))

    def attr(self, wanted: str, value, suffix: str = "") -> fx.Node:
        target = self.name(wanted, suffix)
        self.attrs[target] = value
        return self.out.get_attr(target)

    def call(self, fn, args: tuple, kwargs: dict | None = None) -> fx.Node:
        """A new ``call_function`` node."""
        return self.out.call_function(fn, args, kwargs or {})

    def module(self, wanted: str, module: nn.Module, args: tuple) -> fx.Node:
        """A new submodule, named after ``wanted`` (made unique), and a call of it on ``args``."""
        target = self.name(wanted)
        self.attrs[target] = module
        return self.out.call_module(target, args)

    cast = staticmethod(_cast)

    def emit_new(self, n: Node, xs: list[fx.Node]) -> fx.Node:
        op = _in_dtype(n.op, self.dtype)
        if op.dtype is None and n.dtype is not None and n.dtype.is_floating_point:
            op = op.with_(dtype=n.dtype)  # a new op built without a dtype (e.g. from a pool) takes its node's
        emitter = vocab.by_class(vocab.FX_EMITTERS, type(op))
        if emitter is None:
            raise TypeError(f"cannot write back a new {op!r} at '{n.name}': its op kind has no FX emitter "
                            f"(register one with reparam.core.vocabulary.fx_emitter)")
        return emitter(self, n, op, xs)


# --- the built-in emitters, registered like any other ---------------------------------------------------------
@vocab.fx_emitter(Conv)
def _emit_conv(ctx: FxExporter, n: Node, op: Conv, xs):
    x = xs[0]
    if not symmetric(op.padding):  # nn.Conv pads symmetrically: pad explicitly, conv unpadded
        mode = "constant" if op.padding_mode == "zeros" else op.padding_mode
        x = ctx.call(F.pad, (x, [p for lo, hi in reversed(op.padding) for p in (lo, hi)]), {"mode": mode})
        op = op.with_(padding_mode="zeros")
    return ctx.module(n.name, conv_module(op), (x,))


@vocab.fx_emitter(Linear)
def _emit_linear(ctx: FxExporter, n: Node, op: Linear, xs):
    return ctx.module(n.name, linear_module(op), (xs[0],))


@vocab.fx_emitter(Affine)
def _emit_affine(ctx: FxExporter, n: Node, op: Affine, xs):
    rank = n.rank or (op.axis + 1 if op.axis is not None else 0)
    y = ctx.call(operator.mul, (xs[0], ctx.attr(n.name, _cast(op.broadcast(op.scale, rank), op), "_scale")))
    if op.shift is not None:
        y = ctx.call(operator.add, (y, ctx.attr(n.name, _cast(op.broadcast(op.shift, rank), op), "_shift")))
    return y


@vocab.fx_emitter(Sum)
def _emit_sum(ctx: FxExporter, n: Node, op: Sum, xs):
    y = xs[0] if op.coeffs[0] == 1 else ctx.call(operator.mul, (xs[0], op.coeffs[0]))
    for c, x in zip(op.coeffs[1:], xs[1:]):
        if c == 1:
            y = ctx.call(operator.add, (y, x))
        elif c == -1:
            y = ctx.call(operator.sub, (y, x))
        else:
            y = ctx.call(torch.add, (y, x), {"alpha": c})
    return y


@vocab.fx_emitter(Pad)
def _emit_pad(ctx: FxExporter, n: Node, op: Pad, xs):
    return ctx.call(F.pad, (xs[0], [p for lo, hi in reversed(op.pads) for p in (lo, hi)]))


@vocab.fx_emitter(AvgPool)
def _emit_avg_pool(ctx: FxExporter, n: Node, op: AvgPool, xs):
    nd = len(op.kernel_size)
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    args = (xs[0], op.kernel_size, op.stride, op.padding, op.ceil_mode, op.count_include_pad)
    if op.divisor_override is not None:
        if nd == 1:
            raise TypeError(f"cannot write back a new {op!r} at '{n.name}': avg_pool1d has no divisor_override")
        return ctx.call(fn, args + (op.divisor_override,))
    return ctx.call(fn, args)


@vocab.fx_emitter(Cat)
def _emit_cat(ctx: FxExporter, n: Node, op: Cat, xs):
    return ctx.call(torch.cat, (list(xs), op.dim))


@vocab.fx_emitter(Slice)
def _emit_slice(ctx: FxExporter, n: Node, op: Slice, xs):
    return ctx.call(torch.narrow, (xs[0], op.dim, op.start, op.stop - op.start))


@vocab.fx_emitter(Mean)
def _emit_mean(ctx: FxExporter, n: Node, op: Mean, xs):
    return ctx.call(torch.mean, (xs[0], op.dims), {"keepdim": op.keepdim})


@vocab.fx_emitter(Flatten)
def _emit_flatten(ctx: FxExporter, n: Node, op: Flatten, xs):
    return ctx.call(torch.flatten, (xs[0], op.start_dim, op.end_dim))


@vocab.fx_emitter(Identity)
def _emit_identity(ctx: FxExporter, n: Node, op: Identity, xs):
    return xs[0]


def _signature(op: Op, dtype, shapes, written: list) -> tuple | None:
    """What the nodes written for ``op`` can get wrong besides its tensor values: the op kind, the input shapes,
    each field (a tensor by its shape, dtype and device) and the kinds of nodes written (an emitter that takes
    another path for other values writes other nodes). None when a field cannot be compared."""
    import dataclasses

    fields = []
    for f in dataclasses.fields(op):
        v = getattr(op, f.name)
        v = (tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else v
        try:
            hash(v)
        except TypeError:
            return None
        fields.append((f.name, v))
    return type(op), dtype, tuple(tuple(s) for s in shapes), tuple(fields), tuple(written)


def export_fx(g: Graph, source: fx.GraphModule, dtype: torch.dtype | None = None,
              copy_modules: bool = False, self_check: bool = True, checked: set | None = None) -> fx.GraphModule:
    """A GraphModule computing ``g``; unchanged parts are ``source``'s own modules (or copies of them).

    New tensors take the dtype recorded on each op, or ``dtype`` when given (float64 for verification). With
    ``self_check`` the nodes written for each new op are run on small random inputs against the op's own
    ``evaluate`` (float64), so an emitter bug raises :class:`reparam.errors.ExportError` naming the op and the
    exporter, instead of failing the end-to-end verification as if a rule were wrong; each signature once per
    ``checked`` set (one per fuse run).
    """
    return FxExporter(g, source, dtype, copy_modules, self_check, checked).run()


@vocab.fx_emitter(Permute)
def _emit_permute(ctx: FxExporter, n: Node, op: Permute, xs):
    return ctx.call(torch.permute, (xs[0], op.dims))
