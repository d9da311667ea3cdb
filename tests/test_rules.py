"""One hypothesis property test per built-in rule, in float64 (relative error ≤ 1e-9).

Each test builds a small model from drawn specs (channels ≤ 8, kernels 1–7 incl. non-square, strides
1–2, dilations 1–3, symmetric or asymmetric (F.pad) padding, bias on/off, random BatchNorm
statistics), fuses it, and asserts equivalence, that the rule fired, and the structure reached.
``test_every_builtin_rule_has_a_property_test`` keeps this file in step with rules/__init__.py.
"""
from __future__ import annotations

from pathlib import Path
import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import reparam
from reparam.testing import (BN, CONV, POOL, Branches, ConvSpec, LayerScale, Scale, ZeroPad, assert_equivalent,
                             assert_refuses, conv_specs, count_ops, linear_blocks, randomize_params)

RTOL = 1e-9
LIMIT = {1: 12, 2: 12, 3: 6}  # the largest spatial size drawn per dimensionality


def geometry(nd: int) -> dict:
    """Kernel sizes and dilations drawn per dimensionality (3d stays small)."""
    if nd == 3:
        return dict(kernel_sizes=(1, 2, 3), dilations=(1, 2))
    return dict(kernel_sizes=(1, 2, 3, 4, 5, 6, 7), dilations=(1, 2, 3))


def specs(nd: int, **kw):
    """conv_specs whose smallest valid input fits in LIMIT."""
    kw = {**geometry(nd), **kw}
    return conv_specs(nd, **kw).filter(lambda s: s.min_size() <= LIMIT[nd] - 2)


dims = st.sampled_from([1, 2, 2, 3])


def example(draw, nd: int, channels: int, at_least: int = 1, batch: int = 1) -> torch.Tensor:
    size = draw(st.integers(max(at_least, 3), LIMIT[nd]))
    seed = draw(st.integers(0, 2 ** 16))
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, channels) + (size,) * nd, generator=gen, dtype=torch.float64)


def build(module: nn.Module, draw) -> nn.Module:
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    return randomize_params(module, gen).double().eval()


def fuse_fired(rule: str, model: nn.Module, x, times: int | None = None):
    """Fuse in float64, check equivalence, and that ``rule`` fired (exactly ``times`` if given)."""
    fused, report = assert_equivalent(model, (x,), rtol=RTOL)
    got = report.fired_counts().get(rule, 0)
    assert got >= 1 if times is None else got == times, f"{rule} fired {got}×\n{report.summary()}\n{report.refusals}"
    return fused, report, count_ops(fused)


def padded(spec: ConvSpec) -> nn.Module:
    """The conv written as F.pad (its (lo, hi) per axis) → unpadded conv."""
    pads = [p for lo, hi in reversed(spec.padding) for p in (lo, hi)]
    return nn.Sequential(ZeroPad(pads), spec.conv(padding=0))


def pad_ops(spec: ConvSpec) -> int:
    """Ops a fused conv takes: an asymmetric padding is exported as F.pad before the conv."""
    return 1 + (not spec.symmetric)


# ------------------------------------------------------------------------------------------- canonicalizing
@given(st.data())
def test_identity_elim(data):
    """Identity, eval Dropout and x·1 vanish around a conv."""
    nd = data.draw(dims)
    spec = data.draw(specs(nd))
    model = build(nn.Sequential(nn.Identity(), spec.module(), nn.Dropout(0.3), Scale(1.0)), data.draw)
    x = example(data.draw, nd, spec.in_channels, spec.min_size())
    _, _, n = fuse_fired("identity_elim", model, x)
    assert n["ops"] == pad_ops(spec) and n["convs"] == 1


@given(st.data())
def test_sum_flatten(data):
    """(a(x) + b(relu x)) + c(x): the nested sum flattens so a and c meet and merge → two convs."""
    nd = data.draw(dims)
    spec = data.draw(specs(nd, padding="same", strides=(1,), dilations=(1,)))
    other = ConvSpec(nd, spec.in_channels, spec.out_channels, spec.kernel_size, spec.stride, spec.dilation,
                     spec.padding, spec.groups, True)

    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = spec.module(), other.module(), spec.module()

        def forward(self, x):
            return (self.a(x) + self.b(torch.relu(x))) + self.c(x)

    model = build(Nested(), data.draw)
    x = example(data.draw, nd, spec.in_channels, spec.min_size())
    _, _, n = fuse_fired("sum_flatten", model, x, times=1)
    assert n["convs"] == 2


@given(st.data())
def test_pad_fold(data):
    """F.pad (zeros, any (lo, hi) per axis) → unpadded conv becomes one conv with that padding."""
    nd = data.draw(dims)
    spec = data.draw(specs(nd).filter(lambda s: any(p != (0, 0) for p in s.padding)))
    model = build(padded(spec), data.draw)
    x = example(data.draw, nd, spec.in_channels, spec.min_size())
    _, _, n = fuse_fired("pad_fold", model, x, times=1)
    assert n["convs"] == 1 and n["ops"] == pad_ops(spec)


# ------------------------------------------------------------------------------------------- folds backwards
@given(st.data())
def test_conv_bn_fold(data):
    """conv (any nd, groups, stride, dilation, padding, ± bias) → BN becomes one conv."""
    nd = data.draw(dims)
    spec = data.draw(specs(nd))
    model = build(nn.Sequential(spec.module(), BN[nd](spec.out_channels)), data.draw)
    x = example(data.draw, nd, spec.in_channels, spec.min_size())
    _, _, n = fuse_fired("conv_bn_fold", model, x, times=1)
    assert n["convs"] == 1 and n["bns"] == 0 and n["ops"] == pad_ops(spec)


@given(st.data())
def test_conv_bn_fold_linear_bn1d(data):
    """Linear → BatchNorm1d on (N, F) becomes one Linear."""
    fin, fout = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8))
    model = build(nn.Sequential(nn.Linear(fin, fout, bias=data.draw(st.booleans())), nn.BatchNorm1d(fout)),
                  data.draw)
    x = torch.randn(3, fin, dtype=torch.float64)
    _, _, n = fuse_fired("conv_bn_fold", model, x, times=1)
    assert n["linears"] == 1 and n["bns"] == 0 and n["ops"] == 1


@given(st.data())
def test_affine_merge(data):
    """BN → BN → layer scale with nothing to fold into: one affine remains (mul, add), no BatchNorm."""
    nd = data.draw(dims)
    c = data.draw(st.integers(1, 8))
    model = build(nn.Sequential(BN[nd](c), BN[nd](c), LayerScale(c, nd, 0.5), nn.ReLU()), data.draw)
    x = example(data.draw, nd, c)
    _, _, n = fuse_fired("affine_merge", model, x, times=2)
    assert n["bns"] == 0 and n["ops"] == 3  # x·s + t, relu


@given(st.data())
def test_concat_affine_split(data):
    """BN(cat(conv₁(x), conv₂(x))) → cat of two folded convs."""
    nd = data.draw(dims)
    s1 = data.draw(specs(nd, padding="same", strides=(1,)))
    s2 = data.draw(specs(nd, in_channels=s1.in_channels, padding="same", strides=(1,)))

    class CatBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = s1.module(), s2.module()
            self.bn = BN[nd](s1.out_channels + s2.out_channels)

        def forward(self, x):
            return self.bn(torch.cat([self.a(x), self.b(x)], dim=1))

    model = build(CatBN(), data.draw)
    x = example(data.draw, nd, s1.in_channels, max(s1.min_size(), s2.min_size()))
    _, _, n = fuse_fired("concat_affine_split", model, x, times=1)
    assert n["convs"] == 2 and n["bns"] == 0 and n["ops"] == pad_ops(s1) + pad_ops(s2) + 1


@given(st.data())
def test_scale_fold(data):
    """γ ⊙ (conv₁(x) + conv₂(relu x)) → each branch carries γ: two convs, no multiply."""
    nd = data.draw(dims)
    s1 = data.draw(specs(nd, padding="same", strides=(1,), groups="dense"))
    s2 = data.draw(specs(nd, in_channels=s1.in_channels, out_channels=s1.out_channels, padding="same",
                         strides=(1,)))

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = s1.module(), s2.module()
            self.gamma = LayerScale(s1.out_channels, nd, 0.1)

        def forward(self, x):
            return self.gamma(self.a(x) + self.b(torch.relu(x)))

    model = build(Scaled(), data.draw)
    x = example(data.draw, nd, s1.in_channels, max(s1.min_size(), s2.min_size()))
    _, _, n = fuse_fired("scale_fold", model, x, times=1)
    assert n["convs"] == 2 and n["ops"] == pad_ops(s1) + pad_ops(s2) + 2  # relu, add


# ------------------------------------------------------------------------------------------- branch normalizers
@given(st.data(), st.sampled_from(["x", "bn", "alpha", "layerscale"]), st.sampled_from(["sum", "residual"]))
def test_identity_to_conv(data, skip, form):
    """x, BN(x), α·x or γ⊙x beside conv(x) (C → C, stride 1): one conv; also the residual x + conv(x)."""
    nd = data.draw(dims)
    c = data.draw(st.integers(1, 8))
    spec = data.draw(specs(nd, in_channels=c, out_channels=c, padding="same", strides=(1,)))
    branch = {"x": nn.Identity(), "bn": BN[nd](c), "alpha": Scale(data.draw(st.sampled_from([0.5, -2.0]))),
              "layerscale": LayerScale(c, nd)}[skip]
    coeff = data.draw(st.sampled_from([1.0, -1.0, 0.5]))
    if form == "sum":
        model = Branches([spec.module(), branch], [1.0, coeff])
    else:
        model = Branches([branch, spec.module()], [1.0, coeff])
    model = build(model, data.draw)
    x = example(data.draw, nd, c, spec.min_size())
    _, _, n = fuse_fired("identity_to_conv", model, x, times=1)
    assert n["convs"] == 1 and n["bns"] == 0 and n["ops"] == pad_ops(spec)


@given(st.data())
def test_avgpool_to_conv(data):
    """AvgPool(k, s, p) (± BN) beside a conv with the same geometry → one conv."""
    nd = data.draw(dims)
    c = data.draw(st.integers(1, 8))
    k = data.draw(st.integers(1, 3 if nd == 3 else 5))
    s = data.draw(st.sampled_from([1, 2]))
    p = data.draw(st.integers(0, k // 2))
    spec = ConvSpec(nd, c, c, (k,) * nd, (s,) * nd, (1,) * nd, ((p, p),) * nd,
                    data.draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0])), data.draw(st.booleans()))
    pool = POOL[nd](k, s, p)
    if data.draw(st.booleans()):
        pool = nn.Sequential(pool, BN[nd](c))
    model = build(Branches([spec.module(), pool], [1.0, data.draw(st.sampled_from([1.0, -1.0, 0.5]))]), data.draw)
    x = example(data.draw, nd, c, spec.min_size())
    _, _, n = fuse_fired("avgpool_to_conv", model, x, times=1)
    assert n["convs"] == 1 and n["ops"] == 1 and n["bns"] == 0


@given(st.data())
def test_dilated_to_dense(data):
    """conv (dilation d) + conv (dilation e) of x with the same output size → one conv."""
    nd = data.draw(dims)
    s1 = data.draw(specs(nd, padding="same", strides=(1,), groups="dense").filter(
        lambda s: any(d > 1 for d in s.dilation)))
    s2 = data.draw(specs(nd, in_channels=s1.in_channels, out_channels=s1.out_channels, padding="same",
                         strides=(1,), groups="dense", dilations=(1,)))
    model = build(Branches([s1.module(), s2.module()], [1.0, 1.0]), data.draw)
    x = example(data.draw, nd, s1.in_channels, max(s1.min_size(), s2.min_size()))
    _, _, n = fuse_fired("dilated_to_dense", model, x, times=1)
    assert n["convs"] == 1


@given(st.data())
def test_groups_merge(data):
    """conv (g groups) + conv (h groups) of x → one conv in gcd(g, h) groups."""
    nd = data.draw(dims)
    c = data.draw(st.sampled_from([2, 4, 6, 8]))
    divisors = [d for d in range(1, c + 1) if c % d == 0]
    g, h = data.draw(st.lists(st.sampled_from(divisors), min_size=2, max_size=2, unique=True))
    s1 = data.draw(specs(nd, in_channels=c, out_channels=c, padding="same", strides=(1,), dilations=(1,),
                         groups="dense"))
    s1 = ConvSpec(nd, c, c, s1.kernel_size, s1.stride, s1.dilation, s1.padding, g, s1.bias)
    s2 = data.draw(specs(nd, in_channels=c, out_channels=c, padding="same", strides=(1,), dilations=(1,),
                         groups="dense"))
    s2 = ConvSpec(nd, c, c, s2.kernel_size, s2.stride, s2.dilation, s2.padding, h, s2.bias)
    model = build(Branches([s1.module(), s2.module()], [1.0, data.draw(st.sampled_from([1.0, -1.0]))]), data.draw)
    x = example(data.draw, nd, c, max(s1.min_size(), s2.min_size()))
    fused, _, n = fuse_fired("groups_merge", model, x, times=1)
    assert n["convs"] == 1
    conv = next(m for m in fused.modules() if isinstance(m, CONV[nd]))
    assert conv.groups == math.gcd(g, h)


# ------------------------------------------------------------------------------------------- merges
@given(st.data())
def test_parallel_sum_pad(data):
    """Σ cᵢ·convᵢ(x): kernels of different (non-square) sizes, asymmetric F.pad alignment, subtraction and
    scalar weights, shared stride/dilation/groups → one conv."""
    nd = data.draw(dims)
    first = data.draw(specs(nd, padding="same"))
    branches = [first]
    for _ in range(data.draw(st.integers(1, 2))):
        # another kernel (non-square, any size), same stride/dilation/groups, any (lo, hi) with the same slack
        ks = data.draw(st.tuples(*[st.sampled_from(geometry(nd)["kernel_sizes"])] * nd))
        extent = [d * (k - 1) + 1 for d, k in zip(first.dilation, ks)]
        pads = tuple((lo, e - 1 - lo) for lo, e in zip((data.draw(st.integers(0, e - 1)) for e in extent), extent))
        branches.append(ConvSpec(nd, first.in_channels, first.out_channels, ks, first.stride, first.dilation, pads,
                                 first.groups, data.draw(st.booleans())))
    coeffs = [1.0] + [data.draw(st.sampled_from([1.0, -1.0, 0.5, 2.0])) for _ in branches[1:]]
    model = build(Branches([b.module() for b in branches], coeffs), data.draw)
    x = example(data.draw, nd, first.in_channels, max(b.min_size() for b in branches))
    _, _, n = fuse_fired("parallel_sum_pad", model, x)
    assert n["convs"] == 1 and n["ops"] <= 2


@given(st.data())
def test_linear_sum(data):
    """(h₁(x) + h₂(x)) / 2 or weighted heads (± BN1d) → one Linear."""
    fin, fout = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8))
    n_heads = data.draw(st.integers(2, 3))
    heads = [nn.Linear(fin, fout, bias=data.draw(st.booleans())) for _ in range(n_heads)]
    if data.draw(st.booleans()):
        heads[0] = nn.Sequential(heads[0], nn.BatchNorm1d(fout))
    weights = [data.draw(st.sampled_from([1.0, 0.5, -1.0, 0.25])) for _ in heads]

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList(heads)

        def forward(self, x):
            y = weights[0] * self.heads[0](x)
            for w, h in zip(weights[1:], self.heads[1:]):
                y = y + w * h(x)
            return y / n_heads

    model = build(Heads(), data.draw)
    x = torch.randn(3, fin, dtype=torch.float64)
    _, _, n = fuse_fired("linear_sum", model, x)
    assert n["linears"] == 1 and n["bns"] == 0 and n["ops"] == 1


@given(st.data(), st.sampled_from(["1x1-kxk", "kxk-1x1", "1x1-1x1", "1x1(bias)-kxk(padded)"]))
def test_serial_merge(data, form):
    """1×1 → k×k (exact: the 1×1 has no bias, or the k×k is unpadded), k×k → 1×1, 1×1 → 1×1 → one conv;
    a 1×1 with a bias before a zero-padded k×k is refused (the border would see the bias) and stays two convs."""
    nd = data.draw(dims)
    cin, cout = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    mid = max(cin, cout) + data.draw(st.integers(0, 2))  # wide enough that the merged conv is cheaper
    ones = (1,) * nd
    one = lambda a, b, bias: ConvSpec(nd, a, b, ones, ones, ones, ((0, 0),) * nd, 1, bias)  # noqa: E731
    if form == "1x1-1x1":
        first, second = one(cin, mid, data.draw(st.booleans())), one(mid, cout, data.draw(st.booleans()))
    elif form == "1x1-kxk":
        k = data.draw(specs(nd, in_channels=mid, out_channels=cout, groups="dense"))
        bias = data.draw(st.booleans()) and all(p == (0, 0) for p in k.padding)
        first, second = one(cin, mid, bias), k
    elif form == "1x1(bias)-kxk(padded)":
        k = data.draw(specs(nd, in_channels=mid, out_channels=cout, groups="dense").filter(
            lambda s: any(p != (0, 0) for p in s.padding)))
        first, second = one(cin, mid, True), k
    else:
        k = data.draw(specs(nd, in_channels=cin, out_channels=mid, groups="dense"))
        first, second = k, one(mid, cout, data.draw(st.booleans()))
    model = build(nn.Sequential(first.module(), second.module()), data.draw)
    x = example(data.draw, nd, cin, max(first.min_size(), second.min_size()))
    if form == "1x1(bias)-kxk(padded)":
        fused, report = assert_refuses("serial_merge", model, (x,), "bias", rtol=RTOL)
        assert "serial_merge" not in report.fired_counts() and count_ops(fused)["convs"] == 2
        return
    _, _, n = fuse_fired("serial_merge", model, x, times=1)
    assert n["convs"] == 1


@given(st.data(), st.booleans())
def test_serial_into_sibling(data, strided):
    """Depthwise 1×k (no bias) → k×1, optionally stride (1, 2) then (2, 1), beside a k×k depthwise conv of x
    (RepNeXt): the chain (costlier alone than its two convs) merges into a k×k because the sibling covers it,
    and the k×k siblings into one conv."""
    c = data.draw(st.integers(1, 8))
    k = data.draw(st.sampled_from([3, 5, 7]))
    p = k // 2
    s = 2 if strided else 1
    row = nn.Conv2d(c, c, (1, k), (1, s), (0, p), groups=c, bias=False)
    col = nn.Conv2d(c, c, (k, 1), (s, 1), (p, 0), groups=c, bias=data.draw(st.booleans()))
    square = nn.Conv2d(c, c, k, s, p, groups=c, bias=data.draw(st.booleans()))
    model = build(Branches([nn.Sequential(row, col), square], [1.0, 1.0]), data.draw)
    x = example(data.draw, 2, c, k)
    fused, _, n = fuse_fired("serial_into_sibling", model, x, times=1)
    assert n["convs"] == 1
    conv = next(m for m in fused.modules() if isinstance(m, nn.Conv2d))
    assert conv.kernel_size == (k, k) and conv.stride == (s, s) and conv.groups == c


@given(st.data())
def test_serial_merge_linear(data):
    """Linear → Linear → one Linear when a·c ≤ a·b + b·c; a bottleneck (a·c larger) is refused and stays two
    Linears, so the parameter count never grows."""
    a, b, c = (data.draw(st.integers(1, 8)) for _ in range(3))
    model = build(nn.Sequential(nn.Linear(a, b, bias=data.draw(st.booleans())),
                                nn.Linear(b, c, bias=data.draw(st.booleans()))), data.draw)
    x = torch.randn(3, a, dtype=torch.float64)
    if a * c > a * b + b * c:
        fused, report = assert_refuses("serial_merge", model, (x,), "multiply-adds", rtol=RTOL)
        assert "serial_merge" not in report.fired_counts() and count_ops(fused)["linears"] == 2
        assert count_ops(fused)["params"] == count_ops(model)["params"]
        return
    fused, _, n = fuse_fired("serial_merge", model, x, times=1)
    assert n["linears"] == 1 and n["ops"] == 1
    assert next(m for m in fused.modules() if isinstance(m, nn.Linear)).weight.numel() <= a * b + b * c


# ------------------------------------------------------------------------------------------- folds forwards
@given(st.data())
def test_bn_prefold(data):
    """BN → unpadded conv (any kernel, stride, dilation, groups) → one conv."""
    nd = data.draw(dims)
    spec = data.draw(specs(nd, padding="none"))
    model = build(nn.Sequential(BN[nd](spec.in_channels), spec.module()), data.draw)
    x = example(data.draw, nd, spec.in_channels, spec.min_size())
    _, _, n = fuse_fired("bn_prefold", model, x, times=1)
    assert n["convs"] == 1 and n["bns"] == 0 and n["ops"] == 1


@given(st.data(), st.booleans())
def test_bn_prefold_linear(data, dropout):
    """BN1d → (eval Dropout) → Linear → one Linear."""
    fin, fout = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8))
    mods = [nn.BatchNorm1d(fin)] + ([nn.Dropout(0.5)] if dropout else []) + [nn.Linear(fin, fout)]
    model = build(nn.Sequential(*mods), data.draw)
    _, _, n = fuse_fired("bn_prefold", model, torch.randn(3, fin, dtype=torch.float64), times=1)
    assert n["linears"] == 1 and n["bns"] == 0 and n["ops"] == 1


@given(st.data(), st.sampled_from(["mean", "adaptive", "mean-keepdim-flatten"]))
def test_affine_through_pool(data, form):
    """conv → ReLU → BN → global average (mean / adaptive pool + flatten) → Linear: the BN moves past the
    pooling into the Linear (bn_prefold)."""
    nd = data.draw(dims)
    c, fout = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8))

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = BN[nd](c)
            self.fc = nn.Linear(c, fout)

        def forward(self, x):
            y = self.bn(torch.relu(x))
            dims_ = tuple(range(2, 2 + nd))
            if form == "mean":
                y = y.mean(dims_)
            elif form == "adaptive":
                y = torch.flatten((F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[nd - 1](y, 1), 1)
            else:
                y = torch.flatten(y.mean(dims_, keepdim=True), 1)
            return self.fc(y)

    model = build(Head(), data.draw)
    x = example(data.draw, nd, c)
    _, report, n = fuse_fired("affine_through_pool", model, x)
    assert report.fired_counts().get("bn_prefold") == 1
    assert n["bns"] == 0 and n["linears"] == 1


@given(st.data(), st.sampled_from(["linear", "conv", "conv-1x1-map"]))
def test_affine_before_flatten(data, producer):
    """Linear over tokens → flatten(0, 1) → BatchNorm1d (LeViT's LinearNorm), conv → flatten(2) → a per-channel
    scale, and a conv giving a 1×1 map → flatten(1) → BatchNorm1d: the affine moves before the flatten and
    folds into the Linear or conv."""
    c, fout = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            if producer == "linear":
                self.f, self.bn = nn.Linear(c, fout), nn.BatchNorm1d(fout)
            elif producer == "conv":
                self.f, self.gamma = nn.Conv2d(c, fout, 3, padding=1), nn.Parameter(torch.rand(fout, 1) + 0.5)
            else:
                self.f, self.bn = nn.Conv2d(c, fout, 3), nn.BatchNorm1d(fout)

        def forward(self, x):
            if producer == "linear":
                return self.bn(self.f(x).flatten(0, 1))
            if producer == "conv":
                return self.f(x).flatten(2) * self.gamma
            return self.bn(self.f(x).flatten(1))

    model = build(Block(), data.draw)
    shape = {"linear": (2, data.draw(st.integers(1, 5)), c), "conv": (2, c, 5, 6), "conv-1x1-map": (2, c, 3, 3)}[
        producer]
    x = torch.randn(shape, dtype=torch.float64)
    _, report, n = fuse_fired("affine_before_flatten", model, x, times=1)
    assert report.fired_counts().get("conv_bn_fold") == 1 and n["bns"] == 0 and n["ops"] == 2


# ------------------------------------------------------------------------------------------- random blocks
@given(linear_blocks(nd=2))
def test_random_linear_blocks_2d(case):
    """Random multi-branch linear blocks of one input fuse to the minimal conv count, exactly."""
    fused, report = assert_equivalent(case.module, case.inputs, rtol=RTOL)
    n = count_ops(fused)
    assert n["convs"] == case.min_convs and n["bns"] == 0, f"{case}\n{report.summary()}\n{report.refusals}"


@given(st.sampled_from([1, 3]).flatmap(lambda nd: linear_blocks(nd=nd, max_channels=4, max_branches=3)))
def test_random_linear_blocks_1d_3d(case):
    fused, report = assert_equivalent(case.module, case.inputs, rtol=RTOL)
    n = count_ops(fused)
    assert n["convs"] == case.min_convs and n["bns"] == 0, f"{case}\n{report.summary()}\n{report.refusals}"


@given(st.data(), st.sampled_from(["linear", "conv"]), st.sampled_from(["permute", "transpose"]))
def test_affine_through_layout(data, producer, how):
    """Linear over [N, H, W, C] (or a conv over [N, C, H, W]) → a permutation of the axes → a per-channel affine on
    the axis the channels moved to (BatchNorm-like scale and shift, then a layer scale): the Linear or conv alone,
    then the permute."""
    sizes = [2, data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)), data.draw(st.integers(1, 5))]
    if how == "permute":
        dims = data.draw(st.sampled_from(list(itertools.permutations(range(4)))))
    else:
        d0, d1 = data.draw(st.sampled_from(list(itertools.combinations(range(4), 2))))
        dims = list(range(4))
        dims[d0], dims[d1] = d1, d0
        dims = tuple(dims)
    out = data.draw(st.integers(1, 6))
    y_shape = sizes[:3] + [out] if producer == "linear" else [2, out] + sizes[1:3]
    moved = [y_shape[d] for d in dims]
    axis = dims.index(3 if producer == "linear" else 1)  # the axis the layer's channels moved to
    shape = [1] * 4
    shape[axis] = moved[axis]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(sizes[3], out) if producer == "linear" else nn.Conv2d(sizes[3], out, 3, padding=1)
            self.scale = nn.Parameter(torch.rand(shape) + 0.5)
            self.shift = nn.Parameter(torch.randn(shape))
            self.gamma = nn.Parameter(torch.rand(shape) + 0.5)

        def forward(self, x):
            y = self.f(x)
            y = y.permute(*dims) if how == "permute" else y.transpose(d0, d1)
            return (y * self.scale + self.shift) * self.gamma

    model = build(Block(), data.draw)
    x = torch.randn(sizes if producer == "linear" else [2, sizes[3], sizes[1], sizes[2]], dtype=torch.float64)
    fused, report = assert_equivalent(model, (x,), rtol=RTOL)
    assert report.fired_counts().get("affine_through_layout", 0) >= 1, report.summary()
    n = count_ops(fused)
    assert n["linears" if producer == "linear" else "convs"] == 1 and n["ops"] == 2  # the layer, the permute


# ------------------------------------------------------------------------------------------- coverage
TESTED = {"identity_elim", "sum_flatten", "pad_fold", "conv_bn_fold", "affine_merge", "concat_affine_split",
          "scale_fold", "identity_to_conv", "avgpool_to_conv", "dilated_to_dense", "groups_merge",
          "parallel_sum_pad", "linear_sum", "serial_merge", "serial_into_sibling", "bn_prefold", "affine_through_pool",
          "affine_before_flatten", "affine_through_layout"}


ELSEWHERE = {"conv_transpose_bn_fold": "tests/test_conv_transpose.py", "parallel_conv_transpose": "tests/test_conv_transpose.py",
             "const_pad_commute": "tests/rules/test_const_pad_commute.py", "crop_as_pad": "tests/rules/test_crop_as_pad.py"}


def test_every_builtin_rule_has_a_property_test():
    names = {r.name for r in reparam.builtin_rules()}
    missing = names - TESTED - set(ELSEWHERE)
    assert missing == set(), f"built-in rules without a property test: {sorted(missing)}"
    root = Path(__file__).resolve().parent.parent
    assert all("@given" in (root / path).read_text() for path in ELSEWHERE.values())
    for name in TESTED & names:
        assert f"def test_{name}" in open(__file__).read()
