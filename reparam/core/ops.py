"""The vocabulary: the linear ops every graph kind is seen as. The vocabulary is open: an op kind is a subclass
of :class:`Op` (here, in ``rules/``, or in a user's rules file) that owns all of its semantics.

An op is immutable data. An imported op holds the model's own tensors as they are (``held``: a detached
view in their own dtype, no copy; ops never mutate their tensors); a rewrite computes its result in float64
from those values (:mod:`reparam.core.opmath`) and holds it in float64 until it is written back, so a chain
of rewrites rounds once, when the exporter casts to ``dtype``/``device`` (what the deploy graph must hold).
Small constants (BatchNorm scale and shift, per-axis and folded constants) are held in float64. Each op
kind says:

- ``evaluate(*xs)``: the reference semantics on inputs of any floating dtype (float64 in the local checks,
  the exporters' self-check and the tests), its tensors read in the inputs' dtype;
- ``output_shape(shapes)``: its output shape for known input shapes (None when it cannot tell);
- the traits the local checks use: ``check_signature`` / ``side_by_side`` (checks run together, channels
  laid side by side), ``shrinkable`` and ``check_reach`` (checks on spatially shrunk inputs).

How each front end reads and writes an op kind is registered in :mod:`reparam.core.vocabulary`.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import weakref
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

    def evaluate(self, *xs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no reference semantics")

    def output_shape(self, shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
        """The output shape for these (known) input shapes; None when it cannot tell."""
        return None

    # --- traits of the local checks (reparam.core.checks) ---------------------------------------
    shrinkable = False  # works the same on any spatial size: checks may shrink the spatial axes
    batch_free = True  # works the same on any batch size: checks may run on batch 1

    def check_reach(self) -> int:
        """Spatial size a shrunk check needs for this op to see both borders, an interior and every phase."""
        return 0

    def check_signature(self, spatial: int) -> tuple | None:
        """What must be equal for checks holding this op to run together, channels side by side (None: alone)."""
        return None

    def side_by_side(self, ops: list["Op"]) -> "Op":
        """One op doing what each of ``ops`` (equal signatures, this one first) does on channels laid side by side."""
        return self

    def with_(self, **changes: Any) -> "Op":
        return replace(self, **changes)

    def __call__(self, *inputs):
        """Apply this op to nodes or expressions: builds the expression a rewrite returns."""
        return Expr(self, tuple(inputs))


class KernelGeometry:
    """The geometry every op with a ``weight`` of shape (·, ·, k₁, …, k_nd) and a ``dilation`` has (mixed into
    Conv, and into op kinds such as ConvTranspose)."""

    @property
    def nd(self) -> int:
        return self.weight.ndim - 2

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def extent(self) -> tuple[int, ...]:
        """Receptive extent per axis: dilation·(k−1)+1."""
        return tuple(d * (k - 1) + 1 for d, k in zip(self.dilation, self.kernel_size))


@dataclass(frozen=True, eq=False)
class Conv(KernelGeometry, Op):
    """N-d convolution (nd = weight.ndim - 2), zero padding given per axis as (lo, hi)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, ...]
    padding: Pairs
    dilation: tuple[int, ...]
    groups: int = 1
    padding_mode: str = "zeros"

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

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
        return kernels.conv_nd(x, read_as(self.weight, x), read_as(self.bias, x), self.stride, padding,
                               self.dilation, self.groups)

    def output_shape(self, shapes):
        x = shapes[0]
        spatial = tuple(_conv_len(n, lo, hi, e, s)
                        for n, (lo, hi), e, s in zip(x[2:], self.padding, self.extent, self.stride))
        return (x[0], self.out_channels, *spatial)

    shrinkable = True

    def check_reach(self):
        return max(self.extent) + 2 * max(self.stride) - 1 if self.nd else 0

    def check_signature(self, spatial):
        # side by side only where torch's per-group loop dominates (one input channel per group); dense
        # kernels are big, and their checks cost their multiply-adds
        if self.weight.shape[1] != 1:
            return None
        return ("conv", self.kernel_size, self.stride, self.padding, self.dilation, self.groups, self.padding_mode,
                self.in_channels, self.out_channels, self.bias is not None)

    def side_by_side(self, ops):
        bias = None if self.bias is None else torch.cat([o.bias for o in ops])
        return self.with_(weight=torch.cat([o.weight for o in ops]), bias=bias, groups=self.groups * len(ops))

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
        return F.linear(x, read_as(self.weight, x), read_as(self.bias, x))

    def output_shape(self, shapes):
        return (*shapes[0][:-1], self.out_features)

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

    def output_shape(self, shapes):
        return broadcast_shapes(shapes)

    @property
    def shrinkable(self):
        return self.axis is None or self.is_scalar or self.axis < 2

    def check_signature(self, spatial):
        if not (self.is_scalar or self.axis == 1):  # per-channel vectors go side by side; scalars must be equal
            return None
        return ("affine", _vector_or_value(self.scale), None if self.shift is None else _vector_or_value(self.shift))

    def side_by_side(self, ops):
        if self.is_scalar:
            return self

        def joined(ts):
            return ts[0] if ts[0] is None or ts[0].ndim == 0 else torch.cat(ts)
        return self.with_(scale=joined([o.scale for o in ops]), shift=joined([o.shift for o in ops]))

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

    def output_shape(self, shapes):
        return broadcast_shapes(shapes)

    shrinkable = True

    def check_signature(self, spatial):
        return ("sum", self.coeffs)

    def __repr__(self):
        return f"Sum({', '.join(f'{c:g}' for c in self.coeffs)})"


@dataclass(frozen=True, eq=False)
class Pad(Op):
    """Constant-zero padding of the trailing ``len(pads)`` axes, (lo, hi) per axis, first axis first."""

    pads: Pairs

    def evaluate(self, x):
        return F.pad(x, [p for lo, hi in reversed(self.pads) for p in (lo, hi)])

    def output_shape(self, shapes):
        x, k = shapes[0], len(self.pads)
        return (*x[:-k], *(n + lo + hi for n, (lo, hi) in zip(x[-k:], self.pads)))

    shrinkable = True

    def check_reach(self):
        return max(max(p) for p in self.pads) * 2 + 2 if self.pads else 0

    def check_signature(self, spatial):
        return ("pad", self.pads) if len(self.pads) <= spatial else None


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

    def output_shape(self, shapes):
        x = shapes[0]
        spatial = tuple(pool_len(n, p, p, k, s, self.ceil_mode) for n, k, s, p in zip(x[2:], self.kernel_size,
                                                                                       self.stride, self.padding))
        return (*x[:2], *spatial)

    shrinkable = True

    def check_reach(self):
        return max(self.kernel_size) + 2 * max(self.stride) - 1

    def check_signature(self, spatial):
        return ("pool", self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad,
                self.divisor_override)


@dataclass(frozen=True, eq=False)
class Permute(Op):
    """y = x.permute(dims): axis k of y is axis ``dims[k]`` of x (a transpose swaps two); values are moved,
    none computed."""

    dims: tuple[int, ...]

    def evaluate(self, x):
        return x.permute(self.dims)

    def output_shape(self, shapes):
        x = shapes[0]
        return tuple(x[d] for d in self.dims) if len(self.dims) == len(x) else None


@dataclass(frozen=True, eq=False)
class Identity(Op):
    """y = x (nn.Identity, eval-mode Dropout, .contiguous())."""

    def evaluate(self, x):
        return x

    def output_shape(self, shapes):
        return broadcast_shapes(shapes)

    shrinkable = True

    def check_signature(self, spatial):
        return ("identity",)


@dataclass(frozen=True, eq=False)
class Cat(Op):
    dim: int

    def evaluate(self, *xs):
        return torch.cat(xs, self.dim)

    def output_shape(self, shapes):
        x = shapes[0]
        d = self.dim % len(x)
        return (*x[:d], sum(s[d] for s in shapes), *x[d + 1:])

    @property
    def shrinkable(self):
        return self.dim == 1


@dataclass(frozen=True, eq=False)
class Slice(Op):
    """y = x[..., start:stop, ...] on ``dim`` (one output of chunk/split)."""

    dim: int
    start: int
    stop: int

    def evaluate(self, x):
        return x.narrow(self.dim, self.start, self.stop - self.start)

    def output_shape(self, shapes):
        x = shapes[0]
        d = self.dim % len(x)
        return (*x[:d], self.stop - self.start, *x[d + 1:])

    @property
    def shrinkable(self):
        return self.dim == 1


@dataclass(frozen=True, eq=False)
class Mean(Op):
    """Mean over ``dims`` (global average pooling), keeping them if ``keepdim``."""

    dims: tuple[int, ...]
    keepdim: bool = False

    def evaluate(self, x):
        return x.mean(self.dims, keepdim=self.keepdim)

    def output_shape(self, shapes):
        x = shapes[0]
        dims = {d % len(x) for d in self.dims}
        return tuple(1 if k in dims else n for k, n in enumerate(x) if self.keepdim or k not in dims)

    def check_signature(self, spatial):
        return ("mean", self.dims, self.keepdim) if all(d >= 2 for d in self.dims) else None


@dataclass(frozen=True, eq=False)
class Flatten(Op):
    start_dim: int = 1
    end_dim: int = -1

    def evaluate(self, x):
        return x.flatten(self.start_dim, self.end_dim)

    def output_shape(self, shapes):
        x = shapes[0]
        s, e = self.start_dim % len(x), self.end_dim % len(x)
        return (*x[:s], prod(x[s:e + 1]), *x[e + 1:])


def flatten_of(src: tuple[int, ...], dst: tuple[int, ...]) -> "Op | None":
    """What a reshape of a ``src``-shaped tensor to ``dst`` is when it changes nothing (Identity) or merges one run
    of axes [s, e] and keeps every other (Flatten(s, e)); None otherwise."""
    src, dst = tuple(src), tuple(dst)
    if src == dst:
        return Identity()
    for s in range(len(src)):
        for e in range(s + 1, len(src)):
            if src[:s] + (prod(src[s:e + 1]),) + src[e + 1:] == dst:
                return Flatten(s, e)
    return None


@dataclass(frozen=True, eq=False)
class Input(Op):
    """A graph input."""

    index: int = 0


@dataclass(frozen=True, eq=False)
class Opaque(Op):
    """Anything outside the vocabulary; kept exactly as it was. ``what`` names it for reports."""

    what: str = "?"
    value: Any = None  # a known constant value (parameters, buffers, folded constants)

    def evaluate(self, *xs):
        if self.value is not None:
            return self.value
        return super().evaluate(*xs)

    def __repr__(self):
        return f"Opaque({self.what})"


def f64(t: torch.Tensor | None) -> torch.Tensor | None:
    """A detached float64 CPU copy (for small constants an op computes with, e.g. BatchNorm statistics)."""
    if t is None:
        return None
    out = t.detach().to("cpu", torch.float64)
    return out.clone() if out.data_ptr() == t.data_ptr() else out


_HELD: dict[int, weakref.ref] = {}  # storage address -> the model tensor an op holds a view of


def held(t: torch.Tensor | None) -> torch.Tensor | None:
    """The tensor an op holds for a model's tensor ``t`` (a conv or linear weight): a detached view of ``t`` on
    the CPU in its own dtype, not a copy (an op never mutates its tensors; a tensor on another device is
    copied to the CPU). Non-floating tensors are read as float64 (``f64``). The exporters give the deploy model
    its own copy of such a tensor (``borrowed``), never the model's storage."""
    if t is None:
        return None
    if not t.is_floating_point():
        return f64(t)
    exact = exact_value(t)
    if exact is not None:
        return exact
    out = t.detach()
    if out.device.type != "cpu":
        return out.to("cpu")
    _HELD[_storage(out)] = weakref.ref(t)
    if len(_HELD) > 4096:  # forget the model tensors that are gone
        for k in [k for k, r in _HELD.items() if r() is None]:
            del _HELD[k]
    return out


# Within one fuse run, the deploy tensors the exporter rounded from a rewrite's float64 result, and that result:
# a graph read again from the deploy model (the whole graph over its fused submodules) computes from the exact
# values, so a chain of rewrites still rounds once. Keyed by (storage, offset, shape, stride, dtype); the table
# holds the rounded tensor, so its storage is not reused while the table lives.
_EXACT: contextvars.ContextVar[dict | None] = contextvars.ContextVar("reparam_exact_values", default=None)


def _key(t: torch.Tensor) -> tuple:
    return _storage(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype


@contextlib.contextmanager
def exact_values(table: dict):
    """For the duration (in this thread), tensors rounded by ``remember_exact`` are recorded in ``table``, and
    ``held`` reads a tensor recorded there as its exact float64 value."""
    token = _EXACT.set(table)
    try:
        yield table
    finally:
        _EXACT.reset(token)


def remember_exact(rounded: torch.Tensor, exact: torch.Tensor) -> None:
    """Record that the deploy tensor ``rounded`` is ``exact`` (float64) rounded, if a table is active."""
    table = _EXACT.get()
    if table is not None and exact.dtype == torch.float64 and rounded.dtype != torch.float64 and \
            rounded.device.type == "cpu" and exact.shape == rounded.shape:
        table[_key(rounded)] = (rounded, exact)


def exact_value(t: torch.Tensor) -> torch.Tensor | None:
    """The float64 value ``t`` was rounded from in this fuse run (see ``exact_values``), else None."""
    table = _EXACT.get()
    if not table or t.device.type != "cpu":
        return None
    hit = table.get(_key(t))
    return hit[1] if hit is not None else None


def borrowed(t: torch.Tensor) -> bool:
    """True if ``t`` shares its storage with a model tensor an op holds (``held``): writing it into a deploy
    model needs a copy."""
    ref = _HELD.get(_storage(t))
    return ref is not None and ref() is not None


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def as_float64(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` in float64 for kernel math: itself if it is float64 already, else a float64 copy (exact: every
    float32/float16/bfloat16 value is a float64 value)."""
    if t is None or t.dtype == torch.float64:
        return t
    return t.to(torch.float64)


def read_as(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """An op's tensor in the dtype of the input ``x`` it is applied to (a float64 input reads it exactly)."""
    if t is None or t.dtype == x.dtype or not x.is_floating_point():
        return t
    return t.to(x.dtype)


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


def pool_len(n: int, lo: int, hi: int, extent: int, stride: int, ceil_mode: bool = False) -> int:
    """Output length of a pooling window of ``extent`` (dilation·(k−1)+1) sliding by ``stride`` over ``n`` values
    padded by ``lo``/``hi``: ⌊(n + lo + hi − extent) / stride⌋ + 1, or with ``ceil_mode`` ⌈…⌉ + 1 less the last
    window when it would start past the input and the left padding ((out − 1)·stride ≥ n + lo). That rule is
    PyTorch's and ONNX Runtime's; ONNX shape inference (onnx 1.23) leaves it out."""
    span = n + lo + hi - extent
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    return out - 1 if (out - 1) * stride >= n + lo else out


def _vector_or_value(t: torch.Tensor):
    return ("value", float(t)) if t.ndim == 0 else ("vector", t.numel())


def output_shape(op: Op, shapes: list[tuple[int, ...] | None]) -> tuple[int, ...] | None:
    """The output shape of ``op`` for input ``shapes`` (None when any is unknown, or the op cannot tell)."""
    if not shapes or any(s is None for s in shapes):
        return None
    return op.output_shape([tuple(s) for s in shapes])


def per_axis(t: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, int | None] | None:
    """A float64 constant ``t`` that broadcasts against ``shape`` along at most one axis: (values, axis), with
    axis None for a scalar; None when it varies along several axes or does not fit."""
    if t.numel() == 1:
        return t.reshape(()), None
    if t.ndim > len(shape):
        return None
    axes = [k for k, s in enumerate(t.shape) if s != 1]
    if len(axes) != 1:
        return None
    axis = len(shape) - t.ndim + axes[0]
    if t.shape[axes[0]] != shape[axis]:
        return None
    return t.reshape(-1).clone(), axis
