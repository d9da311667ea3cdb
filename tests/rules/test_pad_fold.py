"""rules/pad_fold.py: its property test (float64 hypothesis: equivalence, the rule fired, the structure
reached) and its traps (what it must refuse or leave alone)."""
from __future__ import annotations

import pytest
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, strategies as st

from reparam.testing import ConvSpec, ZeroPad
from tests.rules.support import build, dims, example, fuse64, fuse_fired, not_fired, pad_ops, refused, specs, unchanged


def padded(spec: ConvSpec) -> nn.Module:
    """The conv written as F.pad (its (lo, hi) per axis) → unpadded conv."""
    pads = [p for lo, hi in reversed(spec.padding) for p in (lo, hi)]
    return nn.Sequential(ZeroPad(pads), spec.conv(padding=0))


class PadConv(nn.Module):
    def __init__(self, pads, conv, **pad_kw):
        super().__init__()
        self.pads, self.conv, self.pad_kw = pads, conv, pad_kw

    def forward(self, x):
        return self.conv(F.pad(x, self.pads, **self.pad_kw))


@given(st.data())
def test_property(data):
    """F.pad (zeros, any (lo, hi) per axis) → unpadded conv becomes one conv with that padding."""
    nd = data.draw(dims)
    spec = data.draw(specs(nd).filter(lambda s: any(p != (0, 0) for p in s.padding)))
    model = build(padded(spec), data.draw)
    x = example(data.draw, nd, spec.in_channels, spec.min_size())
    _, _, n = fuse_fired("pad_fold", model, x, times=1)
    assert n["convs"] == 1 and n["ops"] == pad_ops(spec)


@pytest.mark.parametrize("trap, words", [
    (lambda: PadConv((1, 1, 1, 1), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")), ("reflect", "zeros")),
    (lambda: PadConv((1, 1, 1, 1, 1, 1), nn.Conv2d(6, 4, 3)), ("non-spatial",)),
], ids=["reflect-conv", "pads-channels"])
def test_trap(trap, words):
    """F.pad(zeros) before a reflect-padded conv (the conv's own border would reflect the zeros), and an F.pad
    that also pads the channel axis: neither is the conv's own zero padding."""
    _, _, report = fuse64(trap(), (2, 4, 7, 7))
    refused(report, "pad_fold", *words)
    not_fired(report, "pad_fold")
    unchanged(report)


@pytest.mark.parametrize("pad_kw", [dict(value=0.5), dict(mode="replicate")], ids=["value-0.5", "replicate"])
def test_trap_non_zero_pad_is_not_matched(pad_kw):
    """A pad with a non-zero value, or a replicate pad, is not zero padding: pad_fold never sees it as one."""
    _, _, report = fuse64(PadConv((1, 1, 1, 1), nn.Conv2d(4, 4, 3), **pad_kw), (2, 4, 7, 7))
    not_fired(report, "pad_fold")
    unchanged(report)
