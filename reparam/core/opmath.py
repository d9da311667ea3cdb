"""Kernel math lifted to ops: each function takes vocabulary ops and returns a new op (never edits one).

These are what rules call; they hold no graph code and check no exactness conditions (rules do).
Each computes in float64 from the values its ops hold (an imported op holds the model's tensors in their own
dtype, ``ops.held``; a rewritten one holds float64) and returns its result in float64: nothing is rounded
between rewrites, and the exporter rounds once to the op's ``dtype``.
"""
from __future__ import annotations

import math

import torch

from reparam.math import kernels
from reparam.core.ops import Affine, AvgPool, Conv, Linear, as_float64 as _f64


def _dtype_of(*ops):
    """The deploy dtype/device of a merged op: those of the first op that has them."""
    for op in ops:
        if op.dtype is not None:
            return dict(dtype=op.dtype, device=op.device)
    return {}


def affine_after(op: Conv | Linear, a: Affine) -> Conv | Linear:
    """a(op(x)): per-output-channel scale and shift folded into W and b."""
    s = _f64(a.scale)
    # W times a per-channel float64 scale is computed in float64 by type promotion, with no float64 copy of W
    # first; a 0-d scale does not promote W, so W is cast
    W = op.weight if s.ndim else _f64(op.weight)
    W, b = kernels.fold_affine_after(W, _f64(op.bias), s, _f64(a.shift))
    return op.with_(weight=W, bias=b)


def affine_before(op: Conv | Linear, a: Affine) -> Conv | Linear:
    """op(a(x)): per-input-channel scale and shift folded into W and b."""
    groups = op.groups if isinstance(op, Conv) else 1
    W, b = kernels.fold_affine_before(_f64(op.weight), _f64(op.bias), groups, _f64(a.scale), _f64(a.shift))
    return op.with_(weight=W, bias=b)


def regroup(op: Conv, groups: int) -> Conv:
    """The same conv expressed with a coarser grouping (``groups`` divides ``op.groups``)."""
    if groups == op.groups:
        return op
    return op.with_(weight=kernels.expand_groups(_f64(op.weight), op.groups, groups), groups=groups)


def redilate(op: Conv, dilation: tuple[int, ...]) -> Conv:
    """The same conv with a smaller dilation (dividing the old one), zeros between the taps."""
    if tuple(dilation) == tuple(op.dilation):
        return op
    return op.with_(weight=kernels.redilate(_f64(op.weight), op.dilation, dilation), dilation=tuple(dilation))


def merge_parallel(convs: list[Conv], coeffs: list[float]) -> Conv:
    """Σ cᵢ·convᵢ(x) as one conv. All convs share stride, dilation, groups and channels; kernels are
    padded to the union of their footprints. Raises ValueError when their alignments differ."""
    first = convs[0]
    d = first.dilation
    geoms = [(tuple(dd * (k - 1) + 1 for dd, k in zip(d, c.kernel_size)), c.padding) for c in convs]
    # work on dense footprints so kernels of different sizes line up tap for tap
    dense = [redilate(c, (1,) * c.nd) for c in convs]
    lo, hi, size, offsets = kernels.parallel_offsets(geoms)
    W = kernels.sum_padded([(c.weight, off, coeff) for c, off, coeff in zip(dense, offsets, coeffs)], size)
    del dense  # densified copies (if any) are consumed
    b = None
    for c, coeff in zip(convs, coeffs):
        if c.bias is not None:
            b = coeff * _f64(c.bias) if b is None else b + coeff * _f64(c.bias)
    merged = first.with_(weight=W, bias=b, padding=tuple(zip(lo, hi)), dilation=(1,) * first.nd,
                         **_dtype_of(*convs))
    return compact_dilation(merged, d)


def compact_dilation(op: Conv, dilation: tuple[int, ...]) -> Conv:
    """Undo densifying when every nonzero tap sits on the ``dilation`` lattice (keeps kernels small)."""
    if all(x == 1 for x in dilation) or any((k - 1) % dd for k, dd in zip(op.kernel_size, dilation)):
        return op
    idx = (slice(None), slice(None), *(slice(None, None, dd) for dd in dilation))
    W = _f64(op.weight)
    off_lattice = torch.ones_like(W, dtype=torch.bool)
    off_lattice[idx] = False
    if off_lattice.any() and W[off_lattice].abs().max().item() != 0:
        return op
    return op.with_(weight=W[idx].clone(), dilation=tuple(dilation))


def merge_linear(linears: list[Linear], coeffs: list[float]) -> Linear:
    W = sum(c * _f64(l.weight) for l, c in zip(linears, coeffs))
    biases = [c * _f64(l.bias) for l, c in zip(linears, coeffs) if l.bias is not None]
    return linears[0].with_(weight=W, bias=sum(biases) if biases else None, **_dtype_of(*linears))


def compose(first: Conv, second: Conv) -> Conv:
    """second(first(x)) as one conv (caller has checked exactness), in the finest common grouping."""
    g = math.gcd(first.groups, second.groups)
    a, b = regroup(first, g), regroup(second, g)
    W, bias, groups, stride, dilation, pad = kernels.compose_serial(
        _f64(a.weight), _f64(a.bias), g, a.stride, a.dilation, a.padding,
        _f64(b.weight), _f64(b.bias), g, b.stride, b.dilation, b.padding)
    return first.with_(weight=W, bias=bias, groups=groups, stride=stride, dilation=dilation, padding=pad,
                       **_dtype_of(second, first))


def compose_linear(first: Linear, second: Linear) -> Linear:
    W2 = _f64(second.weight)
    W = W2 @ _f64(first.weight)
    b = _f64(second.bias)
    if first.bias is not None:
        b = (W2 @ _f64(first.bias)) + (0 if b is None else b)
    return second.with_(weight=W, bias=b)


def identity_conv(channels: int, groups: int, nd: int, like: Conv, affine: Affine | None = None) -> Conv:
    """x (or a(x)) as a 1-tap conv with stride 1 in the grouping of ``like``."""
    W = kernels.identity_kernel(channels, groups, nd)
    conv = Conv(W, None, (1,) * nd, ((0, 0),) * nd, (1,) * nd, groups, like.padding_mode,
                dtype=like.dtype, device=like.device)
    return conv if affine is None else affine_after(conv, affine)


def avgpool_conv(pool: AvgPool, channels: int, like) -> Conv:
    """AvgPool(k, s, p) as a depthwise conv with weights 1/prod(k) (count_include_pad or p = 0)."""
    nd = len(pool.kernel_size)
    W = kernels.avgpool_kernel(channels, pool.kernel_size, pool.divisor_override)
    return Conv(W, None, tuple(pool.stride), tuple((p, p) for p in pool.padding), (1,) * nd, channels,
                dtype=getattr(like, "dtype", None), device=getattr(like, "device", None))


def macs_per_pixel(op: Conv) -> int:
    """Multiply-accumulates per output position (for profitability guards)."""
    return op.out_channels * op.weight.shape[1] * math.prod(op.kernel_size)
