"""rules/conv_bn_fold.py: its property test (float64 hypothesis: equivalence, the rule fired, the structure
reached) and its traps (what it must refuse or leave alone)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st

from reparam.testing import BN
from tests.rules.support import Fn, bn, build, dims, example, fuse64, fuse_fired, not_fired, pad_ops, refused, specs, unchanged


def _conv_then_row_scale(s, x):
    return s.conv(x) * s.rows


def _conv_also_returned(s, x):
    y = s.conv(x)
    return s.bn(y), torch.relu(y)


@given(st.data())
def test_property(data):
    """conv (any nd, groups, stride, dilation, padding, ± bias) → BN becomes one conv."""
    nd = data.draw(dims)
    spec = data.draw(specs(nd))
    model = build(nn.Sequential(spec.module(), BN[nd](spec.out_channels)), data.draw)
    x = example(data.draw, nd, spec.in_channels, spec.min_size())
    _, _, n = fuse_fired("conv_bn_fold", model, x, times=1)
    assert n["convs"] == 1 and n["bns"] == 0 and n["ops"] == pad_ops(spec)


@given(st.data())
def test_property_linear_bn1d(data):
    """Linear → BatchNorm1d on (N, F) becomes one Linear."""
    fin, fout = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8))
    model = build(nn.Sequential(nn.Linear(fin, fout, bias=data.draw(st.booleans())), nn.BatchNorm1d(fout)),
                  data.draw)
    x = torch.randn(3, fin, dtype=torch.float64)
    _, _, n = fuse_fired("conv_bn_fold", model, x, times=1)
    assert n["linears"] == 1 and n["bns"] == 0 and n["ops"] == 1


@pytest.mark.parametrize("fn, words", [(_conv_then_row_scale, ("not per output channel",)),
                                       (_conv_also_returned, ("also used by",))], ids=["per-row", "second-consumer"])
def test_trap(fn, words):
    """A scale per row (axis 2, not per output channel) after a conv; a BN after a conv whose output is also
    read by a ReLU: neither folds into the conv."""
    extra = dict(buffers={"rows": torch.rand(7, 1) + 0.5}) if fn is _conv_then_row_scale else dict(bn=bn(4))
    model = Fn(fn, conv=nn.Conv2d(4, 4, 3, padding=1), **extra)
    _, _, report = fuse64(model, (2, 4, 7, 7))
    refused(report, "conv_bn_fold", *words)
    not_fired(report, "conv_bn_fold")
    unchanged(report)
