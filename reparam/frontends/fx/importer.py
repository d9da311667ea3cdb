"""FX → IR: see each torch.fx node as a vocabulary op (or as opaque, kept exactly as it was).

Recognized: nn.Conv1d/2d/3d, nn.BatchNorm1d/2d/3d (eval, running statistics), nn.Linear, nn.Identity,
nn.Dropout*, nn.AvgPool*, nn.AdaptiveAvgPool(1), nn.Flatten, F.conv*/F.linear on constant weights,
F.batch_norm on constant buffers (training=False), constant-zero F.pad, +, −, neg, * and / by a scalar
or a per-axis constant, torch.cat, chunk/split (through their getitems), unit-step slices of one axis
(``x[:, :, a:b]``), mean, flatten, dropout(eval).
Every recognizer, built-in or a user's, sits in the registries of :mod:`reparam.core.vocabulary` (by module
class, function target, method name; the ATen front end registers torch.export's overloads the same way);
:class:`FxImporter` is what a recognizer gets as ``ctx``: ``const``, ``dtype_of``, ``shape``, ``note``,
``function`` (recognize a call as another target would be), ``arithmetic``, ``written_anew`` (an op read
through intermediate nodes).
"""
from __future__ import annotations

import numbers
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from reparam.math import kernels
from reparam.core import vocabulary as vocab
import reparam.rules  # noqa: F401  (the built-in op kinds beyond the core vocabulary register themselves)
from reparam.frontends.fx.capture import has_hooks
from reparam.core.ir import Graph, Node
from reparam.core.ops import (Affine, AvgPool, Cat, Conv, Flatten, Identity, Input, Linear, Mean, Opaque, Pad, Permute,
                              Slice, Sum, exact_value, f64, held, per_axis)
from reparam.frontends.fx.nodes import FxOrigin, fx_dtype, fx_shape, scoped_name
from reparam.frontends.fx.shapes import same_forward


def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def conv_op(weight, bias, stride, padding, dilation, groups, padding_mode="zeros") -> Conv | None:
    nd = weight.ndim - 2
    stride, dilation = _tuple(stride, nd), _tuple(dilation, nd)
    if isinstance(padding, str):
        if padding == "valid":
            pads = ((0, 0),) * nd
        elif padding == "same" and all(s == 1 for s in stride):
            totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
            pads = tuple((t // 2, t - t // 2) for t in totals)
        else:
            return None
    else:
        pads = tuple((p, p) for p in _tuple(padding, nd))
    return Conv(held(weight), held(bias), stride, pads, dilation, int(groups), padding_mode,
                dtype=weight.dtype, device=weight.device)


def _bn_affine(mean, var, weight, bias, eps, like: torch.Tensor) -> Affine:
    s, t = kernels.bn_scale_shift(f64(mean), f64(var), f64(weight), f64(bias), float(eps))
    return Affine(s, t, 1, dtype=like.dtype, device=like.device)


class FxImporter:
    """The walk over an FX graph; a recognizer's ``ctx``."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.graph = Graph()
        self.env: dict[fx.Node, Node] = {}
        self.consts: dict[fx.Node, Any] = {}
        self.const_dtypes: dict[fx.Node, torch.dtype] = {}  # a folded float constant's dtype in the model
        self.native: dict[fx.Node, Any] = {}  # a folded float constant as the model computes it
        self.notes: list[str] = []
        self.anew: set[fx.Node] = set()  # recognized through intermediate nodes: no source node to copy

    # --- constants -------------------------------------------------------------------------
    def const(self, a) -> Any:
        """The constant value of an argument, or None when it depends on data."""
        if isinstance(a, fx.Node):
            return self.consts.get(a)
        if isinstance(a, numbers.Number) and not isinstance(a, bool):
            return a
        return None

    def shape(self, a) -> tuple[int, ...] | None:
        """The traced shape of a node argument (None when unknown)."""
        return fx_shape(a) if isinstance(a, fx.Node) else None

    def written_anew(self, n: fx.Node) -> None:
        """Mark ``n``'s op as read through intermediate nodes (its data inputs are not ``n``'s own): the deploy
        graph writes it from the op (its emitter) rather than copying ``n``, which reads those nodes."""
        self.anew.add(n)

    def note(self, message: str) -> None:
        """A note for the report on why something was left as is."""
        self.notes.append(message)

    def dtype_of(self, a) -> torch.dtype | None:
        """The dtype the model computes a constant argument in (a folded constant is held in float64)."""
        if isinstance(a, fx.Node) and a in self.const_dtypes:
            return self.const_dtypes[a]
        value = self.const(a)
        return value.dtype if isinstance(value, torch.Tensor) else None

    def _fold_constant(self, n: fx.Node) -> Any:
        """The value of ``n`` if it is computed from constants only. A floating-point result computed from
        floating-point tensors is recomputed from their float64 values (what the float64 reference of the
        model computes), and the dtype the model computes it in is kept aside (``dtype_of``)."""
        value = self._run_on_constants(n, lambda a: self.native.get(a, self.consts[a]))
        exact = exact_value(value) if n.op == "get_attr" and isinstance(value, torch.Tensor) else None
        if exact is not None:  # a deploy tensor rounded from a rewrite's result in this run: read exactly
            self.const_dtypes[n] = value.dtype
            self.native[n] = value
            return exact
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64 \
                and n.op != "get_attr":
            exact = self._run_on_constants(n, lambda a: _to_float64(self.consts[a]))
            if isinstance(exact, torch.Tensor) and exact.shape == value.shape and exact.dtype == torch.float64:
                self.const_dtypes[n] = value.dtype
                self.native[n] = value  # what the model computes: later constants derive their dtype from it
                return exact
        return value

    def _run_on_constants(self, n: fx.Node, convert) -> Any:
        if n.op == "get_attr":
            obj: Any = self.gm
            for part in n.target.split("."):
                obj = getattr(obj, part)
            return obj
        if n.op not in ("call_function", "call_method") or not n.all_input_nodes:
            return None
        if any(i not in self.consts for i in n.all_input_nodes):
            return None
        if n.op == "call_method" and n.target.endswith("_"):
            return None
        args = fx.map_arg(n.args, convert)
        kwargs = fx.map_arg(n.kwargs, convert)
        try:
            with torch.no_grad():
                if n.op == "call_function":
                    return n.target(*args, **kwargs)
                return getattr(args[0], n.target)(*args[1:], **kwargs)
        except Exception:  # not a constant computation we can run: leave it opaque
            return None

    # --- the walk --------------------------------------------------------------------------
    def run(self) -> Graph:
        placeholders = 0
        for n in self.gm.graph.nodes:
            if n.op == "output":
                outs = []
                fx.map_arg(n.args, lambda a: outs.append(a))
                self.graph.outputs = [self.env[a] for a in outs]
                self.graph.meta["fx_output"] = FxOrigin(n, outs)
                continue
            if n.op == "placeholder":
                node = Node(Input(placeholders), name=n.name, shape=fx_shape(n), dtype=fx_dtype(n),
                            origin=FxOrigin(n, []))
                placeholders += 1
            else:
                value = self._fold_constant(n)
                if value is not None:
                    self.consts[n] = value
                node = self.recognize(n, value)
            self.graph.add(node)
            self.env[n] = node
        return self.graph

    def _node(self, op, n: fx.Node, data: list[fx.Node], name: str | None = None) -> Node:
        return Node(op, [self.env[d] for d in data], name=name or scoped_name(n), shape=fx_shape(n),
                    dtype=fx_dtype(n), origin=FxOrigin(n, data))

    def opaque(self, n: fx.Node, value=None) -> Node:
        what = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        return self._node(Opaque(str(what), value), n, list(n.all_input_nodes),
                          name=n.target if n.op == "call_module" else None)

    def recognize(self, n: fx.Node, value) -> Node:
        if value is not None:
            return self.opaque(n, value)
        try:
            found = None
            if n.op == "call_module":
                found = self.module(n)
            elif n.op == "call_function":
                found = self.function(n, n.target, n.args, n.kwargs)
            elif n.op == "call_method":
                handler = vocab.FX_METHODS.get(n.target)
                found = handler(self, n, n.args, n.kwargs) if handler is not None else None
        except (TypeError, ValueError, IndexError, AttributeError, KeyError):
            found = None
        if found is None:
            return self.opaque(n)
        op, data = found
        node = self._node(op, n, data, name=n.target if n.op == "call_module" else None)
        if n in self.anew:  # named after the module that wrote it, not after its last intermediate node
            node.origin = None
            node.name = node.name[:-len(n.name) - 1] if node.name.endswith("." + n.name) else node.name
        return node

    def module(self, n: fx.Node):
        m = self.modules[n.target]
        handler = vocab.by_class(vocab.FX_MODULES, type(m))
        if handler is None:
            return None
        if has_hooks(m):
            self.note(f"'{n.target}': the module has forward hooks, which fusing would drop; left as is")
            return None
        return handler(self, n, m)

    def function(self, n: fx.Node, f, args, kwargs):
        """Recognize node ``n`` as a call of ``f`` on ``args``/``kwargs`` (a recognizer may delegate here)."""
        handler = vocab.FX_FUNCTIONS.get(f)
        return None if handler is None else handler(self, n, args, kwargs)

    def mean(self, args, kwargs):
        a = dict(zip(("input", "dim", "keepdim"), args), **kwargs)
        if a.get("dim") is None or a.get("dtype") is not None:
            return None
        return Mean(_tuple(a["dim"], 1), bool(a.get("keepdim", False))), [a["input"]]

    def getitem(self, n: fx.Node):
        """chunk(x)[i] / split(x)[i] as Slice(x); the chunk node itself never becomes an IR node."""
        src, index = n.args
        if not (isinstance(src, fx.Node) and isinstance(index, int)):
            return None
        splitter = vocab.FX_SPLITS.get(src.target) if src.op == "call_function" else None
        sizes = splitter(self, src) if splitter is not None else self.split_sizes(src)
        if sizes is None:
            return None
        x, dim, sizes = sizes
        index %= len(sizes)
        start = sum(sizes[:index])
        return Slice(dim, start, start + sizes[index]), [x]

    def split_sizes(self, src: fx.Node):
        if src.op == "call_function" and src.target in (torch.chunk, torch.split):
            kind = src.target.__name__
        elif src.op == "call_method" and src.target in ("chunk", "split"):
            kind = src.target
        else:
            return None
        if not all(u.op == "call_function" and u.target is operator.getitem for u in src.users):
            return None
        names = ("input", "chunks" if kind == "chunk" else "split_size_or_sections", "dim")
        a = dict(zip(names, src.args), **src.kwargs)
        if "split_size" in a:
            a["split_size_or_sections"] = a.pop("split_size")
        x = a["input"]
        shape = fx_shape(x)
        if shape is None or not isinstance(x, fx.Node) or self.const(x) is not None:
            return None
        dim = a.get("dim", 0) % len(shape)
        total = shape[dim]
        if kind == "chunk":
            step = -(-total // a["chunks"])
            sizes = [min(step, total - k) for k in range(0, total, step)]
        elif isinstance(a["split_size_or_sections"], int):
            step = a["split_size_or_sections"]
            sizes = [min(step, total - k) for k in range(0, total, step)]
        else:
            sizes = list(a["split_size_or_sections"])
        return x, dim, sizes

    def arithmetic(self, n: fx.Node, f, args, kwargs):
        add = (operator.add, torch.add, operator.iadd)
        sub = (operator.sub, torch.sub, operator.isub)
        mul = (operator.mul, torch.mul, operator.imul)
        div = (operator.truediv, torch.div, torch.true_divide, operator.itruediv)
        if "other" in kwargs or "input" in kwargs:  # torch.add(a, other=b), a.add(other=b)
            kwargs = dict(kwargs)
            args = tuple(args) + tuple(kwargs.pop(k) for k in ("input", "other")[len(args):] if k in kwargs)
        if f in (operator.neg, torch.neg):
            return Affine(torch.tensor(-1.0, dtype=torch.float64), None, None), [args[0]]
        if f not in add + sub + mul + div or len(args) != 2:
            return None
        if f in (operator.iadd, operator.isub, operator.imul, operator.itruediv):
            # in place: only safe when nobody else reads the mutated tensor
            if not isinstance(args[0], fx.Node) or len(args[0].users) != 1:
                return None
        alpha = kwargs.get("alpha", 1)
        if set(kwargs) - {"alpha"} or (f is torch.div and kwargs.get("rounding_mode")):
            return None
        a, b = args
        ca, cb = self.const(a), self.const(b)
        if ca is None and cb is None:
            if f in add:
                return Sum((1.0, float(alpha))), [a, b]
            if f in sub:
                return Sum((1.0, -float(alpha))), [a, b]
            return None
        if ca is not None and cb is not None:
            return None
        x, c = (a, cb) if ca is None else (b, ca)
        shape = fx_shape(x) if isinstance(x, fx.Node) else None
        if not isinstance(x, fx.Node) or shape is None:
            return None
        per_axis = _per_axis(c, shape, n)
        if per_axis is None:
            return None
        values, axis = per_axis
        one = torch.ones((), dtype=torch.float64)
        like = c if isinstance(c, torch.Tensor) else None
        meta = dict(dtype=self.dtype_of(a if x is b else b), device=like.device if like is not None else None)
        if f in add:  # x + α·c, or c + α·x
            if x is a:
                return Affine(one, values * alpha, axis, **meta), [x]
            return Affine(float(alpha) * one, values, axis, **meta), [x]
        if f in sub:
            if x is a:
                return Affine(one, -values * alpha, axis, **meta), [x]
            return Affine(-float(alpha) * one, values, axis, **meta), [x]
        if f in mul:
            return Affine(values, None, axis, **meta), [x]
        if x is a:  # x / c
            if (values == 0).any():
                return None
            return Affine(1.0 / values, None, axis, **meta), [x]
        return None


# --- the built-in recognizers, registered like any other ------------------------------------------------------
def _only_input(n: fx.Node):
    """The one data input of a module call taking exactly one positional tensor, else None."""
    x = n.args[0] if n.args else None
    return x if len(n.args) == 1 and not n.kwargs and isinstance(x, fx.Node) else None


@vocab.fx_module(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv_module(ctx: FxImporter, n: fx.Node, m: nn.Module):
    x = _only_input(n)
    if x is None or not any(same_forward(m, base) for base in (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return None
    return conv_op(m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups, m.padding_mode), [x]


@vocab.fx_module(nn.modules.batchnorm._BatchNorm)
def _bn_module(ctx: FxImporter, n: fx.Node, m: nn.Module):
    x = _only_input(n)
    if x is None or not (type(m).forward is type(m).__mro__[1].forward
                         or type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)):
        return None
    if m.training or m.running_mean is None or not m.track_running_stats:
        ctx.note(f"'{n.target}': BatchNorm without running statistics (or in training mode) is not affine; left as is")
        return None
    return _bn_affine(m.running_mean, m.running_var, m.weight, m.bias, m.eps, m.running_mean), [x]


@vocab.fx_module(nn.Linear)
def _linear_module(ctx: FxImporter, n: fx.Node, m: nn.Module):
    x = _only_input(n)
    if x is None or not same_forward(m, nn.Linear):
        return None
    return Linear(held(m.weight), held(m.bias), dtype=m.weight.dtype, device=m.weight.device), [x]


@vocab.fx_module(nn.Identity, nn.modules.dropout._DropoutNd)
def _identity_module(ctx: FxImporter, n: fx.Node, m: nn.Module):
    x = _only_input(n)
    if x is None or not (type(m) is nn.Identity or (isinstance(m, nn.modules.dropout._DropoutNd) and not m.training)):
        return None
    return Identity(), [x]


@vocab.fx_module(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
def _avg_pool_module(ctx: FxImporter, n: fx.Node, m: nn.Module):
    x = _only_input(n)
    nd = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}.get(type(m))
    if x is None or nd is None:
        return None
    return AvgPool(_tuple(m.kernel_size, nd), _tuple(m.stride or m.kernel_size, nd), _tuple(m.padding, nd),
                   m.ceil_mode, m.count_include_pad, getattr(m, "divisor_override", None)), [x]


@vocab.fx_module(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
def _adaptive_pool_module(ctx: FxImporter, n: fx.Node, m: nn.Module):
    x = _only_input(n)
    nd = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}.get(type(m))
    if x is None or nd is None or not all(o == 1 for o in _tuple(m.output_size, nd)):
        return None
    return Mean(tuple(range(2, 2 + nd)), keepdim=True), [x]


@vocab.fx_module(nn.Flatten)
def _flatten_module(ctx: FxImporter, n: fx.Node, m: nn.Module):
    x = _only_input(n)
    return (Flatten(m.start_dim, m.end_dim), [x]) if x is not None and type(m) is nn.Flatten else None


@vocab.fx_function(F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d)
def _conv_function(ctx: FxImporter, n, args, kwargs):
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    a = dict(zip(names, args), **kwargs)
    w, b = ctx.const(a["weight"]), ctx.const(a.get("bias"))
    if w is None or (a.get("bias") is not None and b is None):
        return None
    op = conv_op(w, b, a.get("stride", 1), a.get("padding", 0), a.get("dilation", 1), a.get("groups", 1))
    return (None if op is None else op.with_(dtype=ctx.dtype_of(a["weight"]))), [a["input"]]


@vocab.fx_function(F.linear)
def _linear_function(ctx: FxImporter, n, args, kwargs):
    a = dict(zip(("input", "weight", "bias"), args), **kwargs)
    w, b = ctx.const(a["weight"]), ctx.const(a.get("bias"))
    if w is None or (a.get("bias") is not None and b is None):
        return None
    return Linear(held(w), held(b), dtype=ctx.dtype_of(a["weight"]), device=w.device), [a["input"]]


@vocab.fx_function(F.batch_norm, torch.batch_norm)
def _bn_function(ctx: FxImporter, n, args, kwargs):
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    a = dict(zip(names, args), **kwargs)
    rm, rv = ctx.const(a["running_mean"]), ctx.const(a["running_var"])
    if rm is None or rv is None or a.get("training", False) is not False:
        return None
    w, b = ctx.const(a.get("weight")), ctx.const(a.get("bias"))
    if (a.get("weight") is not None and w is None) or (a.get("bias") is not None and b is None):
        return None
    return _bn_affine(rm, rv, w, b, a.get("eps", 1e-5), rm).with_(dtype=ctx.dtype_of(a["running_mean"])), \
        [a["input"]]


@vocab.fx_function(F.pad)
def _pad_function(ctx: FxImporter, n, args, kwargs):
    a = dict(zip(("input", "pad", "mode", "value"), args), **kwargs)
    if a.get("mode", "constant") != "constant" or (a.get("value") or 0) != 0:
        return None
    p = list(a["pad"])
    pairs = tuple((p[i], p[i + 1]) for i in range(0, len(p), 2))[::-1]
    if any(lo < 0 or hi < 0 for lo, hi in pairs):
        return None
    return Pad(pairs), [a["input"]]


@vocab.fx_function(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout)
def _dropout_function(ctx: FxImporter, n, args, kwargs):
    a = dict(zip(("input", "p", "training"), args), **kwargs)
    return (Identity(), [a["input"]]) if a.get("training", True) is False else None


@vocab.fx_function(torch.cat, torch.concat, torch.concatenate)
def _cat_function(ctx: FxImporter, n, args, kwargs):
    tensors = args[0] if args else kwargs["tensors"]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if not all(isinstance(t, fx.Node) and ctx.const(t) is None for t in tensors):
        return None
    return Cat(dim), list(tensors)


@vocab.fx_function(operator.getitem)
def _getitem_function(ctx: FxImporter, n, args, kwargs):
    return ctx.getitem(n)


@vocab.fx_function(operator.getitem)
def _crop_function(ctx: FxImporter, n, args, kwargs):
    """x[:, :, a:b] / x[..., a:b]: slices with unit step that narrow one axis of a known shape, as a Slice."""
    x, index = args
    shape = ctx.shape(x)
    if shape is None or ctx.const(x) is not None or not isinstance(x, fx.Node):
        return None
    index = index if isinstance(index, tuple) else (index,)
    if index.count(Ellipsis) > 1 or not all(isinstance(i, slice) or i is Ellipsis for i in index):
        return None
    if Ellipsis in index:
        k = index.index(Ellipsis)
        index = index[:k] + (slice(None),) * (len(shape) - len(index) + 1) + index[k + 1:]
    if len(index) > len(shape):
        return None
    narrowed = []
    for dim, s in enumerate(index):
        if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (s.start, s.stop, s.step)):
            return None
        start, stop, step = s.indices(shape[dim])
        if step != 1:
            return None
        if (start, stop) != (0, shape[dim]):
            narrowed.append(Slice(dim, start, max(start, stop)))
    if len(narrowed) > 1:
        return None  # one IR op per node: a crop of several axes stays opaque here (the ATen capture splits it)
    return (narrowed[0] if narrowed else Identity()), [x]


@vocab.fx_function(torch.flatten)
def _flatten_function(ctx: FxImporter, n, args, kwargs):
    a = dict(zip(("input", "start_dim", "end_dim"), args), **kwargs)
    return Flatten(a.get("start_dim", 0), a.get("end_dim", -1)), [a["input"]]


@vocab.fx_function(torch.mean)
def _mean_function(ctx: FxImporter, n, args, kwargs):
    return ctx.mean(args, kwargs)


@vocab.fx_function(F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
def _adaptive_pool_function(ctx: FxImporter, n, args, kwargs):
    x, size = args[0], args[1] if len(args) > 1 else kwargs["output_size"]
    shape = fx_shape(x)
    if shape is None or any(s != 1 for s in _tuple(size, len(shape) - 2)):
        return None
    return Mean(tuple(range(2, len(shape))), keepdim=True), [x]


_ARITHMETIC = (operator.add, torch.add, operator.iadd, operator.sub, torch.sub, operator.isub, operator.mul, torch.mul,
               operator.imul, operator.truediv, torch.div, torch.true_divide, operator.itruediv, operator.neg, torch.neg)


def _arithmetic(f):
    def recognize(ctx: FxImporter, n, args, kwargs):
        return ctx.arithmetic(n, f, args, kwargs)
    return recognize


for _f in _ARITHMETIC:
    vocab.fx_function(_f, fn=_arithmetic(_f))

_METHODS = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "neg": torch.neg,
            "flatten": torch.flatten, "mean": torch.mean}


@vocab.fx_method(*_METHODS)
def _tensor_method(ctx: FxImporter, n, args, kwargs):
    """``x.add(y)`` and friends: recognized as the torch function of the same name."""
    return ctx.function(n, _METHODS[n.target], args, kwargs)


@vocab.fx_method(*(name + "_" for name in _METHODS if name not in ("flatten", "mean")))
def _in_place_method(ctx: FxImporter, n, args, kwargs):
    """``x.add_(y)`` and friends on a tensor nothing else reads: the same as ``x.add(y)`` (nothing can observe the
    old value)."""
    if not (args and isinstance(args[0], fx.Node) and len(args[0].users) == 1):
        return None
    return ctx.function(n, _METHODS[n.target[:-1]], args, kwargs)


_AVG_POOLS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}


@vocab.fx_function(*_AVG_POOLS)
def _avg_pool_function(ctx: FxImporter, n, args, kwargs):
    nd = _AVG_POOLS[n.target]
    names = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
    a = dict(zip(names, args), **kwargs)
    k = _tuple(a["kernel_size"], nd)
    stride = a.get("stride")
    return AvgPool(k, _tuple(stride, nd) if stride not in (None, [], ()) else k, _tuple(a.get("padding", 0), nd),
                   bool(a.get("ceil_mode", False)), bool(a.get("count_include_pad", True)),
                   a.get("divisor_override")), [a["input"]]


def permute_op(x, rest, kwargs, kind: str):
    """x.permute(*dims) / x.permute(dims) / x.transpose(d0, d1) as Permute (the rank from x's shape)."""
    shape = fx_shape(x) if isinstance(x, fx.Node) else None
    if shape is None or kwargs.get("memory_format") is not None:
        return None
    rank = len(shape)
    if kind == "transpose":
        d0, d1 = (list(rest) + [kwargs.get("dim0"), kwargs.get("dim1")][len(rest):])[:2]
        dims = list(range(rank))
        dims[d0 % rank], dims[d1 % rank] = dims[d1 % rank], dims[d0 % rank]
    else:
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest or kwargs.get("dims")
        dims = [int(d) % rank for d in dims]
    if sorted(dims) != list(range(rank)):
        return None
    return Permute(tuple(dims)), [x]


@vocab.fx_function(torch.permute, torch.transpose)
def _permute_function(ctx: FxImporter, n, args, kwargs):
    return permute_op(args[0], args[1:], kwargs, n.target.__name__)


@vocab.fx_method("permute", "transpose")
def _permute_method(ctx: FxImporter, n, args, kwargs):
    return permute_op(args[0], args[1:], kwargs, n.target)


@vocab.fx_method("contiguous")
def _contiguous_method(ctx: FxImporter, n, args, kwargs):
    return (Identity(), [args[0]]) if len(args) == 1 and not kwargs else None


def _to_float64(v):
    return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def _per_axis(c, shape: tuple[int, ...], n: fx.Node):
    """A constant that broadcasts along at most one axis of ``shape``: (values, axis) or None."""
    out_shape = fx_shape(n)
    if out_shape is not None and tuple(out_shape) != tuple(shape):
        return None  # the constant changes the shape: not a per-axis affine
    # a Python number goes straight to float64 (torch.as_tensor would round it to float32 first)
    t = torch.as_tensor(c, dtype=torch.float64) if isinstance(c, numbers.Number) else \
        c.detach().to("cpu", torch.float64)
    return per_axis(t, shape)


def import_fx(gm: fx.GraphModule) -> tuple[Graph, list[str]]:
    """The IR of ``gm`` (whose nodes should carry shape metadata) and notes on what was not recognized."""
    imp = FxImporter(gm)
    return imp.run(), imp.notes
