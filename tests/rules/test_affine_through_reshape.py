"""rules/affine_through_reshape.py: its property test (float64 hypothesis: equivalence, the rule fired, the structure
reached) and its trap (an axis of the reshape that no single channel index tells)."""
from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import given, strategies as st

from reparam.testing import assert_equivalent, assert_refuses, count_ops, randomize_params

RTOL = 1e-9


def build(module: nn.Module, seed: int) -> nn.Module:
    return randomize_params(module, torch.Generator().manual_seed(seed)).double().eval()


class FcThenGroupedBN(nn.Module):
    """An FC (a 1×1 conv over (N, S·a·b, 1, 1), or a Linear over (N, S·a·b)) reshaped to (N, S, a, b), then a BN over
    the S groups of its outputs (RepMLP's fc3 → fc3_bn). Minimal form: the FC alone, then the reshape."""

    def __init__(self, s, a, b, conv: bool):
        super().__init__()
        d = s * a * b
        self.sizes, self.conv = (s, a, b), conv
        self.fc = nn.Conv2d(d, d, 1, groups=s) if conv else nn.Linear(d, d)
        self.bn = nn.BatchNorm2d(s)

    def forward(self, x):
        y = self.fc(x.reshape(-1, x.shape[1], 1, 1) if self.conv else x)
        return self.bn(y.reshape(-1, *self.sizes))


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.booleans(), st.integers(0, 2 ** 16))
def test_property(s, a, b, conv, seed):
    model = build(FcThenGroupedBN(s, a, b, conv), seed)
    fused, report = assert_equivalent(model, (torch.randn(3, s * a * b, dtype=torch.float64),), rtol=RTOL)
    n = count_ops(fused)
    assert n["bns"] == 0 and n["convs"] + n["linears"] == 1, report.summary()


class MixingAxis(nn.Module):
    """A Linear's (4, 6) output reshaped to (2, 4, 3), then a BN1d over axis 1: its index (f // 3) % 4 of the flat
    position f mixes a sample's features with the sample: no axis of the Linear's output tells it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x).reshape(-1, 4, 3))


class TwoReshapes(nn.Module):
    """fc(x).reshape(-1, 3, 2).reshape(-1, 3) → BN1d(3): the column of (N·2, 3) is the Linear's feature k % 3."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(self.fc(x).reshape(-1, 3, 2).reshape(-1, 3))


def test_through_a_chain_of_reshapes():
    fused, report = assert_equivalent(build(TwoReshapes(), 0), (torch.randn(4, 4, dtype=torch.float64),), rtol=RTOL)
    assert count_ops(fused)["bns"] == 0, report.summary()


def test_trap_an_axis_mixing_samples_and_features_is_refused():
    model = build(MixingAxis(), 0)
    fused, _ = assert_refuses("affine_through_reshape", model, (torch.randn(4, 4, dtype=torch.float64),),
                              "not a function of the linear's channel axis")
    assert count_ops(fused)["bns"] == 1
