"""rules/affine_through_pool.py: its property test (float64 hypothesis: equivalence, the rule fired, the structure
reached) and its traps (what it must refuse or leave alone)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, strategies as st

from reparam.testing import BN
from tests.rules.support import Fn, bn, build, dims, example, fuse64, fuse_fired, not_fired, refused, unchanged


def _mean_over_channels(s, x):
    return s.fc(s.bn(torch.relu(x)).mean(1).flatten(1))


def _flatten_column_scaled(s, x):
    return s.fc(torch.flatten(torch.relu(x) * s.cols, 1))


@given(st.data(), st.sampled_from(["mean", "adaptive", "mean-keepdim-flatten"]))
def test_property(data, form):
    """conv → ReLU → BN → global average (mean / adaptive pool + flatten) → Linear: the BN moves past the
    pooling into the Linear (bn_prefold)."""
    nd = data.draw(dims)
    c, fout = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8))

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = BN[nd](c)
            self.fc = nn.Linear(c, fout)

        def forward(self, x):
            y = self.bn(torch.relu(x))
            dims_ = tuple(range(2, 2 + nd))
            if form == "mean":
                y = y.mean(dims_)
            elif form == "adaptive":
                y = torch.flatten((F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[nd - 1](y, 1), 1)
            else:
                y = torch.flatten(y.mean(dims_, keepdim=True), 1)
            return self.fc(y)

    model = build(Head(), data.draw)
    x = example(data.draw, nd, c)
    _, report, n = fuse_fired("affine_through_pool", model, x)
    assert report.fired_counts().get("bn_prefold") == 1
    assert n["bns"] == 0 and n["linears"] == 1


@pytest.mark.parametrize("fn, words", [(_mean_over_channels, ("reduces the affine's axis",)),
                                       (_flatten_column_scaled, ("not the slowest",))],
                         ids=["mean-over-channels", "flatten-per-column"])
def test_trap(fn, words):
    """A BN before a mean over the channels (the mean mixes the BN's channels), and a per-column scale before
    flatten(1) (its axis is not the slowest of the flattened ones): neither moves past the pooling."""
    if fn is _mean_over_channels:
        model = Fn(fn, bn=bn(4), fc=nn.Linear(49, 3))
    else:
        model = Fn(fn, buffers={"cols": torch.rand(7) + 0.5}, fc=nn.Linear(196, 3))
    _, _, report = fuse64(model, (2, 4, 7, 7))
    refused(report, "affine_through_pool", *words)
    not_fired(report, "affine_through_pool")
    unchanged(report)
