"""The vocabulary: the small set of linear ops every graph kind is seen as.

An op is immutable data. Its tensors are float64 (all kernel math happens there); ``dtype`` and
``device`` say what the deploy graph must hold once the op is written back. ``evaluate`` is the
float64 reference semantics used by the engine's local checks and by tests.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from reparam.core.expr import Expr
from reparam.math import kernels

Pairs = tuple[tuple[int, int], ...]


@dataclass(frozen=True, eq=False)
class Op:
    """Base of the vocabulary. ``dtype``/``device`` are those of the deploy tensors."""

    dtype: torch.dtype | None = field(default=None, kw_only=True)
    device: torch.device | None = field(default=None, kw_only=True)

    linear = True  # y is a linear (affine) function of the inputs

    def evaluate(self, *xs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no reference semantics")

    def with_(self, **changes: Any) -> "Op":
        return replace(self, **changes)

    def __call__(self, *inputs):
        """Apply this op to nodes or expressions: builds the expression a rewrite returns."""
        return Expr(self, tuple(inputs))

    @property
    def kind(self) -> str:
        return type(self).__name__.lower()


@dataclass(frozen=True, eq=False)
class Conv(Op):
    """N-d convolution (nd = weight.ndim - 2), zero padding given per axis as (lo, hi)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, ...]
    padding: Pairs
    dilation: tuple[int, ...]
    groups: int = 1
    padding_mode: str = "zeros"

    @property
    def nd(self) -> int:
        return self.weight.ndim - 2

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def extent(self) -> tuple[int, ...]:
        """Receptive extent per axis: dilation·(k−1)+1."""
        return tuple(d * (k - 1) + 1 for d, k in zip(self.dilation, self.kernel_size))

    @property
    def is_padded(self) -> bool:
        return any(lo or hi for lo, hi in self.padding)

    @property
    def is_depthwise(self) -> bool:
        return self.groups == self.in_channels and self.groups > 1

    def evaluate(self, x):
        if self.padding_mode != "zeros":
            pads = [p for lo, hi in reversed(self.padding) for p in (lo, hi)]
            x = F.pad(x, pads, mode=self.padding_mode)
            padding = tuple((0, 0) for _ in self.padding)
        else:
            padding = self.padding
        return kernels.conv_nd(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)

    def __repr__(self):
        k = "×".join(map(str, self.kernel_size))
        return (f"Conv{self.nd}d({self.in_channels}→{self.out_channels}, k={k}, s={self.stride}, "
                f"p={self.padding}, d={self.dilation}, g={self.groups}, bias={self.bias is not None})")


@dataclass(frozen=True, eq=False)
class Linear(Op):
    """y = x Wᵀ + b on the last axis."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def evaluate(self, x):
        return F.linear(x, self.weight, self.bias)

    def __repr__(self):
        return f"Linear({self.in_features}→{self.out_features}, bias={self.bias is not None})"


@dataclass(frozen=True, eq=False)
class Affine(Op):
    """y = x·scale + shift along one axis (inference BatchNorm, layer scale, x·α, x + c).

    ``scale``/``shift`` are 1-d (one value per index of ``axis``) or 0-d (a scalar); ``shift`` may be
    None. ``axis`` is a non-negative axis of the input; None means the op is a pure scalar.
    """

    scale: torch.Tensor
    shift: torch.Tensor | None
    axis: int | None = 1

    @property
    def is_scalar(self) -> bool:
        return self.scale.ndim == 0 and (self.shift is None or self.shift.ndim == 0)

    def acts_on(self, axis: int, rank: int) -> bool:
        """True if this affine is per index of ``axis`` (or a scalar) for an input of ``rank``."""
        return self.is_scalar or (self.axis is not None and self.axis % rank == axis % rank)

    def broadcast(self, t: torch.Tensor, rank: int) -> torch.Tensor:
        if t.ndim == 0:
            return t
        shape = [1] * rank
        shape[self.axis] = -1
        return t.reshape(shape)

    def evaluate(self, x):
        y = x * self.broadcast(self.scale, x.ndim)
        return y if self.shift is None else y + self.broadcast(self.shift, x.ndim)

    def __repr__(self):
        n = "scalar" if self.is_scalar else f"{self.scale.numel()} on axis {self.axis}"
        return f"Affine({n}, shift={self.shift is not None})"


@dataclass(frozen=True, eq=False)
class Sum(Op):
    """y = Σ cᵢ·xᵢ (x + y, x − y, weighted sums)."""

    coeffs: tuple[float, ...]

    def evaluate(self, *xs):
        out = self.coeffs[0] * xs[0]
        for c, x in zip(self.coeffs[1:], xs[1:]):
            out = out + c * x
        return out

    def __repr__(self):
        return f"Sum({', '.join(f'{c:g}' for c in self.coeffs)})"


@dataclass(frozen=True, eq=False)
class Pad(Op):
    """Constant-zero padding of the trailing ``len(pads)`` axes, (lo, hi) per axis, first axis first."""

    pads: Pairs

    def evaluate(self, x):
        return F.pad(x, [p for lo, hi in reversed(self.pads) for p in (lo, hi)])


@dataclass(frozen=True, eq=False)
class AvgPool(Op):
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: int | None = None

    def evaluate(self, x):
        fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(self.kernel_size) - 1]
        kw = {} if len(self.kernel_size) == 1 else {"divisor_override": self.divisor_override}
        return fn(x, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad, **kw)


@dataclass(frozen=True, eq=False)
class Permute(Op):
    """y = x.permute(dims): axis k of y is axis ``dims[k]`` of x (a transpose swaps two); values are moved,
    none computed."""

    dims: tuple[int, ...]

    def evaluate(self, x):
        return x.permute(self.dims)


@dataclass(frozen=True, eq=False)
class Identity(Op):
    """y = x (nn.Identity, eval-mode Dropout, .contiguous())."""

    def evaluate(self, x):
        return x


@dataclass(frozen=True, eq=False)
class Cat(Op):
    dim: int

    def evaluate(self, *xs):
        return torch.cat(xs, self.dim)


@dataclass(frozen=True, eq=False)
class Slice(Op):
    """y = x[..., start:stop, ...] on ``dim`` (one output of chunk/split)."""

    dim: int
    start: int
    stop: int

    def evaluate(self, x):
        return x.narrow(self.dim, self.start, self.stop - self.start)


@dataclass(frozen=True, eq=False)
class Mean(Op):
    """Mean over ``dims`` (global average pooling), keeping them if ``keepdim``."""

    dims: tuple[int, ...]
    keepdim: bool = False

    def evaluate(self, x):
        return x.mean(self.dims, keepdim=self.keepdim)


@dataclass(frozen=True, eq=False)
class Flatten(Op):
    start_dim: int = 1
    end_dim: int = -1

    def evaluate(self, x):
        return x.flatten(self.start_dim, self.end_dim)


@dataclass(frozen=True, eq=False)
class Input(Op):
    """A graph input."""

    index: int = 0
    linear = False


@dataclass(frozen=True, eq=False)
class Opaque(Op):
    """Anything outside the vocabulary; kept exactly as it was. ``what`` names it for reports."""

    what: str = "?"
    value: Any = None  # a known constant value (parameters, buffers, folded constants)
    linear = False

    def evaluate(self, *xs):
        if self.value is not None:
            return self.value
        return super().evaluate(*xs)

    def __repr__(self):
        return f"Opaque({self.what})"


VOCABULARY = (Conv, Linear, Affine, Sum, Pad, AvgPool, Identity, Cat, Slice, Mean, Flatten, Permute, Input, Opaque)


def f64(t: torch.Tensor | None) -> torch.Tensor | None:
    """A detached float64 CPU copy (kernel math never touches the model's own tensors)."""
    if t is None:
        return None
    out = t.detach().to("cpu", torch.float64)
    return out.clone() if out.data_ptr() == t.data_ptr() else out


def symmetric(padding: Pairs) -> bool:
    return all(lo == hi for lo, hi in padding)


def prod(xs) -> int:
    return math.prod(xs)


def broadcast_shapes(shapes) -> tuple[int, ...] | None:
    """NumPy broadcasting of ``shapes``, None if they do not broadcast (``torch.broadcast_shapes`` imports
    torch's symbolic-shape machinery, a second of start-up, and is slow per call)."""
    shapes = [tuple(s) for s in shapes]
    rank = max(len(s) for s in shapes)
    out = []
    for sizes in zip(*[(1,) * (rank - len(s)) + s for s in shapes]):
        big = {n for n in sizes if n != 1}
        if len(big) > 1:
            return None
        out.append(big.pop() if big else 1)
    return tuple(out)


def _conv_len(n: int, lo: int, hi: int, extent: int, stride: int) -> int:
    return (n + lo + hi - extent) // stride + 1


def output_shape(op: Op, shapes: list[tuple[int, ...] | None]) -> tuple[int, ...] | None:
    """The output shape of ``op`` for input ``shapes`` (None when unknown)."""
    if any(s is None for s in shapes) or isinstance(op, (Opaque, Input)):
        return None
    x = shapes[0]
    if isinstance(op, Conv):
        spatial = tuple(_conv_len(n, lo, hi, e, s)
                        for n, (lo, hi), e, s in zip(x[2:], op.padding, op.extent, op.stride))
        return (x[0], op.out_channels, *spatial)
    if isinstance(op, Linear):
        return (*x[:-1], op.out_features)
    if isinstance(op, (Affine, Identity, Sum)):
        return broadcast_shapes(shapes)
    if isinstance(op, Pad):
        k = len(op.pads)
        return (*x[:-k], *(n + lo + hi for n, (lo, hi) in zip(x[-k:], op.pads)))
    if isinstance(op, AvgPool):
        if op.ceil_mode:
            return None
        spatial = tuple(_conv_len(n, p, p, k, s) for n, k, s, p in zip(x[2:], op.kernel_size, op.stride, op.padding))
        return (*x[:2], *spatial)
    if isinstance(op, Cat):
        d = op.dim % len(x)
        return (*x[:d], sum(s[d] for s in shapes), *x[d + 1:])
    if isinstance(op, Slice):
        d = op.dim % len(x)
        return (*x[:d], op.stop - op.start, *x[d + 1:])
    if isinstance(op, Mean):
        dims = {d % len(x) for d in op.dims}
        return tuple(1 if k in dims else n for k, n in enumerate(x) if op.keepdim or k not in dims)
    if isinstance(op, Flatten):
        s, e = op.start_dim % len(x), op.end_dim % len(x)
        return (*x[:s], prod(x[s:e + 1]), *x[e + 1:])
    if isinstance(op, Permute):
        return tuple(x[d] for d in op.dims) if len(op.dims) == len(x) else None
    return None
