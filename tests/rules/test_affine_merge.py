"""rules/affine_merge.py: its property test (float64 hypothesis: equivalence, the rule fired, the structure
reached) and its traps (what it must refuse or leave alone)."""
from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import given, strategies as st

from reparam.testing import BN, LayerScale
from tests.rules.support import Fn, bn, build, dims, example, fuse64, fuse_fired, not_fired, refused, unchanged


@given(st.data())
def test_property(data):
    """BN → BN → layer scale with nothing to fold into: one affine remains (mul, add), no BatchNorm."""
    nd = data.draw(dims)
    c = data.draw(st.integers(1, 8))
    model = build(nn.Sequential(BN[nd](c), BN[nd](c), LayerScale(c, nd, 0.5), nn.ReLU()), data.draw)
    x = example(data.draw, nd, c)
    _, _, n = fuse_fired("affine_merge", model, x, times=2)
    assert n["bns"] == 0 and n["ops"] == 3  # x·s + t, relu


def test_trap():
    """BN (per channel) then a per-column scale (axis 3): two affines on different axes are not one affine."""
    model = Fn(lambda s, x: torch.relu(s.bn(x) * s.cols), buffers={"cols": torch.rand(7) + 0.5}, bn=bn(4))
    _, _, report = fuse64(model, (2, 4, 7, 7))
    refused(report, "affine_merge", "different axes")
    not_fired(report, "affine_merge")
    unchanged(report)
