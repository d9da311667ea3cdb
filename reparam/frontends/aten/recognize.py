"""ATen → vocabulary: the calls of a ``torch.export`` graph (``torch.ops.aten.*`` overloads) as IR ops.

Each ATen call is normalized against its schema (positional and keyword arguments by name, defaults
filled in) and mapped to the same op the functional form would give: conv1d/2d/3d and convolution
(not transposed), batch_norm (training=False, constant running statistics), linear, addmm/mm on a
constant weight, add/sub (alpha), mul/div by a scalar or per-axis constant, neg, cat, chunk/split
(through their getitems), a unit-step slice, pad/constant_pad_nd with zeros, mean over dims, flatten, a view that merges
a run of axes, dropout (train=False), clone, alias, avg_pool and adaptive average pooling to 1.
Anything else stays opaque. :func:`normalize` rewrites decomposed batch norm
(``_native_batch_norm_legit_no_training``/``native_batch_norm`` + getitem 0) into ``aten.batch_norm``.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from reparam.core import vocabulary as vocab
from reparam.core.vocabulary import arguments
from reparam.frontends.fx import importer
from reparam.core.ops import AvgPool, Flatten, Identity, Linear, Mean, Slice, f64, flatten_of, held


aten = torch.ops.aten
OpOverload = torch._ops.OpOverload


def is_aten(target: Any) -> bool:
    return isinstance(target, OpOverload)


# --- handlers: (importer, fx node, arguments by name) -> (op, data inputs) or None ---------------------------

def _conv(imp: "importer.FxImporter", n, a):
    if a.get("transposed", False) or any(a.get("output_padding") or []):
        return None
    return imp.function(n, F.conv2d, (a["input"], a["weight"], a["bias"], a["stride"], a["padding"], a["dilation"],
                                      a["groups"]), {})


def _batch_norm(imp, n, a):
    return imp.function(n, F.batch_norm, (a["input"], a["running_mean"], a["running_var"], a["weight"], a["bias"],
                                          a["training"], a["momentum"], a["eps"]), {})


def _linear(imp, n, a):
    return imp.function(n, F.linear, (a["input"], a["weight"], a["bias"]), {})


def _mm(imp, n, a, bias=None, beta=1, alpha=1):
    """x @ W (+ β·b) with a constant W: a Linear with weight α·Wᵀ."""
    w = imp.const(a["mat2"])
    b = imp.const(bias) if bias is not None else None
    if not isinstance(w, torch.Tensor) or w.ndim != 2 or (bias is not None and not isinstance(b, torch.Tensor)):
        return None
    if b is not None and tuple(b.shape) not in ((w.shape[1],), (1, w.shape[1])):
        return None
    # the model's tensors as they are where no scaling is asked for; a scaled one is computed in float64
    weight = held(w).t() if alpha == 1 else f64(w).t().contiguous() * float(alpha)
    bias = None if b is None else held(b).reshape(-1) if beta == 1 else f64(b).reshape(-1) * float(beta)
    return Linear(weight, bias,
                  dtype=imp.dtype_of(a["mat2"]), device=w.device), [a["self"]]


def _addmm(imp, n, a):
    return _mm(imp, n, dict(self=a["mat1"], mat2=a["mat2"]), a["self"], a["beta"], a["alpha"])


def _binary(fn):
    def handler(imp, n, a):
        kwargs = {"alpha": a["alpha"]} if a.get("alpha", 1) != 1 else {}
        if a.get("rounding_mode") is not None:
            return None
        return imp.arithmetic(n, fn, (a["self"], a["other"]), kwargs)
    return handler


def _neg(imp, n, a):
    return imp.arithmetic(n, torch.neg, (a["self"],), {})


def _cat(imp, n, a):
    return imp.function(n, torch.cat, (list(a["tensors"]), a["dim"]), {})


def _pad(imp, n, a):
    if a.get("mode", "constant") != "constant":
        return None
    return imp.function(n, F.pad, (a["self"], list(a["pad"]), "constant", a.get("value") or 0), {})


def _slice(imp, n, a):
    """x[..., start:end, ...] with step 1 on a known shape: a Slice (bounds resolved against the size)."""
    from reparam.frontends.fx.nodes import fx_shape

    x = a["self"]
    shape = fx_shape(x) if isinstance(x, fx.Node) else None
    if shape is None or imp.const(x) is not None or a.get("step", 1) != 1:
        return None
    dim = int(a["dim"]) % len(shape)
    start, stop, _ = slice(a.get("start"), a.get("end")).indices(shape[dim])
    if (start, stop) == (0, shape[dim]):
        return Identity(), [x]
    return Slice(dim, start, max(start, stop)), [x]


def _mean(imp, n, a):
    if a.get("dtype") is not None or not a.get("dim"):
        return None
    return imp.mean((a["self"], list(a["dim"]), a["keepdim"]), {})


def _flatten(imp, n, a):
    return Flatten(a["start_dim"], a["end_dim"]), [a["self"]]


def _view(imp, n, a):
    """A reshape that merges one run of axes [s, e] (everything else kept) is flatten(s, e)."""
    from reparam.frontends.fx.nodes import fx_shape

    x = a["self"]
    src, dst = fx_shape(x) if isinstance(x, fx.Node) else None, fx_shape(n)
    if src is None or dst is None:
        return None
    op = flatten_of(src, dst)
    return None if op is None else (op, [x])


def _permute(imp, n, a):
    return importer.permute_op(a["self"], (list(a["dims"]),), {}, "permute")


def _transpose(imp, n, a):
    return importer.permute_op(a["self"], (a["dim0"], a["dim1"]), {}, "transpose")


def _identity(imp, n, a):
    """clone/alias/contiguous: same values (a memory format changes the layout only)."""
    return Identity(), [a["self"]]


def _dropout(imp, n, a):
    return (Identity(), [a["input"]]) if a.get("train") is False else None


def _per_axis(v, nd: int) -> tuple[int, ...]:
    v = (v,) if isinstance(v, int) else tuple(int(i) for i in v)
    return v * nd if len(v) == 1 else v


def _avg_pool(nd):
    def handler(imp, n, a):
        k = _per_axis(a["kernel_size"], nd)
        stride = _per_axis(a["stride"], nd) or k
        pad = _per_axis(a["padding"], nd)
        if not len(k) == len(stride) == len(pad) == nd:
            return None
        return AvgPool(k, stride, pad, bool(a["ceil_mode"]), bool(a["count_include_pad"]),
                       a.get("divisor_override")), [a["self"]]
    return handler


def _adaptive_avg_pool(imp, n, a):
    from reparam.frontends.fx.nodes import fx_shape

    shape = fx_shape(a["self"])
    size = list(a["output_size"])
    if shape is None or any(s != 1 for s in size) or len(size) != len(shape) - 2:
        return None
    return Mean(tuple(range(2, len(shape))), keepdim=True), [a["self"]]


HANDLERS: dict[OpOverload, Callable] = {
    aten.conv1d.default: _conv, aten.conv2d.default: _conv, aten.conv3d.default: _conv,
    aten.conv1d.padding: _conv, aten.conv2d.padding: _conv, aten.conv3d.padding: _conv,
    aten.convolution.default: _conv,
    aten.batch_norm.default: _batch_norm,
    aten.linear.default: _linear,
    aten.addmm.default: _addmm,
    aten.mm.default: _mm,
    aten.add.Tensor: _binary(torch.add), aten.add.Scalar: _binary(torch.add),
    aten.sub.Tensor: _binary(torch.sub), aten.sub.Scalar: _binary(torch.sub),
    aten.mul.Tensor: _binary(torch.mul), aten.mul.Scalar: _binary(torch.mul),
    aten.div.Tensor: _binary(torch.div), aten.div.Scalar: _binary(torch.div),
    aten.neg.default: _neg,
    aten.cat.default: _cat,
    aten.pad.default: _pad, aten.constant_pad_nd.default: _pad,
    aten.slice.Tensor: _slice,
    aten.mean.dim: _mean,
    aten.flatten.using_ints: _flatten,
    aten.view.default: _view, aten.reshape.default: _view, aten._unsafe_view.default: _view,
    aten.permute.default: _permute, aten.transpose.int: _transpose,
    aten.clone.default: _identity, aten.alias.default: _identity, aten.contiguous.default: _identity,
    aten.dropout.default: _dropout,
    aten.avg_pool1d.default: _avg_pool(1), aten.avg_pool2d.default: _avg_pool(2),
    aten.avg_pool3d.default: _avg_pool(3),
    aten.adaptive_avg_pool1d.default: _adaptive_avg_pool, aten.adaptive_avg_pool2d.default: _adaptive_avg_pool,
    aten.adaptive_avg_pool3d.default: _adaptive_avg_pool, aten._adaptive_avg_pool2d.default: _adaptive_avg_pool,
}

SPLITS = {aten.chunk.default: "chunks", aten.split.Tensor: "split_size", aten.split_with_sizes.default: "split_sizes",
          aten.split.sizes: "split_size"}


def split_sizes(imp: "importer.FxImporter", src: fx.Node):
    """(x, dim, sizes) of an ATen chunk/split whose every user is a getitem, else None."""
    from reparam.frontends.fx.nodes import fx_shape

    if src.op != "call_function" or src.target not in SPLITS:
        return None
    if not all(u.op == "call_function" and u.target is operator.getitem for u in src.users):
        return None
    a = arguments(src.target, src.args, src.kwargs)
    x = a["self"]
    shape = fx_shape(x) if isinstance(x, fx.Node) else None
    if shape is None or imp.const(x) is not None:
        return None
    dim = a["dim"] % len(shape)
    total = shape[dim]
    size = a[SPLITS[src.target]]
    if src.target is aten.chunk.default:
        step = -(-total // size)
        sizes = [min(step, total - k) for k in range(0, total, step)]
    elif isinstance(size, int):
        sizes = [min(size, total - k) for k in range(0, total, size)]
    else:
        sizes = [int(s) for s in size]
    if sum(sizes) != total:
        return None
    return x, dim, sizes


# --- graph normalization (before import) -------------------------------------------------------------------

_DECOMPOSED_BN = {aten._native_batch_norm_legit_no_training.default: False, aten.native_batch_norm.default: True}


def normalize(gm: fx.GraphModule) -> int:
    """Rewrite item 0 of a decomposed inference batch norm as ``aten.batch_norm``; returns how many.

    ``_native_batch_norm_legit_no_training(x, w, b, mean, var, momentum, eps)[0]`` and
    ``native_batch_norm(x, w, b, mean, var, False, momentum, eps)[0]`` are both
    ``batch_norm(x, w, b, mean, var, training=False, momentum, eps)``; the other items (saved
    statistics) must be unused.
    """
    count = 0
    for bn in list(gm.graph.nodes):
        if bn.op != "call_function" or bn.target not in _DECOMPOSED_BN:
            continue
        a = arguments(bn.target, bn.args, bn.kwargs)
        if _DECOMPOSED_BN[bn.target] and a.get("training") is not False:
            continue
        items = list(bn.users)
        if not all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0 for u in items):
            continue
        for item in items:
            with gm.graph.inserting_before(item):
                new = gm.graph.call_function(aten.batch_norm.default, (
                    a["input"], a["weight"], a["bias"], a["running_mean"], a["running_var"], False, a["momentum"],
                    a["eps"], False))
            new.meta = dict(item.meta)
            item.replace_all_uses_with(new)
            gm.graph.erase_node(item)
            count += 1
        gm.graph.erase_node(bn)
    if count:
        gm.recompile()
    return count


for _overload, _handler in HANDLERS.items():
    vocab.aten(_overload, fn=_handler)
vocab.fx_split(*SPLITS, fn=split_sizes)
