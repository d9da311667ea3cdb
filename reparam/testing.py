"""A testing kit for fusion rules: hypothesis strategies and one-call assertions.

A property test of your own rule is about five lines::

    from hypothesis import given
    from reparam.testing import assert_fires, conv_specs

    @given(conv_specs(nd=2))
    def test_my_rule(spec):
        assert_fires(my_rule, MyBlock(spec), spec.example_input(), times=1)

Strategies (hypothesis): :func:`conv_specs` (random conv geometry, as :class:`ConvSpec`), :func:`bn_stats`
(random BatchNorm statistics) and :func:`linear_blocks` (random multi-branch linear blocks of one input, with
the conv count they must fuse to). Assertions: :func:`assert_equivalent` (fuse in float64, compare with the
original in float64), :func:`assert_fires` (a rule fires exactly N times), :func:`assert_refuses` (a trap is
refused with a reason and the model is left equivalent). :func:`count_ops` counts convs, BatchNorms, Linears
and ops of a module. Every assertion raises AssertionError with the fusion report in its message.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_map

from reparam.frontends import verify as _verify
from reparam.frontends.fx.backend import fuse
from reparam.errors import ReparamError
from reparam.frontends.rulesets import builtin_rules
from reparam.core.report import Report
from reparam.frontends.fx.counting import count_model
from reparam.core.rule import Rule

__all__ = ["ConvSpec", "conv_specs", "bn_stats", "set_bn_stats", "randomize_bn", "randomize_params", "LinearBlockCase",
           "linear_blocks", "assert_equivalent", "assert_fires", "assert_refuses", "assert_fires_everywhere", "count_ops",
           "onnx_of", "shipped_onnx_files", "initializers_as_inputs"]

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


# --------------------------------------------------------------------------------------------------
# small traceable modules the strategies build models from
# --------------------------------------------------------------------------------------------------
class ZeroPad(nn.Module):
    """``F.pad(x, pads)`` with zeros; ``pads`` in F.pad order (last axis first: left, right, top, bottom, …)."""

    def __init__(self, pads: Sequence[int]):
        super().__init__()
        self.pads = tuple(int(p) for p in pads)

    def forward(self, x):
        return F.pad(x, self.pads)


class Scale(nn.Module):
    """``α·x`` by a Python float (a literal constant)."""

    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, x):
        return x * self.alpha


class LayerScale(nn.Module):
    """``γ ⊙ x`` per channel (axis 1), γ a parameter of shape (C, 1, …, 1)."""

    def __init__(self, channels: int, nd: int, init: float = 1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels,) + (1,) * nd, float(init)))

    def forward(self, x):
        return x * self.gamma


class Branches(nn.Module):
    """``Σ cᵢ·branchᵢ(x)`` written with +, − and * (what users write), optionally followed by ``post``."""

    def __init__(self, branches: Sequence[nn.Module], coeffs: Sequence[float], post: nn.Module | None = None):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.coeffs = [float(c) for c in coeffs]
        self.post = post if post is not None else nn.Identity()

    def forward(self, x):
        y = None
        for c, branch in zip(self.coeffs, self.branches):
            t = branch(x)
            if y is None:
                y = t if c == 1.0 else t * c
            elif c == 1.0:
                y = y + t
            elif c == -1.0:
                y = y - t
            else:
                y = y + c * t
        return self.post(y)


# --------------------------------------------------------------------------------------------------
# conv geometry
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvSpec:
    """One conv's geometry. ``padding`` is (lo, hi) per spatial axis; asymmetric padding is built as an
    explicit ``F.pad`` before an unpadded conv (``module()``), as models write it."""

    nd: int
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    groups: int = 1
    bias: bool = True

    @property
    def extent(self) -> tuple[int, ...]:
        """dilation·(k−1)+1 per axis."""
        return tuple(d * (k - 1) + 1 for d, k in zip(self.dilation, self.kernel_size))

    @property
    def symmetric(self) -> bool:
        return all(lo == hi for lo, hi in self.padding)

    @property
    def is_depthwise(self) -> bool:
        return self.groups == self.in_channels == self.out_channels and self.groups > 1

    def conv(self, padding=None) -> nn.Module:
        """The nn.ConvNd alone (padding: its own symmetric padding unless given)."""
        pad = tuple(lo for lo, _ in self.padding) if padding is None else padding
        return CONV[self.nd](self.in_channels, self.out_channels, self.kernel_size, self.stride, pad,
                             self.dilation, self.groups, self.bias)

    def module(self) -> nn.Module:
        """The conv as a model writes it: ``nn.ConvNd`` (symmetric padding) or ``F.pad`` → unpadded conv."""
        if self.symmetric:
            return self.conv()
        pads = [p for lo, hi in reversed(self.padding) for p in (lo, hi)]
        return nn.Sequential(ZeroPad(pads), self.conv(padding=0))

    def min_size(self) -> int:
        """The smallest spatial size every axis may have (at least one output position)."""
        return max(max(e - lo - hi, 1) for e, (lo, hi) in zip(self.extent, self.padding))

    def input_shape(self, batch: int = 2, size: int | None = None) -> tuple[int, ...]:
        """An input shape this conv accepts: ``size`` (default: a few positions beyond the minimum)."""
        n = max(size or 0, self.min_size() + 2 * max(self.stride) + 3)
        return (batch, self.in_channels) + (n,) * self.nd

    def example_input(self, batch: int = 2, size: int | None = None, seed: int = 0,
                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.input_shape(batch, size), generator=g, dtype=torch.float64).to(dtype)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def conv_specs(draw, nd: int = 2, *, in_channels: int | None = None, out_channels: int | None = None,
               max_channels: int = 8, kernel_sizes: Sequence[int] = (1, 2, 3, 4, 5, 6, 7), square: bool = False,
               strides: Sequence[int] = (1, 2), dilations: Sequence[int] = (1, 2, 3), groups: str = "any",
               padding: str = "any", bias: bool | None = None) -> ConvSpec:
    """Random conv geometry.

    Channels 1–``max_channels`` (or fixed), ``groups``: "any" (1, a common divisor, or depthwise), "dense"
    (always 1) or "depthwise" (in = out = groups); kernel sizes from ``kernel_sizes`` per axis (non-square
    unless ``square``); stride and dilation per axis from ``strides``/``dilations``; ``padding``: "any"
    (symmetric or asymmetric), "same" (lo + hi = extent − 1, so stride 1 keeps the size), "symmetric",
    "none"; ``bias``: random unless fixed.
    """
    if groups == "depthwise":
        c = in_channels or out_channels or draw(st.integers(2, max_channels))
        cin = cout = g = c
    else:
        cin = in_channels or draw(st.integers(1, max_channels))
        if groups == "dense":
            g = 1
            cout = out_channels or draw(st.integers(1, max_channels))
        else:
            cout = out_channels or draw(st.sampled_from([m * d for d in _divisors(cin)
                                                         for m in range(1, max_channels // d + 1)] or [cin]))
            common = [d for d in _divisors(cin) if cout % d == 0]
            g = draw(st.sampled_from(common))
    if square:
        k = draw(st.sampled_from(list(kernel_sizes)))
        ks = (k,) * nd
    else:
        ks = tuple(draw(st.sampled_from(list(kernel_sizes))) for _ in range(nd))
    stride = tuple(draw(st.sampled_from(list(strides))) for _ in range(nd))
    dil = tuple(1 if k == 1 else draw(st.sampled_from(list(dilations))) for k in ks)
    ext = [d * (k - 1) + 1 for d, k in zip(dil, ks)]
    pads = []
    mode = padding if padding != "any" else draw(st.sampled_from(["symmetric", "asymmetric", "same"]))
    for e in ext:
        if mode == "none":
            pads.append((0, 0))
        elif mode == "symmetric":
            p = draw(st.integers(0, (e - 1) // 2 + 1))
            pads.append((p, p))
        elif mode == "same":
            lo = draw(st.integers(0, e - 1))
            pads.append((lo, e - 1 - lo))
        else:
            pads.append((draw(st.integers(0, e)), draw(st.integers(0, e))))
    has_bias = draw(st.booleans()) if bias is None else bias
    return ConvSpec(nd, cin, cout, ks, stride, dil, tuple(pads), g, has_bias)


# --------------------------------------------------------------------------------------------------
# BatchNorm statistics and random parameters
# --------------------------------------------------------------------------------------------------
_float = dict(allow_nan=False, allow_infinity=False)


@st.composite
def bn_stats(draw, channels: int) -> dict[str, torch.Tensor]:
    """Random inference BatchNorm state: running_mean, running_var (> 0), weight, bias (float64 tensors)."""
    def vec(lo, hi):
        return torch.tensor(draw(st.lists(st.floats(lo, hi, **_float), min_size=channels, max_size=channels)),
                            dtype=torch.float64)

    return dict(running_mean=vec(-1.0, 1.0), running_var=vec(0.25, 4.0), weight=vec(-2.0, 2.0),
                bias=vec(-1.0, 1.0))


@torch.no_grad()
def set_bn_stats(bn: _BatchNorm, stats: dict[str, torch.Tensor]) -> _BatchNorm:
    """Copy ``stats`` (from :func:`bn_stats`) into ``bn`` (keeping its dtype/device); returns it."""
    for name, value in stats.items():
        t = getattr(bn, name, None)
        if t is not None:
            t.copy_(value.to(t.dtype))
    return bn


@torch.no_grad()
def randomize_bn(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BatchNorm in ``module`` random running mean/var, weight and bias (in place; returns it).

    mean ~ N(0, 0.5²), var ~ U(0.25, 4), weight ~ U(0.5, 1.5)·±1, bias ~ N(0, 0.5²), drawn on the CPU
    from ``generator`` so the result does not depend on the device.
    """
    for m in module.modules():
        if not isinstance(m, _BatchNorm):
            continue
        n = m.num_features
        sign = torch.where(torch.rand(n, generator=generator) < 0.2, -1.0, 1.0)
        stats = dict(running_mean=torch.randn(n, generator=generator) * 0.5,
                     running_var=torch.rand(n, generator=generator) * 3.75 + 0.25,
                     weight=(torch.rand(n, generator=generator) + 0.5) * sign,
                     bias=torch.randn(n, generator=generator) * 0.5)
        set_bn_stats(m, stats)
    return module


@torch.no_grad()
def randomize_params(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Fill every parameter with N(0, 1/fan) noise from ``generator`` and randomize BatchNorms (in place)."""
    for p in module.parameters():
        fan = max(1, p[0].numel()) if p.ndim > 1 else 1
        p.copy_((torch.randn(p.shape, generator=generator, dtype=torch.float64) / math.sqrt(fan)).to(p.dtype))
    return randomize_bn(module, generator)


# --------------------------------------------------------------------------------------------------
# random multi-branch linear blocks
# --------------------------------------------------------------------------------------------------
@dataclass
class LinearBlockCase:
    """A random linear block of one input: ``module`` (eval, float64), an ``inputs`` tuple, the number of
    convs it must fuse to (``min_convs``) and a one-line ``description`` of its structure."""

    module: nn.Module
    inputs: tuple
    min_convs: int
    description: str

    def __repr__(self):
        shape = tuple(self.inputs[0].shape)
        return f"LinearBlockCase({self.description}; input {shape}; → {self.min_convs} conv)"


def _conv_bn(nd, cin, cout, k, stride, dilation, pads, groups, bias, bn: bool) -> tuple[nn.Module, str]:
    spec = ConvSpec(nd, cin, cout, k, stride, dilation, pads, groups, bias)
    conv = spec.module()
    label = f"conv{'×'.join(map(str, k))}" + (f"/d{dilation[0]}" if any(d > 1 for d in dilation) else "") + \
        (f"/g{groups}" if groups > 1 else "") + ("" if spec.symmetric else "/asym")
    if bn:
        return nn.Sequential(conv, BN[nd](cout)), label + "-bn"
    return conv, label


@st.composite
def _same_pads(draw, extent: tuple[int, ...], symmetric_only: bool):
    """(lo, hi) per axis with lo + hi = extent − 1 (every branch then has the same output size)."""
    out = []
    for e in extent:
        if symmetric_only or e % 2 == 0 and draw(st.booleans()):
            lo = (e - 1) // 2
        else:
            lo = draw(st.integers(0, e - 1))
        out.append((lo, e - 1 - lo))
    return tuple(out)


@st.composite
def _branch(draw, nd: int, c: int, stride: tuple[int, ...], groups: int, allow_identity: bool,
            depth: int) -> tuple[nn.Module, str, bool, bool]:
    """One branch of x: (module, label, has_conv, has_dense_conv)."""
    kinds = ["conv", "conv", "conv", "pool", "chain"]
    if allow_identity:
        kinds += ["identity", "bn", "scale"]
    if depth == 0:
        kinds.append("sum")
    kind = draw(st.sampled_from(kinds))
    if kind == "identity":
        return nn.Identity(), "x", False, False
    if kind == "bn":
        return BN[nd](c), "bn(x)", False, False
    if kind == "scale":
        alpha = draw(st.sampled_from([0.5, -1.5, 2.0]))
        return Scale(alpha), f"{alpha:g}·x", False, False
    if kind == "pool":
        mods: list[nn.Module] = [POOL[nd](3, stride, 1)]
        label = "avgpool3"
        if draw(st.booleans()):
            mods.append(BN[nd](c))
            label += "-bn"
        return nn.Sequential(*mods), label, False, False  # a conv only beside a conv
    if kind == "sum":
        n = draw(st.integers(2, 3))
        parts = [draw(_branch(nd, c, stride, groups, allow_identity, depth + 1)) for _ in range(n)]
        coeffs = [draw(st.sampled_from([1.0, 1.0, -1.0, 0.5])) for _ in parts]
        inner = Branches([p[0] for p in parts], coeffs)
        # α·(x + a(x)) of affine-only terms is not merged by the built-in rules (no rule sums affines of one
        # input yet); such nested sums are added to the outer sum with coefficient ±1, which flattens
        inner.affine_terms = not all(p[2] for p in parts)
        label = "(" + " ".join(f"{'+' if k == 1 else ('−' if k == -1 else f'+{k:g}·')}{p[1]}"
                               for k, p in zip(coeffs, parts)) + ")"
        return inner, label, any(p[2] for p in parts), any(p[3] for p in parts)
    if kind == "chain":
        # exact serial chains: 1×1 (no bias) → k×k-BN, or k×k-BN → 1×1-BN; middle width ≥ c keeps them cheap
        mid = c * draw(st.integers(1, 2))
        k = draw(st.sampled_from([3, 5]))
        ks = (k,) * nd
        pads = tuple(((k - 1) // 2, (k - 1) // 2) for _ in range(nd))
        one = (1,) * nd
        zero = ((0, 0),) * nd
        if draw(st.booleans()):
            a, la = _conv_bn(nd, c, mid, one, one, one, zero, 1, False, False)
            b, lb = _conv_bn(nd, mid, c, ks, stride, one, pads, 1, draw(st.booleans()), True)
        else:
            a, la = _conv_bn(nd, c, mid, ks, stride, one, pads, 1, draw(st.booleans()), True)
            b, lb = _conv_bn(nd, mid, c, one, one, one, zero, 1, draw(st.booleans()), True)
        return nn.Sequential(a, b), f"{la}→{lb}", True, True
    # a conv branch, possibly scaled
    ks = tuple(draw(st.sampled_from([1, 2, 3, 5, 7])) for _ in range(nd))
    if draw(st.booleans()):
        ks = (ks[0],) * nd
    dil = tuple(1 if k == 1 else draw(st.sampled_from([1, 1, 2, 3])) for k in ks)
    ext = tuple(d * (k - 1) + 1 for d, k in zip(dil, ks))
    pads = draw(_same_pads(ext, symmetric_only=False))
    g = draw(st.sampled_from(sorted({1, groups})))
    branch, label = _conv_bn(nd, c, c, ks, stride, dil, pads, g, draw(st.booleans()), draw(st.booleans()))
    wrap = draw(st.sampled_from(["", "", "layerscale", "scale"]))
    if wrap == "layerscale":
        branch, label = nn.Sequential(branch, LayerScale(c, nd, 1.0)), f"γ⊙{label}"
    elif wrap == "scale":
        branch, label = nn.Sequential(branch, Scale(0.5)), f"0.5·{label}"
    return branch, label, True, g == 1


@st.composite
def linear_blocks(draw, nd: int = 2, *, max_channels: int = 6, max_branches: int = 4, strided: bool | None = None,
                  seed: int | None = None) -> LinearBlockCase:
    """Random multi-branch linear blocks of one input that must fuse to exactly ``min_convs`` (= 1) conv.

    A block is ``post(Σ cᵢ·branchᵢ(x))`` with C → C channels. Branches: k×k convs (non-square, dilated,
    grouped, asymmetric F.pad, ± bias, ± BN, ± layer scale or α), avg-pool (± BN), exact serial chains
    (1×1 without bias → k×k-BN, or k×k-BN → 1×1-BN), nested sums, and at stride 1 the identity x, BN(x)
    and α·x; coefficients 1, −1 (subtraction) or 0.5. ``post`` is nothing, a BN, a scale, or a 1×1
    conv(-BN). All branches have the same output size (lo + hi = extent − 1 per axis), so the whole block
    is one conv. Parameters and BN statistics are random; the module is float64 and in eval mode.
    """
    c = draw(st.integers(2, max_channels))
    groups = draw(st.sampled_from(_divisors(c)))
    is_strided = draw(st.booleans()) if strided is None else strided
    stride = tuple(draw(st.sampled_from([1, 2])) for _ in range(nd)) if is_strided else (1,) * nd
    if all(s == 1 for s in stride):
        is_strided = False
    n = draw(st.integers(1, max_branches))
    parts = [draw(_branch(nd, c, stride, groups, not is_strided, 0)) for _ in range(n)]
    if not any(p[2] for p in parts):  # at least one conv, so the block is a conv (not an affine)
        parts.append(draw(_branch(nd, c, stride, groups, False, 1).filter(lambda p: p[2])))
    coeffs = [1.0] + [draw(st.sampled_from([1.0, 1.0, -1.0] + ([] if getattr(p[0], "affine_terms", False)
                                                                else [0.5]))) for p in parts[1:]]
    # a dense 1×1 after a grouped-only sum would cost more merged than apart (serial_merge rightly refuses)
    post_kind = draw(st.sampled_from(["", "bn", "scale"] + (["conv1x1"] if any(p[3] for p in parts) else [])))
    post = {"": None, "bn": BN[nd](c), "scale": LayerScale(c, nd, 1.0),
            "conv1x1": nn.Sequential(CONV[nd](c, c, 1), BN[nd](c))}[post_kind]
    block = Branches([p[0] for p in parts], coeffs, post)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)) if seed is None else seed)
    randomize_params(block, gen)
    block = block.double().eval()
    size = draw(st.integers(7, 11))
    x = torch.randn((2, c) + (size,) * nd, generator=gen, dtype=torch.float64)
    terms = " ".join(f"{'+' if k == 1 else ('−' if k == -1 else f'+{k:g}·')}{p[1]}" for k, p in zip(coeffs, parts))
    desc = f"{nd}d C={c} stride={stride} groups≤{groups}: {post_kind + '(' if post_kind else ''}{terms.lstrip('+')}" \
           f"{')' if post_kind else ''}"
    return LinearBlockCase(block, (x,), 1, desc)


# --------------------------------------------------------------------------------------------------
# assertions
# --------------------------------------------------------------------------------------------------
def count_ops(module: nn.Module) -> dict[str, int | None]:
    """``{"ops", "convs", "bns", "linears", "params"}`` of ``module`` (see :func:`reparam.core.report.count_model`)."""
    return asdict(count_model(module))


def _as_tuple(inputs) -> tuple:
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def _to64(inputs: tuple) -> tuple:
    return tree_map(lambda t: t.to(torch.float64) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                    inputs)


def _split_rules(rule: Rule | str | None, rules, extra_rules) -> tuple[list[Rule] | None, list[Rule]]:
    """``rules`` may mix Rule objects and built-in names; a Rule that is not built in goes to extra_rules."""
    builtin = builtin_rules()
    by_name = {r.name: r for r in builtin}
    base = None
    if rules is not None:
        base = []
        for r in rules:
            if isinstance(r, str):
                if r not in by_name:
                    raise AssertionError(f"unknown built-in rule '{r}' (known: {', '.join(by_name)})")
                base.append(by_name[r])
            else:
                base.append(r)
    extra = list(extra_rules)
    if isinstance(rule, Rule) and all(r is not rule for r in builtin + extra + (base or [])):
        extra.insert(0, rule)
    return base, extra


def _describe(report: Report) -> str:
    lines = [report.summary()]
    if report.rules_fired:
        lines.append("fired: " + "; ".join(f"{e['rule']} at '{e['where']}'" for e in report.rules_fired))
    if report.refusals:
        lines.append("refused: " + "; ".join(f"{e['rule']} at '{e['where']}': {e['detail']}"
                                             for e in report.refusals))
    return "\n".join(lines)


def assert_equivalent(model: nn.Module, inputs, *, rules: Sequence[Rule | str] | None = None,
                      extra_rules: Sequence[Rule] = (), rtol: float = 1e-9, trials: int = 3):
    """Fuse a float64 copy of ``model`` and check it against the original in float64; return (fused, report).

    ``rules`` replaces the built-in list (Rule objects or built-in names), ``extra_rules`` are tried first.
    The check is ``max|fused − original| ≤ rtol·max|original|`` on ``inputs`` and ``trials`` fresh random
    inputs of the same shapes. The original model is not modified.
    """
    model64 = copy.deepcopy(model).to(torch.float64).eval()
    inputs64 = _to64(_as_tuple(inputs))
    base, extra = _split_rules(None, rules, extra_rules)
    try:
        fused, report = fuse(model64, inputs64, rules=base, extra_rules=extra, tolerance=rtol, report=True)
    except ReparamError as err:
        raise AssertionError(f"fusion failed: {type(err).__name__}: {err}") from err
    probes = [inputs64] + [_verify.random_like(inputs64, seed=s) for s in range(1, trials + 1)]
    for probe in probes:
        want = _verify.run(model64, probe)
        got = _verify.run(fused, probe)
        err = _verify.relative_error(got, want)
        if not err <= rtol:
            raise AssertionError(f"the fused model differs from the original: relative error {err:.3g} > {rtol:g} "
                                 f"on inputs of shape {[tuple(t.shape) for t in probe]}\n{_describe(report)}")
    return fused, report


def _rule_name(rule: Rule | str, base: list[Rule] | None = None, extra: Sequence[Rule] = ()) -> str:
    name = rule if isinstance(rule, str) else rule.name
    known = {r.name for r in list(extra) + (builtin_rules() if base is None else base)}
    if name not in known:
        raise AssertionError(f"rule '{name}' is not among the rules of this run ({', '.join(sorted(known))})")
    return name


def assert_fires(rule: Rule | str, model: nn.Module, inputs, times: int = 1, *,
                 rules: Sequence[Rule | str] | None = None, extra_rules: Sequence[Rule] = (), rtol: float = 1e-9):
    """Fuse ``model`` (as :func:`assert_equivalent`) and assert ``rule`` fired exactly ``times`` times.

    ``rule`` is a built-in name or a Rule; a Rule that is not built in is passed as an extra rule (tried
    before the built-ins). Returns (fused, report).
    """
    base, extra = _split_rules(rule, rules, extra_rules)
    name = _rule_name(rule, base, extra)
    fused, report = assert_equivalent(model, inputs, rules=base, extra_rules=extra, rtol=rtol)
    got = report.fired_counts().get(name, 0)
    if got != times:
        raise AssertionError(f"rule '{name}' fired {got} time(s), expected {times}\n{_describe(report)}")
    return fused, report


def assert_refuses(rule: Rule | str, model: nn.Module, inputs, reason_contains: str | None = None, *,
                   rules: Sequence[Rule | str] | None = None, extra_rules: Sequence[Rule] = (),
                   rtol: float = 1e-9):
    """Fuse ``model`` and assert that ``rule`` refused at least one match (with a reason containing
    ``reason_contains``, case-insensitive, if given) and that the result is still equivalent.

    A refusal that was later overcome at the same place (the rule fired there after all) does not count.
    Returns (fused, report).
    """
    base, extra = _split_rules(rule, rules, extra_rules)
    name = _rule_name(rule, base, extra)
    fused, report = assert_equivalent(model, inputs, rules=base, extra_rules=extra, rtol=rtol)
    mine = [r for r in report.refusals if r["rule"] == name]
    if not mine:
        raise AssertionError(f"rule '{name}' refused nothing\n{_describe(report)}")
    if reason_contains is not None and not any(reason_contains.lower() in r["detail"].lower() for r in mine):
        reasons = "; ".join(r["detail"] for r in mine)
        raise AssertionError(f"rule '{name}' refused, but no reason contains '{reason_contains}': {reasons}")
    return fused, report


def shipped_onnx_files(dist: str) -> dict[str, str]:
    """The .onnx files inside an installed distribution (file name → path), found without importing it; empty
    when the distribution is not installed."""
    import importlib.metadata
    import os

    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    return {os.path.basename(str(f)): str(f.locate()) for f in files if str(f).endswith(".onnx")}


def initializers_as_inputs(model):
    """A copy of the ONNX ``model`` with every initializer also listed as a graph input, as exporters with
    ``keep_initializers_as_inputs`` write it (face-detection files do): overridable defaults, not constants."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    listed = {i.name for i in out.graph.input}
    for init in out.graph.initializer:
        if init.name not in listed:
            out.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return out


def onnx_of(model: nn.Module, inputs: tuple, *, fold: bool = False, **export_options):
    """``model`` exported by torch.onnx.export (TorchScript exporter, opset 17, constant folding only if ``fold``)
    to bytes and read back as an ``onnx.ModelProto``: the ONNX twin of a test model."""
    import io
    import warnings

    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, buffer, dynamo=False, opset_version=17, do_constant_folding=fold,
                          **export_options)
    return onnx.load_from_string(buffer.getvalue())


def assert_fires_everywhere(rule: Rule | str, model: nn.Module, inputs, times: int = 1, *,
                            rules: Sequence[Rule | str] | None = None, extra_rules: Sequence[Rule] = (),
                            rtol: float = 1e-9, onnx_rtol: float = 1e-5):
    """:func:`assert_fires` through torch.fx, then the same model exported to ONNX (torch.onnx.export to bytes)
    and fused by :func:`reparam.fuse_onnx`: ``rule`` fires ``times`` times on both front ends, each result is
    verified against its original, and both reach the same number of convs. Returns the two reports (FX, ONNX).

    ONNX runs in float32 in onnxruntime, so its tolerance is ``onnx_rtol``."""
    from collections import Counter

    from reparam.frontends.onnx.backend import fuse_onnx

    base, extra = _split_rules(rule, rules, extra_rules)
    name = _rule_name(rule, base, extra)
    fused, fx_report = assert_fires(rule, model, inputs, times, rules=rules, extra_rules=extra_rules, rtol=rtol)
    model32 = copy.deepcopy(model).to(torch.float32).eval()
    proto = onnx_of(model32, tuple(t.to(torch.float32) for t in _as_tuple(inputs)))
    try:
        out, onnx_report = fuse_onnx(proto, rules=base, extra_rules=extra, tolerance=onnx_rtol, report=True)
    except ReparamError as err:
        raise AssertionError(f"ONNX fusion failed: {type(err).__name__}: {err}") from err
    got = onnx_report.fired_counts().get(name, 0)
    if got != times:
        raise AssertionError(f"on ONNX, rule '{name}' fired {got} time(s), expected {times}\n{_describe(onnx_report)}")
    kinds = Counter(n.op_type for n in out.graph.node)
    onnx_convs = kinds["Conv"] + kinds["ConvTranspose"]  # as count_ops counts them
    fx_convs = count_ops(fused)["convs"]
    if onnx_convs != fx_convs:
        raise AssertionError(f"FX and ONNX disagree: {fx_convs} conv(s) after fusing with FX, {onnx_convs} with ONNX")
    return fx_report, onnx_report
