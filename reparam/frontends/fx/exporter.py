"""IR → FX: write the rewritten graph back as a GraphModule.

Unchanged nodes are copied from the source graph (same modules, same targets); new ops become fresh
modules (nn.Conv*, nn.Linear) or plain calls, with tensors cast once to the dtype and device recorded
on the op. New modules are named after the module path they replace, so the deploy model reads like
the training model.
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

from reparam.frontends.fx.nodes import FxOrigin
from reparam.core.ir import Graph, Node
from reparam.core.ops import (Affine, AvgPool, Cat, Conv, Flatten, Identity, Input, Linear, Mean, Op, Pad, Permute, Slice,
                              Sum, symmetric)


def _cast(t: torch.Tensor | None, op: Op) -> torch.Tensor | None:
    if t is None:
        return None
    return t.to(device=op.device or "cpu", dtype=op.dtype or torch.float32)


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


class _Exporter:
    def __init__(self, g: Graph, source: fx.GraphModule, dtype: torch.dtype | None, copy_modules: bool):
        self.g, self.source, self.dtype = g, source, dtype
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
            if isinstance(n.op, Slice) and o.node.target is operator.getitem:
                return self.emit_split_item(n)
            mapping = {old: self.env[new.id] for old, new in zip(o.inputs, n.inputs)}
            if o.node.op in ("placeholder", "get_attr") and o.node in self.copied:
                return self.copied[o.node]
            new = self.copy_fx(o.node, mapping)
            if o.node.op == "get_attr":
                self.copied[o.node] = new
            return new
        return self.emit_new(n, [self.env[i.id] for i in n.inputs])

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

    def emit_new(self, n: Node, xs: list[fx.Node]) -> fx.Node:
        op, call = _in_dtype(n.op, self.dtype), self.out.call_function
        if op.dtype is None and n.dtype is not None and n.dtype.is_floating_point:
            op = op.with_(dtype=n.dtype)  # a new op built without a dtype (e.g. from a pool) takes its node's
        if isinstance(op, Conv):
            x = xs[0]
            if not symmetric(op.padding):  # nn.Conv pads symmetrically: pad explicitly, conv unpadded
                mode = "constant" if op.padding_mode == "zeros" else op.padding_mode
                x = call(F.pad, (x, [p for lo, hi in reversed(op.padding) for p in (lo, hi)]), {"mode": mode})
                op = op.with_(padding_mode="zeros")
            target = self.name(n.name)
            self.attrs[target] = conv_module(op)
            return self.out.call_module(target, (x,))
        if isinstance(op, Linear):
            target = self.name(n.name)
            self.attrs[target] = linear_module(op)
            return self.out.call_module(target, (xs[0],))
        if isinstance(op, Affine):
            rank = n.rank or (op.axis + 1 if op.axis is not None else 0)
            y = call(operator.mul, (xs[0], self.attr(n.name, _cast(op.broadcast(op.scale, rank), op), "_scale")))
            if op.shift is not None:
                y = call(operator.add, (y, self.attr(n.name, _cast(op.broadcast(op.shift, rank), op), "_shift")))
            return y
        if isinstance(op, Sum):
            y = xs[0] if op.coeffs[0] == 1 else call(operator.mul, (xs[0], op.coeffs[0]))
            for c, x in zip(op.coeffs[1:], xs[1:]):
                if c == 1:
                    y = call(operator.add, (y, x))
                elif c == -1:
                    y = call(operator.sub, (y, x))
                else:
                    y = call(torch.add, (y, x), {"alpha": c})
            return y
        if isinstance(op, Pad):
            return call(F.pad, (xs[0], [p for lo, hi in reversed(op.pads) for p in (lo, hi)]))
        if isinstance(op, AvgPool):
            fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(op.kernel_size) - 1]
            return call(fn, (xs[0], op.kernel_size, op.stride, op.padding, op.ceil_mode, op.count_include_pad))
        if isinstance(op, Cat):
            return call(torch.cat, (list(xs), op.dim))
        if isinstance(op, Slice):
            return call(torch.narrow, (xs[0], op.dim, op.start, op.stop - op.start))
        if isinstance(op, Mean):
            return call(torch.mean, (xs[0], op.dims), {"keepdim": op.keepdim})
        if isinstance(op, Flatten):
            return call(torch.flatten, (xs[0], op.start_dim, op.end_dim))
        if isinstance(op, Permute):
            return call(torch.permute, (xs[0], op.dims))
        if isinstance(op, Identity):
            return xs[0]
        raise TypeError(f"cannot write back a new {op!r} at '{n.name}'")


def export_fx(g: Graph, source: fx.GraphModule, dtype: torch.dtype | None = None,
              copy_modules: bool = False) -> fx.GraphModule:
    """A GraphModule computing ``g``; unchanged parts are ``source``'s own modules (or copies of them).

    New tensors take the dtype recorded on each op, or ``dtype`` when given (float64 for verification).
    """
    return _Exporter(g, source, dtype, copy_modules).run()
