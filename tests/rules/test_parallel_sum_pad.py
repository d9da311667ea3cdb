"""rules/parallel_sum_pad.py: its property test (float64 hypothesis: equivalence, the rule fired, the structure
reached) and its traps (what it must refuse or leave alone)."""
from __future__ import annotations

import pytest
import torch.nn as nn
from hypothesis import given, strategies as st

from reparam.testing import Branches, ConvSpec
from tests.rules.support import Fn, _two, build, dims, example, fuse64, fuse_fired, geometry, not_fired, refused, specs, unchanged


@given(st.data())
def test_property(data):
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


@pytest.mark.parametrize("modules, shape, words", [
    (lambda: dict(a=nn.Conv2d(4, 4, 3, padding=1), b=nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")),
     (2, 4, 8, 8), ("padding mode", "reflect")),
    (lambda: dict(a=nn.Conv2d(4, 4, 3, 2, 1), b=nn.Conv2d(4, 4, 2, 2)), (2, 4, 8, 8), ("misaligned", "slack")),
    (lambda: dict(a=nn.Conv2d(4, 4, 3, padding=1, groups=4), b=nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")),
     (2, 4, 8, 8), ("padding mode", "reflect")),  # the blocker named, not the grouping groups_merge would fix
], ids=["padding-mode", "uneven-slack", "padding-mode-not-groups"])
def test_trap(modules, shape, words):
    """Zeros + reflect padded siblings, and a 3×3 s2 p1 beside a 2×2 s2 (padding slack 0 vs −1: the same output
    size on even inputs only, so not one conv for every input size)."""
    _, _, report = fuse64(Fn(_two, **modules()), shape)
    refused(report, "parallel_sum_pad", *words)
    not_fired(report, "parallel_sum_pad")
    unchanged(report)
