"""rules/sum_flatten.py: its property test (float64 hypothesis: equivalence, the rule fired, the structure
reached) and its traps (what it must refuse or leave alone)."""
from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import given, strategies as st

from reparam.testing import ConvSpec
from tests.rules.support import Fn, build, dims, example, fuse64, fuse_fired, not_fired, refused, specs, unchanged


def _inner_sum_returned(s, x):
    inner = torch.relu(x) + torch.tanh(x)
    return inner + torch.sigmoid(x), inner


def _layer_scaled_inner_sum(s, x):
    return (torch.relu(x) + torch.tanh(x)) * s.gamma + torch.sigmoid(x)


@given(st.data())
def test_property(data):
    """(a(x) + b(relu x)) + c(x): the nested sum flattens so a and c meet and merge → two convs."""
    nd = data.draw(dims)
    spec = data.draw(specs(nd, padding="same", strides=(1,), dilations=(1,)))
    other = ConvSpec(nd, spec.in_channels, spec.out_channels, spec.kernel_size, spec.stride, spec.dilation,
                     spec.padding, spec.groups, True)

    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = spec.module(), other.module(), spec.module()

        def forward(self, x):
            return (self.a(x) + self.b(torch.relu(x))) + self.c(x)

    model = build(Nested(), data.draw)
    x = example(data.draw, nd, spec.in_channels, spec.min_size())
    _, _, n = fuse_fired("sum_flatten", model, x, times=1)
    assert n["convs"] == 2


def test_trap_inner_sum_also_returned():
    """(a + b) + c where a + b is also a model output: flattening would absorb a node that is still needed."""
    _, _, report = fuse64(Fn(_inner_sum_returned), (2, 4, 6, 6))
    refused(report, "sum_flatten", "also used by", "graph output")
    not_fired(report, "sum_flatten")
    unchanged(report)


def test_trap():
    """γ ⊙ (a + b) + c with a per-channel layer scale γ: not a scalar coefficient, so the sums stay nested."""
    model = Fn(_layer_scaled_inner_sum, buffers={"gamma": torch.rand(4, 1, 1) + 0.5})
    _, _, report = fuse64(model, (2, 4, 6, 6))
    not_fired(report, "sum_flatten")
    unchanged(report)
