"""affine_through_layout: what it must leave alone (its property test is in test_rules.py)."""
from __future__ import annotations

import torch
import torch.nn as nn

from reparam.testing import assert_equivalent, count_ops, randomize_params


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


def test_affine_through_layout_leaves_what_it_cannot_prove():
    for cls in (AfterActivation, Broadcasting, OtherAxis):
        model = randomize_params(cls()).double().eval()
        fused, report = assert_equivalent(model, (torch.randn(1, 3, 5, 4, dtype=torch.float64),))
        assert report.fired_counts().get("affine_through_layout", 0) == 0
        assert count_ops(fused)["linears"] == 1
        if cls is OtherAxis:
            assert any(r["rule"] == "affine_through_layout" and "channel axis" in r["detail"] for r in report.refusals)
