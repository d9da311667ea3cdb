"""The op kind Reshape: ``y = x.reshape(-1, *rest)``, the leading (batch) axis inferred, every other size fixed
(``x.reshape(*x.size())``, ``x.reshape(B, C, h, w)``, ``x.view(-1, S·h·w, 1, 1)``; ATen view/reshape/_unsafe_view;
ONNX Reshape with a constant shape). Added through the public extension API (``reparam.core.ops.Op`` +
``reparam.core.vocabulary``), as a user's rules file would add one. A reshape that merges one run of axes is
still Flatten, and one that changes nothing Identity (``reparam.core.ops.flatten_of``).

A reshape moves no value: element f of the flattened input is element f of the flattened output (row-major).
Its leading size is written as -1, so the op equals the source wherever the source's own sizes are valid: in
torch.fx and ONNX the source's leading size must come from the data (x.size(0), ONNX's 0) or be -1 (a literal
batch is left opaque: the deploy model keeps running at that batch only); a torch.export program is static,
every size in it a literal. A reshape may merge rows of several
samples (RepMLP's partitions back into images), so it is not batch-free: the local checks of a rewrite that
holds one run on the leaves' captured batch (``Op.batch_free``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from reparam.core import vocabulary as vocab
from reparam.core.ops import Op, flatten_of, prod


@dataclass(frozen=True, eq=False)
class Reshape(Op):
    """y = x.reshape(-1, *rest): the leading axis inferred, the others ``rest``."""

    rest: tuple[int, ...]

    batch_free = False

    def evaluate(self, x):
        return x.reshape(-1, *self.rest)

    def output_shape(self, shapes):
        x = shapes[0]
        n, per = prod(x), prod(self.rest)
        return (n // per, *self.rest) if per and n % per == 0 else None

    def __repr__(self):
        return f"Reshape(-1, {', '.join(map(str, self.rest))})"


def reshape_op(src, dst) -> Op | None:
    """The op of a reshape of a ``src``-shaped tensor to ``dst`` (both concrete): Identity, Flatten or Reshape."""
    if src is None or dst is None or not src or not dst:
        return None
    same = flatten_of(src, dst)
    if same is not None:
        return same
    rest = tuple(int(d) for d in dst[1:])
    if prod(src) != prod(dst) or not all(d > 0 for d in rest):
        return None
    return Reshape(rest)


# --- torch.fx ------------------------------------------------------------------------------------------------
def _sizes(args, kwargs):
    sizes = list(args[1:]) if len(args) > 1 else list(kwargs.get("shape", kwargs.get("size", ())))
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = list(sizes[0])
    return sizes


@vocab.fx_method("reshape", "view")
def _fx_method(ctx, n, args, kwargs):
    """x.reshape(a, b, …) / x.view(…): the leading size comes from the data (x.size(0)) or is -1, every other one
    is a literal int, so the op is what the source computes for any batch. A literal leading size fixes the batch
    (``reshape(1, C, H, W)``): left opaque, so the deploy model keeps running at that batch only."""
    x = args[0]
    sizes = _sizes(args, kwargs)
    if not isinstance(x, fx.Node) or ctx.const(x) is not None or not sizes:
        return None
    if isinstance(sizes[0], int) and sizes[0] != -1:
        return None
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes[1:]):
        return None
    op = reshape_op(ctx.shape(x), ctx.shape(n))
    if op is None or (isinstance(op, Reshape) and op.rest != tuple(sizes[1:])):
        return None
    return op, [x]


@vocab.fx_function(torch.reshape)
def _fx_function(ctx, n, args, kwargs):
    a = dict(zip(("input", "shape"), args), **kwargs)
    return _fx_method(ctx, n, (a["input"], tuple(a["shape"])), {})


@vocab.aten(torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)
def _aten_view(ctx, n, a):
    x = a["self"]
    if not isinstance(x, fx.Node) or ctx.const(x) is not None:
        return None
    op = reshape_op(ctx.shape(x), ctx.shape(n))
    return None if op is None else (op, [x])


@vocab.aten(torch.ops.aten.reshape.default)
def _aten_reshape(ctx, n, a):
    return _aten_view(ctx, n, a)


@vocab.fx_emitter(Reshape)
def _fx_emit(ctx, node, op: Reshape, xs):
    return ctx.call(torch.reshape, (xs[0], (-1, *op.rest)))


# --- ONNX ----------------------------------------------------------------------------------------------------
@vocab.onnx_op("Reshape")
def _onnx_recognize(ctx, n, k):
    """A Reshape with a constant shape whose every size but the first is fixed: a positive int, or 0 copying a
    static input axis (allowzero=0); the first is -1, 0 (the batch copied) or the batch's static size (a literal
    with a dynamic batch fixes the batch: left opaque)."""
    x = n.inputs[0]
    target = ctx.const(n.inputs[1]) if len(n.inputs) > 1 else None
    src, dst, static = ctx.shape(x.name), ctx.shape(n.outputs[0].name), ctx.static.get(x.name)
    if k != 0 or not ctx.is_data(x) or target is None or src is None or dst is None or static is None:
        return None
    target = [int(v) for v in np.ravel(target)]
    if len(target) != len(dst) or n.attrs.get("allowzero", 0):
        return None
    if target[0] not in (-1, 0) and (not static or target[0] != static[0]):
        return None
    rest = []
    for j, t in enumerate(target[1:], start=1):
        size = t if t > 0 else static[j] if t == 0 and j < len(static) else None
        if size is None or size != dst[j]:
            return None
        rest.append(size)
    if any(d is None for d in static[1:]):
        return None
    op = reshape_op(src, dst)
    return (op, [x]) if isinstance(op, Reshape) and op.rest == tuple(rest) else None


@vocab.onnx_emitter(Reshape)
def _onnx_emit(ctx, node, op: Reshape, xs, out):
    base = node.name or "fused"
    return ctx.node("Reshape", base, [xs[0], ctx.ints(f"{base}.shape", (-1, *op.rest))], None, out)
