"""The op kind ChannelPad: constant padding whose value may differ per channel, added only through the public
extension API (``reparam.core.ops.Op`` + ``reparam.core.vocabulary``). Its rule is ``const_pad_commute.py``.

ChannelPad(pads, value)(x) pads the trailing ``len(pads)`` axes of x by (lo, hi) each (first axis first, as
:class:`reparam.core.ops.Pad`) and writes ``value[c]`` into every padded position of channel c (axis 1); a 0-d
``value`` is one value for every channel. Zero padding stays :class:`~reparam.core.ops.Pad`.

Where it comes from:

- ``F.pad(x, p, value=v)`` (and ATen ``pad`` / ``constant_pad_nd``) with a non-zero scalar v;
- a zero (or constant) pad whose border is then overwritten by index writes of constants
  (``y = F.pad(x, [p] * 4); y[:, :, 0:p, :] = v.view(1, -1, 1, 1); …``, DBB's "pad with the BN bias"). Under the
  concrete capture these arrive as a chain of ATen ``slice_scatter`` / ``select_scatter`` whose sources are
  constants (``copy(region, c)``, ``fill(region, c)``, or a folded constant) on top of the pad. The chain is read by
  replaying its writes on the padded shape: it is a ChannelPad when no write touches the input's positions and
  every padded position of a channel ends up holding one value. Anything else stays opaque.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from reparam.core import vocabulary as vocab
from reparam.core.ops import Op, Pad

Pairs = tuple[tuple[int, int], ...]
aten = torch.ops.aten


def _flat(pads: Pairs) -> list[int]:
    """F.pad's argument: the last axis first."""
    return [p for lo, hi in reversed(pads) for p in (lo, hi)]


def border_mask(shape: tuple[int, ...], pads: Pairs) -> torch.Tensor:
    """A bool tensor of ``shape`` (the padded shape) that is True where ``pads`` put padding."""
    k = len(pads)
    inner = [n - lo - hi for n, (lo, hi) in zip(shape[-k:], pads)]
    return F.pad(torch.zeros(inner, dtype=torch.float64), _flat(pads), value=1.0).bool().expand(shape)


@dataclass(frozen=True, eq=False)
class ChannelPad(Op):
    """Constant padding of the trailing ``len(pads)`` axes with ``value[c]`` in channel c (0-d: one value)."""

    pads: Pairs
    value: torch.Tensor

    @property
    def is_scalar(self) -> bool:
        return self.value.ndim == 0

    def channel_values(self, channels: int) -> torch.Tensor:
        """The pad value of each of ``channels`` channels (1-d)."""
        return self.value.expand(channels) if self.is_scalar else self.value

    def evaluate(self, x):
        y = F.pad(x, _flat(self.pads))
        v = self.value if self.is_scalar else self.value.reshape(1, -1, *[1] * (x.ndim - 2))
        return torch.where(border_mask(tuple(y.shape), self.pads), v.to(y.dtype), y)

    def output_shape(self, shapes):
        x, k = shapes[0], len(self.pads)
        if not self.is_scalar and (len(x) < 2 or k > len(x) - 2 or x[1] != self.value.numel()):
            return None
        return (*x[:-k], *(n + lo + hi for n, (lo, hi) in zip(x[-k:], self.pads)))

    shrinkable = True

    def check_reach(self):
        return max(max(p) for p in self.pads) * 2 + 2 if self.pads else 0

    def __repr__(self):
        v = f"{float(self.value):g}" if self.is_scalar else f"{self.value.numel()} per channel"
        return f"ChannelPad({self.pads}, value={v})"


def pad_op(pads: Pairs, value: torch.Tensor, rank: int | None = None, **meta) -> Op | None:
    """The op padding by ``pads`` with ``value`` (0-d, or one per channel): Pad when it is all zero."""
    value = value.detach().to("cpu", torch.float64).reshape(-1)
    if value.numel() > 1 and bool((value == value[0]).all()):
        value = value[:1]
    if not bool(torch.isfinite(value).all()):
        return None
    if not bool(value.any()):
        return Pad(pads)
    if value.numel() > 1 and (rank is None or len(pads) > rank - 2):
        return None  # per-channel values need a channel axis that is not padded
    return ChannelPad(pads, value.reshape(()) if value.numel() == 1 else value.clone(), **meta)


# --- torch.fx / ATen ----------------------------------------------------------------------------------------
@vocab.fx_function(F.pad)
def _fx_pad(ctx, n, args, kwargs):
    """F.pad(x, p, "constant", v) with a non-zero scalar v (zero padding is the built-in Pad)."""
    a = dict(zip(("input", "pad", "mode", "value"), args), **kwargs)
    value = a.get("value") or 0
    if a.get("mode", "constant") != "constant" or not isinstance(value, (int, float)) or value == 0:
        return None
    if not isinstance(a["input"], fx.Node) or ctx.const(a["input"]) is not None:
        return None
    p = [int(v) for v in a["pad"]]
    pairs = tuple((p[i], p[i + 1]) for i in range(0, len(p), 2))[::-1]
    if len(p) % 2 or any(lo < 0 or hi < 0 for lo, hi in pairs):
        return None
    op = pad_op(pairs, torch.tensor(float(value), dtype=torch.float64))
    return None if op is None else (op, [a["input"]])


_PADS = (aten.pad.default, aten.constant_pad_nd.default)
_WRITES = {aten.slice_scatter.default, aten.select_scatter.default}


def _write_value(ctx, src) -> torch.Tensor | None:
    """The constant a scatter writes: a folded constant, ``copy(region, c)`` or ``fill(region, c)``."""
    c = ctx.const(src)
    if isinstance(c, torch.Tensor):
        return c.to(torch.float64)
    if not isinstance(src, fx.Node) or src.op != "call_function":
        return None
    if src.target is aten.copy.default and not src.kwargs.get("non_blocking", False):
        c = ctx.const(src.args[1])
    elif src.target in (aten.fill.Scalar, aten.fill.Tensor):
        c = ctx.const(src.args[1])
    else:
        return None
    shape = ctx.shape(src)
    if shape is None or not isinstance(c, (torch.Tensor, int, float)) or isinstance(c, bool):
        return None
    return torch.as_tensor(c, dtype=torch.float64).expand(shape)


def _region(shape: tuple[int, ...], write: fx.Node) -> tuple | None:
    """The index (a tuple of slices / an int) a slice_scatter / select_scatter writes."""
    a = vocab.arguments(write.target, write.args, write.kwargs)
    dim = int(a["dim"]) % len(shape)
    if write.target is aten.select_scatter.default:
        where: slice | int = int(a["index"])
    else:
        start = 0 if a.get("start") is None else int(a["start"])
        end = shape[dim] if a.get("end") is None else int(a["end"])
        where = slice(*slice(start, end, int(a.get("step", 1))).indices(shape[dim]))
    return (slice(None),) * dim + (where,)


def _aten_border_writes(ctx, n, a):
    """A chain of constant slice/select scatters on a pad → ChannelPad, when it only rewrites the border with one
    value per channel (replayed on the padded shape: the input's positions untouched, each channel's border
    constant)."""
    writes, base = [], n
    while isinstance(base, fx.Node) and base.op == "call_function" and base.target in _WRITES:
        writes.append(base)
        base = vocab.arguments(base.target, base.args, base.kwargs)["self"]
    if not (isinstance(base, fx.Node) and base.op == "call_function" and base.target in _PADS):
        return None
    found = ctx.function(base, base.target, base.args, base.kwargs)
    shape = ctx.shape(base)
    if found is None or shape is None or len(shape) < 2:
        return None
    op, (x,) = found
    if not isinstance(op, (Pad, ChannelPad)) or len(op.pads) > len(shape) - 2:
        return None
    channels = shape[1]
    values = torch.zeros(shape, dtype=torch.float64)
    if isinstance(op, ChannelPad):
        values += op.channel_values(channels).reshape(1, -1, *[1] * (len(shape) - 2))
    written = torch.zeros(shape, dtype=torch.bool)
    for w in reversed(writes):
        where = _region(shape, w)
        v = _write_value(ctx, vocab.arguments(w.target, w.args, w.kwargs)["src"])
        if v is None:
            return None
        try:
            values[where] = v
        except RuntimeError:  # the source does not broadcast to the region
            return None
        written[where] = True
    border = border_mask(tuple(shape), op.pads)
    if bool((written & ~border).any()):
        return None  # a write into the input's positions: not a pad
    per_channel = values.transpose(0, 1).reshape(channels, -1)[:, border.transpose(0, 1).reshape(channels, -1)[0]]
    if per_channel.shape[1] == 0 or not bool((per_channel == per_channel[:, :1]).all()):
        return None
    new = pad_op(op.pads, per_channel[:, 0], len(shape))
    if new is None:
        return None
    ctx.written_anew(n)  # read through the intermediate writes: no one source node computes it
    return new, [x]


vocab.aten(aten.slice_scatter.default, aten.select_scatter.default, fn=_aten_border_writes)


@vocab.fx_emitter(ChannelPad)
def _fx_emit(ctx, node, op: ChannelPad, xs):
    if op.is_scalar:
        return ctx.call(F.pad, (xs[0], _flat(op.pads), "constant", float(op.value)))
    # where(border, v, pad₀(x)), the border found at run time by padding a zero channel with ones: exact, and for
    # any spatial size
    x = xs[0]
    zero = ctx.call(torch.zeros_like, (ctx.call(torch.narrow, (x, 1, 0, 1)),))
    border = ctx.call(torch.Tensor.bool, (ctx.call(F.pad, (zero, _flat(op.pads), "constant", 1.0)),))
    rank = len(node.shape) if node.shape is not None else len(op.pads) + 2
    value = ctx.attr(node.name, ctx.cast(op.value.reshape(1, -1, *[1] * (rank - 2)), op), "_pad_value")
    return ctx.call(torch.where, (border, value, ctx.call(F.pad, (x, _flat(op.pads)))))


# --- ONNX ----------------------------------------------------------------------------------------------------
@vocab.onnx_op("Pad")
def _onnx_pad(ctx, n, k):
    """ONNX Pad (opset ≥ 11, constant mode) with a non-zero scalar constant_value."""
    if not ctx.only_output(n, k) or ctx.attr(n, "mode", "constant") != "constant" or len(n.inputs) < 3:
        return None
    x = n.inputs[0]
    shape = ctx.shape(x.name)
    if not ctx.is_data(x) or shape is None or not n.inputs[2].name:
        return None
    if len(n.inputs) > 3 and n.inputs[3].name:
        return None  # explicit axes: the built-in reads those (zero values only)
    pads, value = ctx.const(n.inputs[1]), ctx.const(n.inputs[2])
    if pads is None or value is None or np.size(value) != 1 or float(np.ravel(value)[0]) == 0.0:
        return None
    pads = [int(p) for p in np.ravel(pads)]
    rank = len(shape)
    pairs = [(pads[a], pads[a + rank]) for a in range(rank)]
    if any(lo < 0 or hi < 0 for lo, hi in pairs):
        return None
    first = next((a for a, p in enumerate(pairs) if p != (0, 0)), None)
    if first is None:
        return None
    op = pad_op(tuple(pairs[first:]), torch.tensor(float(np.ravel(value)[0]), dtype=torch.float64), rank,
                dtype=ctx.dtype(x.name))
    return None if op is None else (op, [x])


@vocab.onnx_emitter(ChannelPad)
def _onnx_emit(ctx, node, op: ChannelPad, xs, out):
    base, dt = node.name or "fused", ctx.deploy_dtype(node)
    rank = len(node.shape) if node.shape is not None else ctx.input_rank(node)
    if rank is None:
        raise TypeError(f"cannot write back a new {op!r} at '{base}': its rank is unknown")
    k = len(op.pads)
    pads = [0] * (rank - k) + [lo for lo, _ in op.pads] + [0] * (rank - k) + [hi for _, hi in op.pads]
    if op.is_scalar:
        return ctx.node("Pad", base, [xs[0], ctx.ints(f"{base}.pads", pads), ctx.const(f"{base}.value",
                                                                                        op.value.reshape(1), dt)],
                        dict(mode="constant"), out)
    if node.shape is None:
        raise TypeError(f"cannot write back a new {op!r} at '{base}': its output shape is unknown")
    y = ctx.node("Pad", f"{base}.zero_pad", [xs[0], ctx.ints(f"{base}.pads", pads)], dict(mode="constant"))
    mask = ctx.const(f"{base}.border", border_mask((1, 1, *node.shape[2:]), op.pads).numpy())
    value = ctx.const(f"{base}.pad_value", op.value.reshape(1, -1, *[1] * (rank - 2)), dt)
    return ctx.node("Where", base, [mask, value, y], None, out)
