"""Shapes for a traced graph: each node's output shape and dtype, found without running the model.

Convolutions and linears get their output shape from their configuration, and layers that keep their
input's shape (BatchNorm, activations, dropout, identity) the input's. Every other call runs on the
'meta' device (tensors without data); function and method calls are memoized by what their arguments
look like, since a model repeats the same few calls many times. A graph that cannot be propagated on
meta is run for real on the example inputs.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.utils._pytree import tree_flatten, tree_map

from reparam.core.ops import broadcast_shapes

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SHAPE_KEEPING = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.Softplus, nn.Hardtanh, nn.PReLU, nn.Softsign, nn.Tanhshrink,
)
_IN_PLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}
# calls whose result is laid out like their operands (the first meta kernel call costs a second of set-up)
_UNARY = {F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.leaky_relu,
          F.elu, F.dropout, torch.relu, torch.sigmoid, torch.tanh, "relu", "sigmoid", "tanh", "contiguous"}
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div,
           "add", "sub", "mul", "div"}
_DIVISIONS = {operator.truediv, torch.div, "div"}


def same_forward(m: nn.Module, base: type) -> bool:
    """A module of ``base`` type whose forward has not been overridden (so it computes what base computes)."""
    return isinstance(m, base) and all(getattr(type(m), f, None) is getattr(base, f, None)
                                       for f in ("forward", "_conv_forward"))


def meta_mirror(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers live on the meta device (no data is copied)."""
    memo = {}
    for t in list(module.parameters()) + list(module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def conv_output_shape(m: nn.Module, x: torch.Tensor) -> tuple[int, ...] | None:
    """The output shape of conv module ``m`` on ``x`` (batched or not), or None if ``m`` would reject ``x``."""
    nd = m.weight.ndim - 2
    if x.ndim not in (nd + 1, nd + 2) or x.shape[-nd - 1] != m.in_channels or x.dtype != m.weight.dtype:
        return None
    size = x.shape[-nd:]
    if m.padding == "same":
        spatial = tuple(size)
    else:
        pads = (0,) * nd if m.padding == "valid" else m.padding
        spatial = tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                        for n, p, d, k, s in zip(size, pads, m.dilation, m.kernel_size, m.stride))
    if any(n <= 0 for n in spatial):
        return None
    return (*x.shape[:-nd - 1], m.out_channels, *spatial)


def _operand(v) -> bool:
    return isinstance(v, torch.Tensor) or (isinstance(v, (int, float)) and not isinstance(v, bool))


def elementwise_result(target, args, kwargs) -> torch.Tensor | None:
    """The meta result of a unary or binary elementwise call (broadcast shape, promoted dtype), from its
    operands alone; None when the call is not one of those."""
    if target in _UNARY and args and isinstance(args[0], torch.Tensor) and \
            not any(isinstance(v, torch.Tensor) for v in (*args[1:], *kwargs.values())):
        return args[0].new_empty(args[0].shape)
    if target in _BINARY and len(args) == 2 and set(kwargs) <= {"alpha"} and all(_operand(v) for v in args):
        tensors = [v for v in args if isinstance(v, torch.Tensor)]
        if not tensors:
            return None
        shape = broadcast_shapes([tuple(t.shape) for t in tensors])
        if shape is None:
            return None  # let the real kernel raise its own error
        dtype = torch.result_type(*args)
        if target in _DIVISIONS and not (dtype.is_floating_point or dtype.is_complex):
            dtype = torch.get_default_dtype()
        return torch.empty(shape, dtype=dtype, device="meta")
    if target in (torch.mean, "mean") and len(args) == 2 and isinstance(args[0], torch.Tensor) \
            and args[0].dtype.is_floating_point and not set(kwargs) - {"keepdim"}:
        return _mean_result(args[0], args[1], bool(kwargs.get("keepdim", False)))
    if target in (torch.cat, torch.concat) and args and not set(kwargs) - {"dim"}:
        return _cat_result(args[0], args[1] if len(args) > 1 else kwargs.get("dim", 0))
    return None


def _mean_result(x: torch.Tensor, dims, keepdim: bool) -> torch.Tensor | None:
    dims = (dims,) if isinstance(dims, int) else dims
    if not isinstance(dims, (tuple, list)) or not dims or not all(isinstance(d, int) for d in dims) or x.ndim == 0:
        return None
    axes = {d % x.ndim for d in dims}
    shape = [1 if k in axes else n for k, n in enumerate(x.shape) if keepdim or k not in axes]
    return torch.empty(shape, dtype=x.dtype, device="meta")


def _cat_result(tensors, dim) -> torch.Tensor | None:
    if not isinstance(tensors, (list, tuple)) or not tensors or not isinstance(dim, int) or \
            not all(isinstance(t, torch.Tensor) and t.ndim == tensors[0].ndim > 0 for t in tensors):
        return None
    d = dim % tensors[0].ndim
    rest = {tuple(t.shape[:d]) + tuple(t.shape[d + 1:]) for t in tensors}
    if len(rest) != 1:
        return None
    shape = list(tensors[0].shape)
    shape[d] = sum(t.shape[d] for t in tensors)
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    return torch.empty(shape, dtype=dtype, device="meta")


def _layout(a: Any):
    """A hashable description of an argument that fixes a meta call's result, or raises TypeError."""
    if isinstance(a, torch.Tensor):
        return ("tensor", tuple(a.shape), a.dtype, a.stride())
    if isinstance(a, (tuple, list)):
        return (type(a).__name__, *(_layout(v) for v in a))
    if isinstance(a, dict):
        return ("dict", *((k, _layout(v)) for k, v in a.items()))
    if isinstance(a, slice):
        return ("slice", _layout(a.start), _layout(a.stop), _layout(a.step))
    if a is None or isinstance(a, (bool, int, float, str, torch.dtype, torch.device, torch.memory_format)):
        return (type(a).__name__, a)
    raise TypeError(f"no layout for {type(a).__name__}")


class _MetaShapeProp(ShapeProp):
    """ShapeProp on the 'meta' device: every tensor is mirrored without data."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self._mirrors: dict[str, nn.Module] = {}
        self._calls: dict[tuple, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        """Run the node on meta and record its layout as ShapeProp does (``tensor_meta``), without
        ShapeProp's memory-format queries, whose first use imports torch's symbolic-shape machinery."""
        result = fx.Interpreter.run_node(self, n)

        def describe(t):
            if not isinstance(t, torch.Tensor):
                return t
            return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), None, False, {})

        if any(isinstance(t, torch.Tensor) for t in tree_flatten(result)[0]):
            n.meta["tensor_meta"] = fx.node.map_aggregate(result, describe)
        n.meta["type"] = type(result)
        return result

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        x = args[0] if len(args) == 1 and not kwargs else None
        if isinstance(x, torch.Tensor):
            if isinstance(module, nn.modules.batchnorm._BatchNorm) or type(module) in _SHAPE_KEEPING:
                return x.new_empty(x.shape)  # a BatchNorm's own meta kernel would pull in torch._dynamo
            if any(same_forward(module, c) for c in _CONVS) and (shape := conv_output_shape(module, x)):
                return x.new_empty(shape)
            if same_forward(module, nn.Linear) and x.ndim >= 1 and x.shape[-1] == module.in_features \
                    and x.dtype == module.weight.dtype:
                return x.new_empty((*x.shape[:-1], module.out_features))
        if target not in self._mirrors:
            self._mirrors[target] = meta_mirror(module)
        return self._mirrors[target](*args, **kwargs)

    def call_function(self, target, args, kwargs):
        if target in (F.batch_norm, torch.batch_norm) and args and isinstance(args[0], torch.Tensor):
            return args[0].new_empty(args[0].shape)
        quick = elementwise_result(target, args, kwargs)
        if quick is not None:
            return quick
        return self._memoized(("f", target), target in _IN_PLACE, super().call_function, target, args, kwargs)

    def call_method(self, target, args, kwargs):
        quick = elementwise_result(target, args, kwargs)
        if quick is not None:
            return quick
        return self._memoized(("m", target), target.endswith("_"), super().call_method, target, args, kwargs)

    def _memoized(self, what, in_place: bool, call, target, args, kwargs):
        """The meta result of a call; equal calls on equally laid out arguments share one result."""
        try:
            key = None if in_place else (what, _layout(args), _layout(kwargs))
            hash(key)
        except TypeError:
            key = None
        if key is not None and key in self._calls:
            return self._calls[key]
        out = call(target, args, kwargs)
        if key is not None:
            self._calls[key] = out
        return out

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        return value.to("meta") if isinstance(value, torch.Tensor) else value


def _to_meta(x):
    return x.to("meta") if isinstance(x, torch.Tensor) else x


def attach_shapes(gm: fx.GraphModule, inputs: tuple | None) -> bool:
    """Annotate nodes with output shapes (on the meta device when possible, else by running). True if done."""
    if inputs is None:
        return False
    if len(inputs) > sum(1 for n in gm.graph.nodes if n.op == "placeholder"):
        return False  # more inputs than the forward takes: the interpreter would silently drop some
    # ShapeProp prints a traceback to stderr before raising; the failure is handled here, so keep it quiet
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        try:
            _MetaShapeProp(gm).propagate(*tree_map(_to_meta, inputs))
            return True
        except Exception:
            pass
        try:
            ShapeProp(gm).propagate(*inputs)
            return True
        except Exception:
            return False
