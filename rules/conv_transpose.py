"""The op kind ConvTranspose (nn.ConvTranspose1d/2d/3d, F.conv_transpose*, ATen conv_transpose* and
convolution(transposed=True), ONNX ConvTranspose), added to reparam only through the public extension API
(``reparam.core.ops.Op`` + ``reparam.core.vocabulary``) exactly as a user's rules file would add one. Its rules
live in ``conv_transpose_bn_fold.py`` and ``parallel_conv_transpose.py``.

Geometry. Weight W[in, out/groups, k…]. The full transposed convolution of x (length L per axis) scatters
x[i]·W[t] to position i·s + t·d, a length of (L − 1)·s + d·(k − 1) + 1; the op's output is that, cropped by
``crop = (lo, hi)`` per axis (torch: lo = padding, hi = padding − output_padding, so hi < 0 appends positions
that only get the bias; ONNX: lo = pads_begin, hi = pads_end − output_padding).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from reparam.core import vocabulary as vocab
from reparam.core.ops import Op, f64

Pairs = tuple[tuple[int, int], ...]


@dataclass(frozen=True, eq=False)
class ConvTranspose(Op):
    """N-d transposed convolution (nd = weight.ndim − 2), output cropped by ``crop`` (lo, hi) per axis."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, ...]
    crop: Pairs
    dilation: tuple[int, ...]
    groups: int = 1

    @property
    def nd(self) -> int:
        return self.weight.ndim - 2

    @property
    def in_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def extent(self) -> tuple[int, ...]:
        return tuple(d * (k - 1) + 1 for d, k in zip(self.dilation, self.kernel_size))

    def torch_form(self) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """(padding, output_padding) of the torch op computing exactly this, None if torch has none."""
        pad, extra = tuple(lo for lo, _ in self.crop), tuple(lo - hi for lo, hi in self.crop)
        ok = all(p >= 0 and 0 <= e < max(s, d) for p, e, s, d in zip(pad, extra, self.stride, self.dilation))
        return (pad, extra) if ok else None

    def evaluate(self, x):
        full = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[self.nd - 1]
        form = self.torch_form()
        if form is not None:
            return full(x, self.weight, self.bias, self.stride, form[0], form[1], self.groups, self.dilation)
        y = full(x, self.weight, None, self.stride, 0, 0, self.groups, self.dilation)
        y = F.pad(y, [-p for lo, hi in reversed(self.crop) for p in (lo, hi)])  # negative: crop; positive: append
        return y if self.bias is None else y + self.bias.reshape(-1, *[1] * self.nd)

    def output_shape(self, shapes):
        x = shapes[0]
        spatial = tuple((n - 1) * s + e - lo - hi
                        for n, s, e, (lo, hi) in zip(x[2:], self.stride, self.extent, self.crop))
        return (x[0], self.out_channels, *spatial)

    shrinkable = True

    def check_reach(self):
        return max(-(-(e + abs(lo) + abs(hi)) // s) + 2 for e, s, (lo, hi) in zip(self.extent, self.stride, self.crop))

    def __repr__(self):
        k = "×".join(map(str, self.kernel_size))
        return (f"ConvTranspose{self.nd}d({self.in_channels}→{self.out_channels}, k={k}, s={self.stride}, "
                f"crop={self.crop}, d={self.dilation}, g={self.groups}, bias={self.bias is not None})")


def conv_transpose_op(weight, bias, stride, padding, output_padding, groups, dilation) -> ConvTranspose | None:
    """The op of a torch transposed convolution (per-axis ints or one int each)."""
    nd = weight.ndim - 2
    if nd not in (1, 2, 3):
        return None

    def per_axis(v):
        v = tuple(int(i) for i in v) if isinstance(v, (tuple, list)) else (int(v),)
        return v * nd if len(v) == 1 else v

    stride, padding, extra, dilation = map(per_axis, (stride, padding, output_padding, dilation))
    crop = tuple((p, p - e) for p, e in zip(padding, extra))
    return ConvTranspose(f64(weight), f64(bias), stride, crop, dilation, int(groups), dtype=weight.dtype,
                         device=weight.device)


# --- torch.fx ------------------------------------------------------------------------------------------------
_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@vocab.fx_module(*_MODULES)
def _fx_module(ctx, n, m):
    x = n.args[0] if n.args else None
    if len(n.args) != 1 or n.kwargs or type(m).forward not in {c.forward for c in _MODULES}:
        return None  # an output_size argument, or a subclass with its own forward
    if m.padding_mode != "zeros" or ctx.const(x) is not None:
        return None
    return conv_transpose_op(m.weight, m.bias, m.stride, m.padding, m.output_padding, m.groups, m.dilation), [x]


@vocab.fx_function(F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
def _fx_function(ctx, n, args, kwargs):
    names = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
    a = dict(zip(names, args), **kwargs)
    w, b = ctx.const(a["weight"]), ctx.const(a.get("bias"))
    if not isinstance(w, torch.Tensor) or (a.get("bias") is not None and b is None) or ctx.const(a["input"]) is not None:
        return None
    op = conv_transpose_op(w, b, a.get("stride", 1), a.get("padding", 0), a.get("output_padding", 0),
                           a.get("groups", 1), a.get("dilation", 1))
    return (None if op is None else op.with_(dtype=ctx.dtype_of(a["weight"]))), [a["input"]]


@vocab.aten(torch.ops.aten.conv_transpose1d.default, torch.ops.aten.conv_transpose2d.input,
            torch.ops.aten.conv_transpose3d.input)
def _aten_conv_transpose(ctx, n, a):
    return ctx.function(n, F.conv_transpose2d, (a["input"], a["weight"], a["bias"], a["stride"], a["padding"],
                                                a["output_padding"], a["groups"], a["dilation"]), {})


@vocab.aten(torch.ops.aten.convolution.default)
def _aten_convolution(ctx, n, a):
    if not a["transposed"]:
        return None  # an ordinary convolution: the built-in recognizer registered before this one
    return ctx.function(n, F.conv_transpose2d, (a["input"], a["weight"], a["bias"], a["stride"], a["padding"],
                                                a["output_padding"], a["groups"], a["dilation"]), {})


@vocab.fx_emitter(ConvTranspose)
def _fx_emit(ctx, node, op: ConvTranspose, xs):
    cls = _MODULES[op.nd - 1]
    form = op.torch_form()
    if form is None and any(hi < 0 for _, hi in op.crop):
        raise TypeError(f"cannot write back a new {op!r} at '{node.name}': torch has no transposed convolution "
                        f"with this output crop")
    padding, extra = form if form is not None else ((0,) * op.nd, (0,) * op.nd)
    m = cls(op.in_channels, op.out_channels, op.kernel_size, stride=op.stride, padding=padding,
            output_padding=extra, groups=op.groups, bias=op.bias is not None and form is not None,
            dilation=op.dilation, device="meta", dtype=op.dtype)
    m.weight = nn.Parameter(ctx.cast(op.weight, op))
    if op.bias is not None and form is not None:
        m.bias = nn.Parameter(ctx.cast(op.bias, op))
    y = ctx.module(node.name, m, (xs[0],))
    if form is None:  # the full output, cropped, then the bias
        y = ctx.call(F.pad, (y, [-p for lo, hi in reversed(op.crop) for p in (lo, hi)]))
        if op.bias is not None:
            y = ctx.call(torch.add, (y, ctx.attr(node.name, ctx.cast(op.bias.reshape(-1, *[1] * op.nd), op), "_bias")))
    return y


# --- ONNX ----------------------------------------------------------------------------------------------------
@vocab.onnx_op("ConvTranspose")
def _onnx_recognize(ctx, n, k):
    if not ctx.only_output(n, k):
        return None
    x, w = n.inputs[0], ctx.const(n.inputs[1])
    has_bias = len(n.inputs) > 2 and n.inputs[2].name
    b = ctx.const(n.inputs[2]) if has_bias else None
    if not ctx.is_data(x) or w is None or (has_bias and b is None):
        return None
    nd = w.ndim - 2
    if ctx.attr(n, "auto_pad", "NOTSET") != "NOTSET" or ctx.attr(n, "output_shape") is not None:
        return None  # the output size would be derived from the input's
    ks = ctx.attr(n, "kernel_shape")
    if ks is not None and tuple(ks) != tuple(w.shape[2:]):
        return None
    pads = list(ctx.attr(n, "pads", [0] * (2 * nd)))
    extra = list(ctx.attr(n, "output_padding", [0] * nd))
    crop = tuple((pads[i], pads[i + nd] - extra[i]) for i in range(nd))
    if any(lo < 0 for lo, _ in crop):
        return None

    def t(a):
        return None if a is None else torch.from_numpy(np.array(a, dtype=np.float64))

    return ConvTranspose(t(w), t(b), tuple(ctx.attr(n, "strides", [1] * nd)), crop,
                         tuple(ctx.attr(n, "dilations", [1] * nd)), int(ctx.attr(n, "group", 1)),
                         dtype=ctx.dtype(x.name)), [x]


@vocab.onnx_emitter(ConvTranspose)
def _onnx_emit(ctx, node, op: ConvTranspose, xs, out):
    base, dt = node.name or "fused", ctx.deploy_dtype(node)
    inputs = [xs[0], ctx.const(f"{base}.weight", op.weight, dt)]
    if op.bias is not None:
        inputs.append(ctx.const(f"{base}.bias", op.bias, dt))
    extra = [max(-hi, 0) for _, hi in op.crop]
    attrs = dict(kernel_shape=list(op.kernel_size), strides=list(op.stride), dilations=list(op.dilation),
                 group=op.groups, output_padding=extra,
                 pads=[lo for lo, _ in op.crop] + [hi + e for (_, hi), e in zip(op.crop, extra)])
    return ctx.node("ConvTranspose", base, inputs, attrs, out)
