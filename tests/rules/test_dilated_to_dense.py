"""rules/dilated_to_dense.py: its property test (float64 hypothesis: equivalence, the rule fired, the structure
reached) and its traps (what it must refuse or leave alone)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st

from reparam.testing import Branches
from tests.rules.support import Fn, _three, _two, build, convs, dims, example, fuse64, fuse_fired, not_fired, params, refused, specs, unchanged


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


@given(st.data())
def test_property(data):
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


@pytest.mark.parametrize("name", list(DILATION_TRAPS))
def test_trap(name):
    """A dilated conv beside a dense one that parallel_sum_pad will not merge with it keeps its dilation."""
    modules, shape, words = DILATION_TRAPS[name]
    modules = modules()
    model, fused, report = fuse64(Fn(_three if "c" in modules else _two, **modules), shape)
    refused(report, "dilated_to_dense", "parallel_sum_pad", *words)
    not_fired(report, "dilated_to_dense")
    unchanged(report)
    assert params(fused) <= params(model)
    assert sorted(m.dilation for m in convs(fused)) == sorted(m.dilation for m in convs(model))


def test_trap_only_for_the_sibling_that_merges():
    """d3 reflect + d1 zeros + d2 zeros: the two zero-padded convs meet in one 5×5, the reflect one stays 7×7 d3."""
    modules = dict(a=nn.Conv2d(8, 8, 7, padding=9, dilation=3, padding_mode="reflect"),
                   b=nn.Conv2d(8, 8, 3, padding=1), c=nn.Conv2d(8, 8, 3, padding=2, dilation=2))
    model, fused, report = fuse64(Fn(_three, **modules), (1, 8, 24, 24))
    assert report.fired_counts().get("dilated_to_dense") == 1 and report.fired_counts().get("parallel_sum_pad") == 1
    shapes = sorted((m.kernel_size, m.dilation, m.padding_mode) for m in convs(fused))
    assert shapes == [((5, 5), (1, 1), "zeros"), ((7, 7), (3, 3), "reflect")], shapes
    kept = next(m for m in convs(fused) if m.padding_mode == "reflect")
    assert torch.equal(kept.weight, model.a.weight)  # untouched: the 7×7 d3 kernel is not densified to 19×19
