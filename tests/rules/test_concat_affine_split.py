"""rules/concat_affine_split.py: its property test (float64 hypothesis: equivalence, the rule fired, the structure
reached) and its traps (what it must refuse or leave alone)."""
from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import given, strategies as st

from reparam.testing import BN
from tests.rules.support import Fn, bn, build, dims, example, fuse64, fuse_fired, not_fired, pad_ops, refused, specs, unchanged


def _cat_on_height(s, x):
    return s.bn(torch.cat([s.a(x), s.b(x)], 2))


def _cat_with_activation(s, x):
    return s.bn(torch.cat([s.a(x), torch.relu(x)], 1))


@given(st.data())
def test_property(data):
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


def test_trap_cat_on_another_axis():
    """A per-channel BN after a cat along H: the BN's channels do not split along the concatenated pieces."""
    model = Fn(_cat_on_height, a=nn.Conv2d(4, 4, 3, padding=1), b=nn.Conv2d(4, 4, 1), bn=bn(4))
    _, _, report = fuse64(model, (2, 4, 7, 7))
    refused(report, "concat_affine_split", "not on the concatenated axis")
    not_fired(report, "concat_affine_split")
    unchanged(report)


def test_trap():
    """BN over cat(conv(x) with 2 channels, relu(x) with 4): the BN spans unequal pieces and one of them is not
    a conv, so splitting it would fold nothing and only add an op; it is left whole."""
    model = Fn(_cat_with_activation, a=nn.Conv2d(4, 2, 3, padding=1), bn=bn(6))
    _, _, report = fuse64(model, (2, 4, 7, 7))
    not_fired(report, "concat_affine_split")
    unchanged(report)
    assert report.after.bns == 1
