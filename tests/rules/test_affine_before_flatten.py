"""rules/affine_before_flatten.py: its property test (float64 hypothesis: equivalence, the rule fired, the structure
reached) and its traps (what it must refuse or leave alone)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st
from tests.rules.support import Fn, bn, build, fuse64, fuse_fired, not_fired, refused, unchanged


def _scale_along_merged_axis(s, x):
    return s.conv(x).flatten(1, 2) * s.rows


def _flatten_of_activation(s, x):
    return s.bn(torch.relu(s.fc(x)).flatten(0, 1))


@given(st.data(), st.sampled_from(["linear", "conv", "conv-1x1-map"]))
def test_property(data, producer):
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


@pytest.mark.parametrize("fn, words", [(_scale_along_merged_axis, ("flattened axis",)),
                                       (_flatten_of_activation, ())], ids=["merged-axis", "not-after-a-linear"])
def test_trap(fn, words):
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
