"""rules/avgpool_to_conv.py: its property test (float64 hypothesis: equivalence, the rule fired, the structure
reached) and its traps (what it must refuse or leave alone)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st

from reparam.testing import BN, Branches, ConvSpec, POOL
from tests.rules.support import Fn, build, dims, example, fuse64, fuse_fired, not_fired, refused, unchanged


@given(st.data())
def test_property(data):
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


@pytest.mark.parametrize("pool, words", [
    (lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True), ("ceil_mode",)),
    (lambda: nn.AvgPool2d(3, 2, 1, count_include_pad=False), ("count_include_pad",)),
], ids=["ceil_mode", "count_include_pad=False"])
def test_trap(pool, words):
    """An avg-pool branch beside a depthwise conv of the same geometry, with ceil_mode (extra partial windows
    for some sizes) or count_include_pad=False (border windows divide by fewer taps): not a conv."""
    model = Fn(lambda s, x: s.conv(x) + s.pool(x), conv=nn.Conv2d(4, 4, 3, 2, 1, groups=4), pool=pool())
    _, _, report = fuse64(model, (2, 4, 7, 7))
    refused(report, "avgpool_to_conv", *words)
    not_fired(report, "avgpool_to_conv")
    unchanged(report)


def test_trap_lone_pool_stays_a_pool():
    """A pool with no conv before, after or beside it is cheaper as a pool: it is not turned into a conv."""
    _, _, report = fuse64(Fn(lambda s, x: torch.relu(s.pool(x)), pool=nn.AvgPool2d(3, 1, 1)), (2, 4, 7, 7))
    not_fired(report, "avgpool_to_conv")
    unchanged(report)
    assert report.after.convs == 0
