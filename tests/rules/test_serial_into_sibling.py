"""rules/serial_into_sibling.py: its property test (float64 hypothesis: equivalence, the rule fired, the structure
reached) and its traps (what it must refuse or leave alone)."""
from __future__ import annotations

import pytest
import torch.nn as nn
from hypothesis import given, strategies as st

from reparam.testing import Branches
from tests.rules.support import Fn, build, example, fuse64, fuse_fired, not_fired, params, refused, unchanged


def _chain_beside(s, x):
    return s.b(s.a(x)) + s.c(x)


@given(st.data(), st.booleans())
def test_property(data, strided):
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


@pytest.mark.parametrize("modules, words", [
    (lambda: dict(a=nn.Conv2d(8, 2, 1), b=nn.Conv2d(2, 8, 3, padding=1), c=nn.Conv2d(8, 8, 3, padding=1)),
     ("bias",)),  # the 1×1's bias would reach the 3×3's zero-padded border as b, not 0
], ids=["bias-then-padded"])
def test_trap(modules, words):
    """A 1×1 with a bias → a zero-padded 3×3 beside a 3×3: the chain is not one conv, so it stays a chain."""
    model, fused, report = fuse64(Fn(_chain_beside, **modules()), (1, 8, 8, 8))
    refused(report, "serial_into_sibling", *words)
    not_fired(report, "serial_into_sibling")
    unchanged(report)


def test_trap_needs_a_covering_sibling():
    """A bottleneck 1×1 (8→2) → 3×3 beside a 1×1 only: the 3×3 composite is not covered, so it is not built
    (it would cost 576 multiply-adds per pixel against 160 apart)."""
    modules = dict(a=nn.Conv2d(8, 2, 1, bias=False), b=nn.Conv2d(2, 8, 3, padding=1), c=nn.Conv2d(8, 8, 1))
    model, fused, report = fuse64(Fn(_chain_beside, **modules), (1, 8, 8, 8))
    not_fired(report, "serial_into_sibling")
    assert report.after.convs == 3 and params(fused) <= params(model)
