"""rules/bn_prefold.py: its property test (float64 hypothesis: equivalence, the rule fired, the structure
reached) and its traps (what it must refuse or leave alone)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st

from reparam.testing import BN
from tests.rules.support import Fn, bn, build, dims, example, fuse64, fuse_fired, not_fired, refused, specs, unchanged


@given(st.data())
def test_property(data):
    """BN → unpadded conv (any kernel, stride, dilation, groups) → one conv."""
    nd = data.draw(dims)
    spec = data.draw(specs(nd, padding="none"))
    model = build(nn.Sequential(BN[nd](spec.in_channels), spec.module()), data.draw)
    x = example(data.draw, nd, spec.in_channels, spec.min_size())
    _, _, n = fuse_fired("bn_prefold", model, x, times=1)
    assert n["convs"] == 1 and n["bns"] == 0 and n["ops"] == 1


@given(st.data(), st.booleans())
def test_property_linear(data, dropout):
    """BN1d → (eval Dropout) → Linear → one Linear."""
    fin, fout = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8))
    mods = [nn.BatchNorm1d(fin)] + ([nn.Dropout(0.5)] if dropout else []) + [nn.Linear(fin, fout)]
    model = build(nn.Sequential(*mods), data.draw)
    _, _, n = fuse_fired("bn_prefold", model, torch.randn(3, fin, dtype=torch.float64), times=1)
    assert n["linears"] == 1 and n["bns"] == 0 and n["ops"] == 1


@pytest.mark.parametrize("fn, modules, shape, words", [
    (lambda s, x: s.conv(s.bn(x)), lambda: dict(bn=bn(4), conv=nn.Conv2d(4, 6, 3, padding=1)), (2, 4, 8, 8),
     ("zero-pads", "shift")),
    (lambda s, x: s.fc(s.bn(x)), lambda: dict(bn=bn(4, nd=1), fc=nn.Linear(6, 5)), (2, 4, 6),
     ("not per input channel",)),  # BN1d on the channels of (N, C, L), Linear over L (token mixing)
], ids=["padded-conv", "linear-over-another-axis"])
def test_trap(fn, modules, shape, words):
    """A BN before a zero-padded 3×3 (the border would see 0 instead of the shift), and a BN on axis 1 before
    a Linear that mixes the last axis: neither folds into the layer after it."""
    _, _, report = fuse64(Fn(fn, **modules()), shape)
    refused(report, "bn_prefold", *words)
    not_fired(report, "bn_prefold")
    unchanged(report)
