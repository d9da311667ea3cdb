"""rules/parallel_conv_transpose.py: its property test (float64 hypothesis: equivalence, the rule fired, the structure
reached) and its traps (what it must refuse or leave alone)."""
from __future__ import annotations

from collections import Counter

import torch
import torch.nn as nn
from hypothesis import assume, given, strategies as st

import reparam
from reparam.testing import assert_equivalent, assert_fires, assert_refuses
from tests.rules.support import BN_ND, CONVT, export, fuse_onnx_checked, kinds, randomized_bn


class Parallel(nn.Module):
    def __init__(self, nd, c, out, a: dict, b: dict, bn=False):
        super().__init__()
        self.a, self.b = CONVT[nd](c, out, **a), CONVT[nd](c, out, **b)
        self.bn = BN_ND[nd](out) if bn else nn.Identity()

    def forward(self, x):
        return self.bn(self.a(x) + self.b(x))


@st.composite
def parallel_geometry(draw, onnx_runtime=False):
    nd = draw(st.integers(1, 2))
    g = draw(st.sampled_from([1, 2]))
    c, out = g * draw(st.integers(1, 2)), g * draw(st.integers(1, 2))
    s, d = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    k1, k2 = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    p1 = draw(st.integers(0, d * (k1 - 1)))
    op1 = draw(st.integers(0, (s if onnx_runtime else max(s, d)) - 1))  # ONNX Runtime: output_padding < stride
    # the second branch: any padding / output_padding giving the same output size
    want = -2 * p1 + d * (k1 - 1) + op1
    options = [(p2, op2) for p2 in range(0, d * (k2 - 1) + 1) for op2 in range(s if onnx_runtime else max(s, d))
               if -2 * p2 + d * (k2 - 1) + op2 == want]
    assume(options)
    p2, op2 = draw(st.sampled_from(options))
    size = draw(st.integers(2, 5))
    assume((size - 1) * s + want + 1 > 0)
    common = dict(stride=s, dilation=d, groups=g)
    return nd, c, out, dict(kernel_size=k1, padding=p1, output_padding=op1, **common), \
        dict(kernel_size=k2, padding=p2, output_padding=op2, **common), size


@given(parallel_geometry())
def test_property_aligned(geo):
    nd, c, out, a, b, size = geo
    m = randomized_bn(Parallel(nd, c, out, a, b))
    x = torch.randn(2, c, *[size] * nd)
    aligned = (a["padding"] - b["padding"]) % a["dilation"] == 0
    fused, rep = assert_equivalent(m, (x,), rtol=1e-10)
    assert kinds(fused)[f"ConvTranspose{nd}d"] == (1 if aligned else 2)


@given(parallel_geometry(onnx_runtime=True))
def test_property_onnx(geo):
    nd, c, out, a, b, size = geo
    m = randomized_bn(Parallel(nd, c, out, a, b, bn=True))
    shape = (1, c, *[size] * nd)
    fused, _ = fuse_onnx_checked(export(m, shape), shape)
    aligned = (a["padding"] - b["padding"]) % a["dilation"] == 0
    assert Counter(n.op_type for n in fused.graph.node)["ConvTranspose"] == (1 if aligned else 2)


def test_acceptance_the_parallel_pair_becomes_one():
    m = randomized_bn(Parallel(2, 4, 6, dict(kernel_size=4, stride=2, padding=1), dict(kernel_size=2, stride=2), bn=True))
    x = torch.randn(1, 4, 7, 5)
    fused, rep = reparam.fuse(m, (x,), report=True)
    assert kinds(fused)["ConvTranspose2d"] == 1 and kinds(fused)["BatchNorm2d"] == 0
    assert float(((fused(x) - m(x)).abs().max() / m(x).abs().max()).detach()) <= 1e-5
    assert_fires("parallel_conv_transpose", m, (x,))


def test_trap_misaligned_crops_are_refused_with_a_reason():
    # dilation 2: crops 0 and 1 differ by no multiple of 2 (the output grids interleave)
    m = randomized_bn(Parallel(1, 2, 2, dict(kernel_size=3, dilation=2, padding=1),
                            dict(kernel_size=2, dilation=2, padding=0)))
    x = torch.randn(1, 2, 6)
    assert m.a(x).shape == m.b(x).shape
    assert_refuses("parallel_conv_transpose", m, (x,), "misaligned")


def test_trap_different_strides_are_refused():
    m = randomized_bn(Parallel(2, 2, 2, dict(kernel_size=2, stride=2), dict(kernel_size=4, stride=1)))
    x = torch.randn(1, 2, 3, 3)
    assert m.a(x).shape == m.b(x).shape
    assert_refuses("parallel_conv_transpose", m, (x,), "differ")


def test_onnx_the_parallel_pair_becomes_one():
    shape = (1, 4, 5, 6)
    model = export(randomized_bn(Parallel(2, 4, 6, dict(kernel_size=4, stride=2, padding=1),
                                       dict(kernel_size=2, stride=2), bn=True)), shape)
    fused, rep = fuse_onnx_checked(model, shape)
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops["ConvTranspose"] == 1 and ops["BatchNormalization"] == 0 and ops["Add"] == 0
