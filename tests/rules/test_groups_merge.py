"""rules/groups_merge.py: its property test (float64 hypothesis: equivalence, the rule fired, the structure
reached) and its traps (what it must refuse or leave alone)."""
from __future__ import annotations

import math

import pytest
import torch.nn as nn
from hypothesis import given, strategies as st

from reparam.testing import Branches, CONV, ConvSpec
from tests.rules.support import Fn, _three, _two, build, convs, dims, example, fuse64, fuse_fired, not_fired, params, refused, specs, unchanged


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


@given(st.data())
def test_property(data):
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


@pytest.mark.parametrize("name", list(GROUPS_TRAPS))
def test_trap(name):
    """A depthwise conv beside a dense one that parallel_sum_pad will not merge with it keeps its grouping."""
    modules, shape, words = GROUPS_TRAPS[name]
    modules = modules()
    model, fused, report = fuse64(Fn(_three if "c" in modules else _two, **modules), shape)
    refused(report, "groups_merge", *words)
    not_fired(report, "groups_merge")
    unchanged(report)
    assert params(fused) <= params(model)
    assert sorted(m.groups for m in convs(fused)) == sorted(m.groups for m in convs(model))


def test_trap_only_for_the_sibling_that_merges():
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
def test_trap_control_normalizers_still_fire(rule, modules, shape):
    """The controls: siblings that agree on stride, padding mode and channels and line up still become one conv."""
    _, fused, report = fuse64(Fn(_two, **modules()), shape)
    assert report.fired_counts().get(rule) == 1 and report.fired_counts().get("parallel_sum_pad") == 1
    assert report.after.convs == 1 and report.after.ops == 1 and not report.refusals
