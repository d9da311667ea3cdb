"""rules/conv_transpose_bn_fold.py: its property test (float64 hypothesis: equivalence, the rule fired, the structure
reached) and its traps (what it must refuse or leave alone)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn as nn
from hypothesis import assume, given, strategies as st

import reparam
from reparam.testing import assert_equivalent
from tests.rules.support import ConvTBN, export, fuse_onnx_checked, kinds, randomized_bn


@st.composite
def convt_geometry(draw, nd=None):
    nd = nd or draw(st.integers(1, 3))
    g = draw(st.sampled_from([1, 2]))
    cin, cout = g * draw(st.integers(1, 2)), g * draw(st.integers(1, 3))
    k = draw(st.integers(1, 4 if nd < 3 else 3))
    s, d = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    p = draw(st.integers(0, d * (k - 1)))
    op = draw(st.integers(0, max(s, d) - 1))
    size = draw(st.integers(2, 5 if nd < 3 else 3))
    assume((size - 1) * s - 2 * p + d * (k - 1) + op + 1 > 0)
    return nd, cin, cout, k, s, p, op, d, g, size


class SharedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.ConvTranspose2d(2, 2, 3, stride=2), nn.BatchNorm2d(2)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y), y


@given(convt_geometry(), st.booleans())
def test_property(geo, bias):
    nd, cin, cout, k, s, p, op, d, g, size = geo
    x = torch.randn(2, cin, *[size] * nd)
    m = randomized_bn(ConvTBN(nd, cin, cout, k, s, p, op, d, g, bias))
    fused, rep = assert_equivalent(m, (x,), rtol=1e-10)
    assert kinds(fused)["BatchNorm%dd" % nd] == 0 and kinds(fused)["ConvTranspose%dd" % nd] == 1
    assert any(f["rule"] == "conv_transpose_bn_fold" for f in rep.rules_fired)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_acceptance_leaves_no_bn_fp32(nd):
    m = randomized_bn(ConvTBN(nd, 4, 6, 3, 2, 1, 1, 1, 2))
    x = torch.randn(1, 4, *[5] * nd)
    fused, rep = reparam.fuse(m, (x,), report=True)
    assert kinds(fused)[f"BatchNorm{nd}d"] == 0
    assert rep.after.convs == 1 and rep.after.bns == 0 and rep.before.convs == 1
    assert float(((fused(x) - m(x)).abs().max() / m(x).abs().max()).detach()) <= 1e-5


def test_trap_bn_without_running_statistics_is_not_folded():
    m = randomized_bn(ConvTBN(2, 2, 2, 3, 2, 1, 0, 1, 1))
    m.bn = nn.BatchNorm2d(2, track_running_stats=False)
    fused = reparam.fuse(m, (torch.randn(1, 2, 4, 4),), verify=False)
    assert kinds(fused)["BatchNorm2d"] == 1


def test_trap_convT_output_read_twice_keeps_its_bn():
    m = randomized_bn(SharedOutput())
    x = torch.randn(1, 2, 4, 4)
    fused = reparam.fuse(m, (x,))
    assert kinds(fused)["BatchNorm2d"] == 1 or kinds(fused)["ConvTranspose2d"] == 2
    for got, want in zip(fused(x), m(x)):
        assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_onnx_convT_bn_leaves_no_bn(nd):
    shape = (1, 4, *[4] * nd)
    model = export(randomized_bn(ConvTBN(nd, 4, 6, 3, 2, 1, 1, 1, 2)), shape)
    fused, rep = fuse_onnx_checked(model, shape)
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops["BatchNormalization"] == 0 and ops["ConvTranspose"] == 1
    assert rep.before.convs == 1 and rep.after.convs == 1
