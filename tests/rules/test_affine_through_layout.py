"""rules/affine_through_layout.py: its property test (float64 hypothesis: equivalence, the rule fired, the structure
reached) and its traps (what it must refuse or leave alone)."""
from __future__ import annotations

import itertools

import torch
import torch.nn as nn
from hypothesis import given, strategies as st

from reparam.testing import assert_equivalent, count_ops, randomize_params
from tests.rules.support import RTOL, build, dims


class AfterActivation(nn.Module):
    """The trap: an affine after permuting an activation has no layer to fold into; it stays where it is."""

    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 6)
        self.g = nn.Parameter(torch.rand(6, 1, 1) + 0.5)

    def forward(self, x):
        return torch.relu(self.f(x)).permute(0, 3, 1, 2) * self.g


class OtherAxis(nn.Module):
    """An affine on an axis that was not the Linear's channel axis (here its rows) cannot fold into it."""

    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 6)
        self.g = nn.Parameter(torch.rand(3, 1, 1) + 0.5)

    def forward(self, x):
        return self.f(x).permute(0, 1, 3, 2) * self.g.reshape(3, 1, 1)


class Broadcasting(nn.Module):
    """A constant that broadcasts the permuted tensor to a new shape is not a per-axis affine of it."""

    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 6)
        self.g = nn.Parameter(torch.rand(3, 6, 1, 1) + 0.5)

    def forward(self, x):
        return self.f(x).permute(0, 3, 1, 2) * self.g


@given(st.data(), st.sampled_from(["linear", "conv"]), st.sampled_from(["permute", "transpose"]))
def test_property(data, producer, how):
    """Linear over [N, H, W, C] (or a conv over [N, C, H, W]) → a permutation of the axes → a per-channel affine on
    the axis the channels moved to (BatchNorm-like scale and shift, then a layer scale): the Linear or conv alone,
    then the permute."""
    sizes = [2, data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)), data.draw(st.integers(1, 5))]
    if how == "permute":
        dims = data.draw(st.sampled_from(list(itertools.permutations(range(4)))))
    else:
        d0, d1 = data.draw(st.sampled_from(list(itertools.combinations(range(4), 2))))
        dims = list(range(4))
        dims[d0], dims[d1] = d1, d0
        dims = tuple(dims)
    out = data.draw(st.integers(1, 6))
    y_shape = sizes[:3] + [out] if producer == "linear" else [2, out] + sizes[1:3]
    moved = [y_shape[d] for d in dims]
    axis = dims.index(3 if producer == "linear" else 1)  # the axis the layer's channels moved to
    shape = [1] * 4
    shape[axis] = moved[axis]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(sizes[3], out) if producer == "linear" else nn.Conv2d(sizes[3], out, 3, padding=1)
            self.scale = nn.Parameter(torch.rand(shape) + 0.5)
            self.shift = nn.Parameter(torch.randn(shape))
            self.gamma = nn.Parameter(torch.rand(shape) + 0.5)

        def forward(self, x):
            y = self.f(x)
            y = y.permute(*dims) if how == "permute" else y.transpose(d0, d1)
            return (y * self.scale + self.shift) * self.gamma

    model = build(Block(), data.draw)
    x = torch.randn(sizes if producer == "linear" else [2, sizes[3], sizes[1], sizes[2]], dtype=torch.float64)
    fused, report = assert_equivalent(model, (x,), rtol=RTOL)
    assert report.fired_counts().get("affine_through_layout", 0) >= 1, report.summary()
    n = count_ops(fused)
    assert n["linears" if producer == "linear" else "convs"] == 1 and n["ops"] == 2  # the layer, the permute


def test_trap_leaves_what_it_cannot_prove():
    for cls in (AfterActivation, Broadcasting, OtherAxis):
        model = randomize_params(cls()).double().eval()
        fused, report = assert_equivalent(model, (torch.randn(1, 3, 5, 4, dtype=torch.float64),))
        assert report.fired_counts().get("affine_through_layout", 0) == 0
        assert count_ops(fused)["linears"] == 1
        if cls is OtherAxis:
            assert any(r["rule"] == "affine_through_layout" and "channel axis" in r["detail"] for r in report.refusals)
