"""rules/scale_fold.py: its property test (float64 hypothesis: equivalence, the rule fired, the structure
reached) and its traps (what it must refuse or leave alone)."""
from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import given, strategies as st

from reparam.testing import LayerScale
from tests.rules.support import Fn, bn, build, dims, example, fuse64, fuse_fired, not_fired, pad_ops, refused, specs, unchanged


def _bn_after_sum(s, x):
    return s.bn(s.a(x) + s.b(torch.relu(x)))


def _scale_of_conv_and_activation(s, x):
    return (s.a(x) + torch.relu(x)) * s.gamma


@given(st.data())
def test_property(data):
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


def test_trap_shift():
    """BN(conv(x) + conv'(relu x)): the BN shift cannot be pushed into every branch (it would count twice)."""
    model = Fn(_bn_after_sum, a=nn.Conv2d(4, 4, 3, padding=1), b=nn.Conv2d(4, 4, 1), bn=bn(4))
    _, _, report = fuse64(model, (2, 4, 7, 7))
    refused(report, "scale_fold", "shift")
    not_fired(report, "scale_fold")
    unchanged(report)


def test_trap():
    """γ ⊙ (conv(x) + relu(x)): one branch is not a conv, so the scale has nothing to fold into there."""
    model = Fn(_scale_of_conv_and_activation, buffers={"gamma": torch.rand(4, 1, 1) + 0.5},
               a=nn.Conv2d(4, 4, 3, padding=1))
    _, _, report = fuse64(model, (2, 4, 7, 7))
    not_fired(report, "scale_fold")
    unchanged(report)
