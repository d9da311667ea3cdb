"""One negative test per built-in rule, at the model level: a trap the rule must refuse (or must not fire on).

Every trap is fused in float64 and checked against the original on the example input and fresh random ones
(relative error ≤ 1e-12). A rule that refuses must leave a readable reason in ``report.refusals`` under its
own name; a rule that simply does not match (it returns None by design) must not have fired, and the
structure it would have changed must be as before. The cost traps (serial_merge, groups_merge,
dilated_to_dense) also check that the parameter count does not grow, next to the legitimate form that still
fuses to the minimal structure. ``test_every_builtin_rule_has_a_negative_test`` keeps this file in step
with rules/__init__.py.
"""
from __future__ import annotations

import os
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reparam
from reparam.testing import count_ops, randomize_params

RTOL = 1e-12


class Fn(nn.Module):
    """forward = ``fn(self, x)``, with the given submodules and constant buffers."""

    def __init__(self, fn, buffers=None, **modules):
        super().__init__()
        self.fn = fn
        for name, module in modules.items():
            setattr(self, name, module)
        for name, value in (buffers or {}).items():
            self.register_buffer(name, value)

    def forward(self, x):
        return self.fn(self, x)


def _outputs(model, x):
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, tuple) else (out,)


def fuse64(model: nn.Module, shape, *, seed: int = 0, randomize: bool = True):
    """Fuse a float64 eval copy of ``model`` (random weights and BN statistics unless ``randomize`` is off) on
    a random input of ``shape``; check the fused model equals it on that input and two fresh ones.
    Returns (model, fused, report)."""
    gen = torch.Generator().manual_seed(seed)
    model = (randomize_params(model, gen) if randomize else model).double().eval()
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    fused, report = reparam.fuse(model, x, report=True)
    for probe in [x] + [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2)]:
        for got, want in zip(_outputs(fused, probe), _outputs(model, probe), strict=True):
            assert got.dtype == torch.float64 and got.shape == want.shape
            err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))
            assert err <= RTOL, f"the fused model differs: relative error {err:.3g}\n{report.summary()}"
    return model, fused, report


def refused(report, rule: str, *words: str) -> dict:
    """The refusal of ``rule`` whose reason contains every word (case-insensitive); ``rule`` never fired there."""
    mine = [r for r in report.refusals if r["rule"] == rule]
    for r in mine:
        if all(w.lower() in r["detail"].lower() for w in words):
            assert r["detail"].strip() and r["where"], r
            assert (rule, r["where"]) not in {(e["rule"], e["where"]) for e in report.rules_fired}
            return r
    raise AssertionError(f"no refusal of {rule} mentioning {words}; its refusals: {[r['detail'] for r in mine]}\n"
                         f"all: {report.refusals}\n{report.summary()}")


def not_fired(report, rule: str) -> None:
    assert rule not in report.fired_counts(), f"{rule} fired: {report.rules_fired}\n{report.summary()}"


def unchanged(report) -> None:
    """Nothing was rewritten: the same ops, convs, BatchNorms, Linears and parameters as before."""
    assert report.after == report.before, f"{report.before} → {report.after}\n{report.rules_fired}"


def bn(c: int, nd: int = 2):
    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[nd - 1](c)


def params(module: nn.Module) -> int:
    return count_ops(module)["params"]


def convs(fused: nn.Module, kind=nn.Conv2d) -> list[nn.Module]:
    return [m for m in fused.modules() if isinstance(m, kind)]


# ------------------------------------------------------------------------------------------- canonicalizing
def _fresh_bn(shifted: bool) -> nn.Module:
    """A BatchNorm that looks like the identity and is not: default statistics (scale 1/√(1+ε)), or running
    variance 1 − ε (scale exactly 1) with a running mean of 0.5 (shift −0.5)."""
    norm = bn(4).double()
    if shifted:
        with torch.no_grad():
            norm.running_var.fill_(1 - norm.eps)
            norm.running_mean.fill_(0.5)
    return norm


@pytest.mark.parametrize("shifted", [False, True], ids=["eps-scale", "shift"])
def test_identity_elim(shifted):
    """A default-initialized BN is x/√(1+ε), not x; a BN with scale exactly 1 still shifts: neither vanishes."""
    model = Fn(lambda s, x: torch.relu(s.bn(x)), bn=_fresh_bn(shifted))
    _, _, report = fuse64(model, (2, 4, 6, 6), randomize=False)
    not_fired(report, "identity_elim")
    unchanged(report)
    assert report.after.bns == 1


def test_identity_elim_control():
    """The control: variance 1 − ε, mean 0, γ = 1, β = 0 is exactly the identity, and is dropped."""
    norm = _fresh_bn(shifted=True)
    with torch.no_grad():
        norm.running_mean.zero_()
    _, _, report = fuse64(Fn(lambda s, x: torch.relu(s.bn(x)), bn=norm), (2, 4, 6, 6), randomize=False)
    assert report.fired_counts().get("identity_elim") == 1 and report.after.bns == 0


def _inner_sum_returned(s, x):
    inner = torch.relu(x) + torch.tanh(x)
    return inner + torch.sigmoid(x), inner


def _layer_scaled_inner_sum(s, x):
    return (torch.relu(x) + torch.tanh(x)) * s.gamma + torch.sigmoid(x)


def test_sum_flatten_inner_sum_also_returned():
    """(a + b) + c where a + b is also a model output: flattening would absorb a node that is still needed."""
    _, _, report = fuse64(Fn(_inner_sum_returned), (2, 4, 6, 6))
    refused(report, "sum_flatten", "also used by", "graph output")
    not_fired(report, "sum_flatten")
    unchanged(report)


def test_sum_flatten():
    """γ ⊙ (a + b) + c with a per-channel layer scale γ: not a scalar coefficient, so the sums stay nested."""
    model = Fn(_layer_scaled_inner_sum, buffers={"gamma": torch.rand(4, 1, 1) + 0.5})
    _, _, report = fuse64(model, (2, 4, 6, 6))
    not_fired(report, "sum_flatten")
    unchanged(report)


class PadConv(nn.Module):
    def __init__(self, pads, conv, **pad_kw):
        super().__init__()
        self.pads, self.conv, self.pad_kw = pads, conv, pad_kw

    def forward(self, x):
        return self.conv(F.pad(x, self.pads, **self.pad_kw))


@pytest.mark.parametrize("trap, words", [
    (lambda: PadConv((1, 1, 1, 1), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")), ("reflect", "zeros")),
    (lambda: PadConv((1, 1, 1, 1, 1, 1), nn.Conv2d(6, 4, 3)), ("non-spatial",)),
], ids=["reflect-conv", "pads-channels"])
def test_pad_fold(trap, words):
    """F.pad(zeros) before a reflect-padded conv (the conv's own border would reflect the zeros), and an F.pad
    that also pads the channel axis: neither is the conv's own zero padding."""
    _, _, report = fuse64(trap(), (2, 4, 7, 7))
    refused(report, "pad_fold", *words)
    not_fired(report, "pad_fold")
    unchanged(report)


@pytest.mark.parametrize("pad_kw", [dict(value=0.5), dict(mode="replicate")], ids=["value-0.5", "replicate"])
def test_pad_fold_non_zero_pad_is_not_matched(pad_kw):
    """A pad with a non-zero value, or a replicate pad, is not zero padding: pad_fold never sees it as one."""
    _, _, report = fuse64(PadConv((1, 1, 1, 1), nn.Conv2d(4, 4, 3), **pad_kw), (2, 4, 7, 7))
    not_fired(report, "pad_fold")
    unchanged(report)


# ------------------------------------------------------------------------------------------- folds backwards
def _conv_then_row_scale(s, x):
    return s.conv(x) * s.rows


def _conv_also_returned(s, x):
    y = s.conv(x)
    return s.bn(y), torch.relu(y)


@pytest.mark.parametrize("fn, words", [(_conv_then_row_scale, ("not per output channel",)),
                                       (_conv_also_returned, ("also used by",))], ids=["per-row", "second-consumer"])
def test_conv_bn_fold(fn, words):
    """A scale per row (axis 2, not per output channel) after a conv; a BN after a conv whose output is also
    read by a ReLU: neither folds into the conv."""
    extra = dict(buffers={"rows": torch.rand(7, 1) + 0.5}) if fn is _conv_then_row_scale else dict(bn=bn(4))
    model = Fn(fn, conv=nn.Conv2d(4, 4, 3, padding=1), **extra)
    _, _, report = fuse64(model, (2, 4, 7, 7))
    refused(report, "conv_bn_fold", *words)
    not_fired(report, "conv_bn_fold")
    unchanged(report)


def test_affine_merge():
    """BN (per channel) then a per-column scale (axis 3): two affines on different axes are not one affine."""
    model = Fn(lambda s, x: torch.relu(s.bn(x) * s.cols), buffers={"cols": torch.rand(7) + 0.5}, bn=bn(4))
    _, _, report = fuse64(model, (2, 4, 7, 7))
    refused(report, "affine_merge", "different axes")
    not_fired(report, "affine_merge")
    unchanged(report)


def _cat_on_height(s, x):
    return s.bn(torch.cat([s.a(x), s.b(x)], 2))


def _cat_with_activation(s, x):
    return s.bn(torch.cat([s.a(x), torch.relu(x)], 1))


def test_concat_affine_split_cat_on_another_axis():
    """A per-channel BN after a cat along H: the BN's channels do not split along the concatenated pieces."""
    model = Fn(_cat_on_height, a=nn.Conv2d(4, 4, 3, padding=1), b=nn.Conv2d(4, 4, 1), bn=bn(4))
    _, _, report = fuse64(model, (2, 4, 7, 7))
    refused(report, "concat_affine_split", "not on the concatenated axis")
    not_fired(report, "concat_affine_split")
    unchanged(report)


def test_concat_affine_split():
    """BN over cat(conv(x) with 2 channels, relu(x) with 4): the BN spans unequal pieces and one of them is not
    a conv, so splitting it would fold nothing and only add an op; it is left whole."""
    model = Fn(_cat_with_activation, a=nn.Conv2d(4, 2, 3, padding=1), bn=bn(6))
    _, _, report = fuse64(model, (2, 4, 7, 7))
    not_fired(report, "concat_affine_split")
    unchanged(report)
    assert report.after.bns == 1


def _bn_after_sum(s, x):
    return s.bn(s.a(x) + s.b(torch.relu(x)))


def _scale_of_conv_and_activation(s, x):
    return (s.a(x) + torch.relu(x)) * s.gamma


def test_scale_fold_shift():
    """BN(conv(x) + conv'(relu x)): the BN shift cannot be pushed into every branch (it would count twice)."""
    model = Fn(_bn_after_sum, a=nn.Conv2d(4, 4, 3, padding=1), b=nn.Conv2d(4, 4, 1), bn=bn(4))
    _, _, report = fuse64(model, (2, 4, 7, 7))
    refused(report, "scale_fold", "shift")
    not_fired(report, "scale_fold")
    unchanged(report)


def test_scale_fold():
    """γ ⊙ (conv(x) + relu(x)): one branch is not a conv, so the scale has nothing to fold into there."""
    model = Fn(_scale_of_conv_and_activation, buffers={"gamma": torch.rand(4, 1, 1) + 0.5},
               a=nn.Conv2d(4, 4, 3, padding=1))
    _, _, report = fuse64(model, (2, 4, 7, 7))
    not_fired(report, "scale_fold")
    unchanged(report)


# ------------------------------------------------------------------------------------------- branch normalizers
def _bn_skip_also_returned(s, x):
    skip = s.bn(x)
    return s.conv(x) + skip, skip


def test_identity_to_conv_skip_also_returned():
    """conv(x) + BN(x) where BN(x) is also a model output: the BN cannot become part of the conv."""
    model = Fn(_bn_skip_also_returned, conv=nn.Conv2d(4, 4, 3, padding=1), bn=bn(4))
    _, _, report = fuse64(model, (2, 4, 7, 7))
    refused(report, "identity_to_conv", "also used by", "graph output")
    not_fired(report, "identity_to_conv")
    unchanged(report)


@pytest.mark.parametrize("conv, shape", [
    (lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1), (2, 4, 1, 1)),  # shapes agree on a 1×1 map only
    (lambda: nn.Conv2d(1, 4, 3, padding=1), (2, 1, 7, 7)),  # x has 1 channel, broadcast over 4
], ids=["strided-sibling", "channel-broadcast"])
def test_identity_to_conv(conv, shape):
    """x + conv(x) with a stride-2 conv (an identity is a stride-1 conv), or with x broadcast from 1 channel to
    the conv's 4: no identity kernel joins the conv."""
    _, _, report = fuse64(Fn(lambda s, x: x + s.conv(x), conv=conv()), shape)
    not_fired(report, "identity_to_conv")
    unchanged(report)


@pytest.mark.parametrize("pool, words", [
    (lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True), ("ceil_mode",)),
    (lambda: nn.AvgPool2d(3, 2, 1, count_include_pad=False), ("count_include_pad",)),
], ids=["ceil_mode", "count_include_pad=False"])
def test_avgpool_to_conv(pool, words):
    """An avg-pool branch beside a depthwise conv of the same geometry, with ceil_mode (extra partial windows
    for some sizes) or count_include_pad=False (border windows divide by fewer taps): not a conv."""
    model = Fn(lambda s, x: s.conv(x) + s.pool(x), conv=nn.Conv2d(4, 4, 3, 2, 1, groups=4), pool=pool())
    _, _, report = fuse64(model, (2, 4, 7, 7))
    refused(report, "avgpool_to_conv", *words)
    not_fired(report, "avgpool_to_conv")
    unchanged(report)


def test_avgpool_to_conv_lone_pool_stays_a_pool():
    """A pool with no conv before, after or beside it is cheaper as a pool: it is not turned into a conv."""
    _, _, report = fuse64(Fn(lambda s, x: torch.relu(s.pool(x)), pool=nn.AvgPool2d(3, 1, 1)), (2, 4, 7, 7))
    not_fired(report, "avgpool_to_conv")
    unchanged(report)
    assert report.after.convs == 0


def _two(s, x):
    return s.a(x) + s.b(x)


def _three(s, x):
    return s.a(x) + s.b(x) + s.c(x)


# sibling convs that differ in dilation (dilated_to_dense) or grouping (groups_merge) and that parallel_sum_pad
# cannot merge anyway: the rewritten kernel would only be larger (e6: 3,728 → 23,696 and 4,800 → 41,088 params)
DILATION_TRAPS = {
    "padding-mode": (lambda: dict(a=nn.Conv2d(8, 8, 7, padding=9, dilation=3, padding_mode="reflect"),
                                  b=nn.Conv2d(8, 8, 3, padding=1)), (1, 8, 24, 24), ("padding mode",)),
    # 3×3 d2 s2 p2 (slack 0) + 2×2 s2 (slack −1): equal output sizes on even inputs only
    "uneven-slack": (lambda: dict(a=nn.Conv2d(4, 4, 3, 2, 2, dilation=2), b=nn.Conv2d(4, 4, 2, 2)), (2, 4, 8, 8),
                     ("slack", "output sizes differ")),
    # a mergeable pair beside an unpadded 3×3 whose 1×1 output the sum broadcasts: parallel_sum_pad refuses the
    # whole sum, so densifying the dilated conv would be for nothing
    "broadcast-sibling": (lambda: dict(a=nn.Conv2d(4, 4, 3, padding=2, dilation=2), b=nn.Conv2d(4, 4, 3, padding=1),
                                       c=nn.Conv2d(4, 4, 3)), (2, 4, 3, 3), ("broadcasts",)),
}
GROUPS_TRAPS = {
    "padding-mode": (lambda: dict(a=nn.Conv2d(64, 64, 3, padding=1, groups=64, padding_mode="reflect"),
                                  b=nn.Conv2d(64, 64, 1)), (1, 64, 8, 8), ("padding mode",)),
    # a depthwise 3×3 s2 p1 (slack 0) beside a 2×2 s2 patchify conv (slack −1): equal sizes on even inputs only
    "uneven-slack": (lambda: dict(a=nn.Conv2d(4, 4, 3, 2, 1, groups=4), b=nn.Conv2d(4, 4, 2, 2)), (2, 4, 8, 8),
                     ("slack", "output sizes differ")),
    # a mergeable pair beside an unpadded 3×3 whose 1×1 output the sum broadcasts: parallel_sum_pad refuses the
    # whole sum, so regrouping the depthwise conv would be for nothing
    "broadcast-sibling": (lambda: dict(a=nn.Conv2d(4, 4, 3, padding=1, groups=4), b=nn.Conv2d(4, 4, 1),
                                       c=nn.Conv2d(4, 4, 3)), (2, 4, 3, 3), ("broadcasts",)),
}


@pytest.mark.parametrize("name", list(DILATION_TRAPS))
def test_dilated_to_dense(name):
    """A dilated conv beside a dense one that parallel_sum_pad will not merge with it keeps its dilation."""
    modules, shape, words = DILATION_TRAPS[name]
    modules = modules()
    model, fused, report = fuse64(Fn(_three if "c" in modules else _two, **modules), shape)
    refused(report, "dilated_to_dense", "parallel_sum_pad", *words)
    not_fired(report, "dilated_to_dense")
    unchanged(report)
    assert params(fused) <= params(model)
    assert sorted(m.dilation for m in convs(fused)) == sorted(m.dilation for m in convs(model))


@pytest.mark.parametrize("name", list(GROUPS_TRAPS))
def test_groups_merge(name):
    """A depthwise conv beside a dense one that parallel_sum_pad will not merge with it keeps its grouping."""
    modules, shape, words = GROUPS_TRAPS[name]
    modules = modules()
    model, fused, report = fuse64(Fn(_three if "c" in modules else _two, **modules), shape)
    refused(report, "groups_merge", *words)
    not_fired(report, "groups_merge")
    unchanged(report)
    assert params(fused) <= params(model)
    assert sorted(m.groups for m in convs(fused)) == sorted(m.groups for m in convs(model))


def test_dilated_to_dense_only_for_the_sibling_that_merges():
    """d3 reflect + d1 zeros + d2 zeros: the two zero-padded convs meet in one 5×5, the reflect one stays 7×7 d3."""
    modules = dict(a=nn.Conv2d(8, 8, 7, padding=9, dilation=3, padding_mode="reflect"),
                   b=nn.Conv2d(8, 8, 3, padding=1), c=nn.Conv2d(8, 8, 3, padding=2, dilation=2))
    model, fused, report = fuse64(Fn(_three, **modules), (1, 8, 24, 24))
    assert report.fired_counts().get("dilated_to_dense") == 1 and report.fired_counts().get("parallel_sum_pad") == 1
    shapes = sorted((m.kernel_size, m.dilation, m.padding_mode) for m in convs(fused))
    assert shapes == [((5, 5), (1, 1), "zeros"), ((7, 7), (3, 3), "reflect")], shapes
    kept = next(m for m in convs(fused) if m.padding_mode == "reflect")
    assert torch.equal(kept.weight, model.a.weight)  # untouched: the 7×7 d3 kernel is not densified to 19×19


def test_groups_merge_only_for_the_sibling_that_merges():
    """dw-3×3 reflect + dense 3×3 + dw 1×1: the dw 1×1 joins the dense 3×3, the reflect dw conv stays depthwise."""
    modules = dict(a=nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect"),
                   b=nn.Conv2d(8, 8, 3, padding=1), c=nn.Conv2d(8, 8, 1, groups=8))
    model, fused, report = fuse64(Fn(_three, **modules), (1, 8, 12, 12))
    assert report.fired_counts().get("groups_merge") == 1 and report.fired_counts().get("parallel_sum_pad") == 1
    shapes = sorted((m.groups, m.kernel_size, m.padding_mode) for m in convs(fused))
    assert shapes == [(1, (3, 3), "zeros"), (8, (3, 3), "reflect")], shapes
    assert params(fused) < params(model)


@pytest.mark.parametrize("rule, modules, shape", [
    ("dilated_to_dense", lambda: dict(a=nn.Conv2d(8, 8, 7, padding=9, dilation=3), b=nn.Conv2d(8, 8, 3, padding=1)),
     (1, 8, 24, 24)),
    ("groups_merge", lambda: dict(a=nn.Conv2d(8, 8, 3, padding=1, groups=8), b=nn.Conv2d(8, 8, 1)), (1, 8, 8, 8)),
    ("groups_merge", lambda: dict(a=nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8),
                                  b=nn.Conv2d(8, 8, 3, padding=1)),
     (1, 8, 12, 12)),  # differs in grouping and dilation: both normalizers run, then one conv
], ids=["dilated+dense", "dw+dense", "dilated-dw+dense"])
def test_normalizers_still_fire_for_mergeable_siblings(rule, modules, shape):
    """The controls: siblings that agree on stride, padding mode and channels and line up still become one conv."""
    _, fused, report = fuse64(Fn(_two, **modules()), shape)
    assert report.fired_counts().get(rule) == 1 and report.fired_counts().get("parallel_sum_pad") == 1
    assert report.after.convs == 1 and report.after.ops == 1 and not report.refusals


# ------------------------------------------------------------------------------------------- merges
@pytest.mark.parametrize("modules, shape, words", [
    (lambda: dict(a=nn.Conv2d(4, 4, 3, padding=1), b=nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")),
     (2, 4, 8, 8), ("padding mode", "reflect")),
    (lambda: dict(a=nn.Conv2d(4, 4, 3, 2, 1), b=nn.Conv2d(4, 4, 2, 2)), (2, 4, 8, 8), ("misaligned", "slack")),
    (lambda: dict(a=nn.Conv2d(4, 4, 3, padding=1, groups=4), b=nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")),
     (2, 4, 8, 8), ("padding mode", "reflect")),  # the blocker named, not the grouping groups_merge would fix
], ids=["padding-mode", "uneven-slack", "padding-mode-not-groups"])
def test_parallel_sum_pad(modules, shape, words):
    """Zeros + reflect padded siblings, and a 3×3 s2 p1 beside a 2×2 s2 (padding slack 0 vs −1: the same output
    size on even inputs only, so not one conv for every input size)."""
    _, _, report = fuse64(Fn(_two, **modules()), shape)
    refused(report, "parallel_sum_pad", *words)
    not_fired(report, "parallel_sum_pad")
    unchanged(report)


def _heads_of_halves(s, x):
    return s.a(x[..., :4]) + s.b(x[..., 4:])


def _head_also_returned(s, x):
    h = s.a(x)
    return h + s.b(x), h


def test_linear_sum_head_also_returned():
    """a(x) + b(x) where a(x) is also a model output: the heads cannot become one Linear."""
    _, _, report = fuse64(Fn(_head_also_returned, a=nn.Linear(8, 3), b=nn.Linear(8, 3)), (2, 5, 8))
    refused(report, "linear_sum", "also used by", "graph output")
    not_fired(report, "linear_sum")
    unchanged(report)


@pytest.mark.parametrize("fn, heads", [
    (_heads_of_halves, lambda: dict(a=nn.Linear(4, 3), b=nn.Linear(4, 3))),  # different inputs
    (_two, lambda: dict(a=nn.Linear(8, 1), b=nn.Linear(8, 3))),  # 1 output broadcast against 3
], ids=["different-inputs", "broadcast-output"])
def test_linear_sum(fn, heads):
    """Linears of different inputs (the two halves of x), or of different output sizes (one broadcast): their
    weights do not add up."""
    _, _, report = fuse64(Fn(fn, **heads()), (2, 5, 8))
    not_fired(report, "linear_sum")
    unchanged(report)
    assert report.after.linears == 2


class Chain(nn.Module):
    def __init__(self, *layers, sibling=None):
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.sibling = sibling

    def forward(self, x):
        y = self.layers(x)
        return y if self.sibling is None else y + self.sibling(x)


@pytest.mark.parametrize("chain, shape, words", [
    (lambda: Chain(nn.Linear(256, 8), nn.Linear(8, 256)), (2, 256), ("merged Linear", "multiply-adds", "256→8→256")),
    (lambda: Chain(nn.Linear(64, 4), nn.Linear(4, 64)), (2, 7, 64), ("multiply-adds",)),  # tokens (N, T, C)
    (lambda: Chain(nn.Conv2d(64, 4, 1), nn.Conv2d(4, 64, 1)), (1, 64, 8, 8), ("multiply-adds",)),
    (lambda: Chain(nn.Conv2d(4, 6, 1), nn.Conv2d(6, 4, 3, padding=1)), (1, 4, 8, 8), ("bias",)),
], ids=["linear-bottleneck", "token-bottleneck", "conv1x1-bottleneck", "bias-then-padded"])
def test_serial_merge(chain, shape, words):
    """Bottlenecks (the merged layer costs more than the two: 256→8→256 would go from 4,360 to 65,792
    parameters), and a 1×1 with a bias before a zero-padded 3×3 (the border sees the bias, not 0)."""
    model, fused, report = fuse64(chain(), shape)
    refused(report, "serial_merge", *words)
    not_fired(report, "serial_merge")
    unchanged(report)
    assert params(fused) <= params(model)


@pytest.mark.parametrize("chain, shape, rule", [
    (lambda: Chain(nn.Linear(16, 32), nn.Linear(32, 16)), (3, 16), "serial_merge"),  # widening: cheaper merged
    (lambda: Chain(nn.Linear(64, 4, bias=False), nn.Linear(4, 64, bias=False), sibling=nn.Linear(64, 64)),
     (2, 5, 64), "serial_into_sibling"),  # a low-rank (LoRA) branch beside a full Linear: then linear_sum
], ids=["widening", "low-rank-beside-full"])
def test_serial_merge_linear_still_fuses(chain, shape, rule):
    """The controls: a chain that is cheaper merged, and a bottleneck that vanishes into a sibling, become one
    Linear with no more parameters than before."""
    model, fused, report = fuse64(chain(), shape)
    assert report.fired_counts().get(rule) == 1 and not report.refusals
    assert report.after.linears == 1 and report.after.ops == 1
    assert params(fused) <= params(model)


def _chain_beside(s, x):
    return s.b(s.a(x)) + s.c(x)


@pytest.mark.parametrize("modules, words", [
    (lambda: dict(a=nn.Conv2d(8, 2, 1), b=nn.Conv2d(2, 8, 3, padding=1), c=nn.Conv2d(8, 8, 3, padding=1)),
     ("bias",)),  # the 1×1's bias would reach the 3×3's zero-padded border as b, not 0
], ids=["bias-then-padded"])
def test_serial_into_sibling(modules, words):
    """A 1×1 with a bias → a zero-padded 3×3 beside a 3×3: the chain is not one conv, so it stays a chain."""
    model, fused, report = fuse64(Fn(_chain_beside, **modules()), (1, 8, 8, 8))
    refused(report, "serial_into_sibling", *words)
    not_fired(report, "serial_into_sibling")
    unchanged(report)


def test_serial_into_sibling_needs_a_covering_sibling():
    """A bottleneck 1×1 (8→2) → 3×3 beside a 1×1 only: the 3×3 composite is not covered, so it is not built
    (it would cost 576 multiply-adds per pixel against 160 apart)."""
    modules = dict(a=nn.Conv2d(8, 2, 1, bias=False), b=nn.Conv2d(2, 8, 3, padding=1), c=nn.Conv2d(8, 8, 1))
    model, fused, report = fuse64(Fn(_chain_beside, **modules), (1, 8, 8, 8))
    not_fired(report, "serial_into_sibling")
    assert report.after.convs == 3 and params(fused) <= params(model)


# ------------------------------------------------------------------------------------------- folds forwards
@pytest.mark.parametrize("fn, modules, shape, words", [
    (lambda s, x: s.conv(s.bn(x)), lambda: dict(bn=bn(4), conv=nn.Conv2d(4, 6, 3, padding=1)), (2, 4, 8, 8),
     ("zero-pads", "shift")),
    (lambda s, x: s.fc(s.bn(x)), lambda: dict(bn=bn(4, nd=1), fc=nn.Linear(6, 5)), (2, 4, 6),
     ("not per input channel",)),  # BN1d on the channels of (N, C, L), Linear over L (token mixing)
], ids=["padded-conv", "linear-over-another-axis"])
def test_bn_prefold(fn, modules, shape, words):
    """A BN before a zero-padded 3×3 (the border would see 0 instead of the shift), and a BN on axis 1 before
    a Linear that mixes the last axis: neither folds into the layer after it."""
    _, _, report = fuse64(Fn(fn, **modules()), shape)
    refused(report, "bn_prefold", *words)
    not_fired(report, "bn_prefold")
    unchanged(report)


def _mean_over_channels(s, x):
    return s.fc(s.bn(torch.relu(x)).mean(1).flatten(1))


def _flatten_column_scaled(s, x):
    return s.fc(torch.flatten(torch.relu(x) * s.cols, 1))


@pytest.mark.parametrize("fn, words", [(_mean_over_channels, ("reduces the affine's axis",)),
                                       (_flatten_column_scaled, ("not the slowest",))],
                         ids=["mean-over-channels", "flatten-per-column"])
def test_affine_through_pool(fn, words):
    """A BN before a mean over the channels (the mean mixes the BN's channels), and a per-column scale before
    flatten(1) (its axis is not the slowest of the flattened ones): neither moves past the pooling."""
    if fn is _mean_over_channels:
        model = Fn(fn, bn=bn(4), fc=nn.Linear(49, 3))
    else:
        model = Fn(fn, buffers={"cols": torch.rand(7) + 0.5}, fc=nn.Linear(196, 3))
    _, _, report = fuse64(model, (2, 4, 7, 7))
    refused(report, "affine_through_pool", *words)
    not_fired(report, "affine_through_pool")
    unchanged(report)


def _scale_along_merged_axis(s, x):
    return s.conv(x).flatten(1, 2) * s.rows


def _flatten_of_activation(s, x):
    return s.bn(torch.relu(s.fc(x)).flatten(0, 1))


@pytest.mark.parametrize("fn, words", [(_scale_along_merged_axis, ("flattened axis",)),
                                       (_flatten_of_activation, ())], ids=["merged-axis", "not-after-a-linear"])
def test_affine_before_flatten(fn, words):
    """A scale along the axis flatten(1, 2) made of channels × rows names no single axis before it; and a BN after
    flattening an activation has no conv or Linear to fold into, so it stays where it is."""
    if fn is _scale_along_merged_axis:
        model = Fn(fn, buffers={"rows": torch.rand(4 * 7, 1) + 0.5}, conv=nn.Conv2d(4, 4, 3, padding=1))
        shape = (2, 4, 7, 7)
    else:
        model = Fn(fn, fc=nn.Linear(4, 6), bn=bn(6, 1))
        shape = (2, 3, 4)
    _, _, report = fuse64(model, shape)
    if words:
        refused(report, "affine_before_flatten", *words)
    not_fired(report, "affine_before_flatten")
    unchanged(report)


# ------------------------------------------------------------------------------------------- coverage
# negative tests that sit beside their op kind's other tests: rule -> (file, test)
ELSEWHERE = {"conv_transpose_bn_fold": ("test_conv_transpose.py", "test_trap_bn_without_running_statistics_is_not_folded"),
             "parallel_conv_transpose": ("test_conv_transpose.py", "test_trap_misaligned_crops_are_refused_with_a_reason"),
             "affine_through_layout": ("test_layout_rules.py", "test_affine_through_layout_leaves_what_it_cannot_prove"),
             "const_pad_commute": ("rules/test_const_pad_commute.py",
                                   "test_const_pad_commute_refuses_values_that_are_not_the_bias"),
             "crop_as_pad": ("rules/test_crop_as_pad.py", "test_crop_as_pad_refuses_a_crop_the_conv_pads_again")}


def test_every_builtin_rule_has_a_negative_test():
    source = open(__file__).read()
    here = os.path.dirname(os.path.abspath(__file__))
    for path, test in ELSEWHERE.values():
        assert f"def {test}(" in open(os.path.join(here, path)).read(), (path, test)
    missing = [r.name for r in reparam.builtin_rules() if f"def test_{r.name}(" not in source and r.name not in ELSEWHERE]
    assert not missing, f"built-in rules without a negative test here: {missing}"

