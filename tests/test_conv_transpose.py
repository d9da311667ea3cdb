"""ConvTranspose: the op kind added through the public extension API, its BN fold and its parallel merge, on FX
and ONNX (property tests in float64, acceptance cases, traps)."""
from __future__ import annotations

import io
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from hypothesis import assume, given, strategies as st

import reparam
from reparam.frontends.onnx.backend import relative_error, run_ort
from reparam.rules.conv_transpose import ConvTranspose
from reparam.testing import assert_equivalent, assert_fires, assert_refuses

CONVT = (None, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BN = (None, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def randomized(m: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.5)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.weight.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.num_features, generator=g) * 0.5)
    return m.eval()


class ConvTBN(nn.Module):
    def __init__(self, nd, cin, cout, k, s, p, op, d, g, bias=True):
        super().__init__()
        self.conv = CONVT[nd](cin, cout, k, stride=s, padding=p, output_padding=op, dilation=d, groups=g, bias=bias)
        self.bn = BN[nd](cout)

    def forward(self, x):
        return self.bn(self.conv(x))


class Parallel(nn.Module):
    def __init__(self, nd, c, out, a: dict, b: dict, bn=False):
        super().__init__()
        self.a, self.b = CONVT[nd](c, out, **a), CONVT[nd](c, out, **b)
        self.bn = BN[nd](out) if bn else nn.Identity()

    def forward(self, x):
        return self.bn(self.a(x) + self.b(x))


def kinds(model) -> Counter:
    return Counter(type(m).__name__ for m in model.modules())


@st.composite
def geometry(draw, nd=None):
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


@given(geometry(), st.booleans())
def test_convT_bn_fold_is_exact_in_float64(geo, bias):
    nd, cin, cout, k, s, p, op, d, g, size = geo
    x = torch.randn(2, cin, *[size] * nd)
    m = randomized(ConvTBN(nd, cin, cout, k, s, p, op, d, g, bias))
    fused, rep = assert_equivalent(m, (x,), rtol=1e-10)
    assert kinds(fused)["BatchNorm%dd" % nd] == 0 and kinds(fused)["ConvTranspose%dd" % nd] == 1
    assert any(f["rule"] == "conv_transpose_bn_fold" for f in rep.rules_fired)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_acceptance_convT_bn_leaves_no_bn_fp32(nd):
    m = randomized(ConvTBN(nd, 4, 6, 3, 2, 1, 1, 1, 2))
    x = torch.randn(1, 4, *[5] * nd)
    fused, rep = reparam.fuse(m, (x,), report=True)
    assert kinds(fused)[f"BatchNorm{nd}d"] == 0
    assert rep.after.convs == 1 and rep.after.bns == 0 and rep.before.convs == 1
    assert float(((fused(x) - m(x)).abs().max() / m(x).abs().max()).detach()) <= 1e-5


def test_acceptance_the_parallel_pair_becomes_one():
    m = randomized(Parallel(2, 4, 6, dict(kernel_size=4, stride=2, padding=1), dict(kernel_size=2, stride=2), bn=True))
    x = torch.randn(1, 4, 7, 5)
    fused, rep = reparam.fuse(m, (x,), report=True)
    assert kinds(fused)["ConvTranspose2d"] == 1 and kinds(fused)["BatchNorm2d"] == 0
    assert float(((fused(x) - m(x)).abs().max() / m(x).abs().max()).detach()) <= 1e-5
    assert_fires("parallel_conv_transpose", m, (x,))


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
def test_parallel_convT_merge_is_exact_in_float64_when_aligned(geo):
    nd, c, out, a, b, size = geo
    m = randomized(Parallel(nd, c, out, a, b))
    x = torch.randn(2, c, *[size] * nd)
    aligned = (a["padding"] - b["padding"]) % a["dilation"] == 0
    fused, rep = assert_equivalent(m, (x,), rtol=1e-10)
    assert kinds(fused)[f"ConvTranspose{nd}d"] == (1 if aligned else 2)


def test_trap_misaligned_crops_are_refused_with_a_reason():
    # dilation 2: crops 0 and 1 differ by no multiple of 2 (the output grids interleave)
    m = randomized(Parallel(1, 2, 2, dict(kernel_size=3, dilation=2, padding=1),
                            dict(kernel_size=2, dilation=2, padding=0)))
    x = torch.randn(1, 2, 6)
    assert m.a(x).shape == m.b(x).shape
    assert_refuses("parallel_conv_transpose", m, (x,), "misaligned")


def test_trap_different_strides_are_refused():
    m = randomized(Parallel(2, 2, 2, dict(kernel_size=2, stride=2), dict(kernel_size=4, stride=1)))
    x = torch.randn(1, 2, 3, 3)
    assert m.a(x).shape == m.b(x).shape
    assert_refuses("parallel_conv_transpose", m, (x,), "differ")


def test_trap_bn_without_running_statistics_is_not_folded():
    m = randomized(ConvTBN(2, 2, 2, 3, 2, 1, 0, 1, 1))
    m.bn = nn.BatchNorm2d(2, track_running_stats=False)
    fused = reparam.fuse(m, (torch.randn(1, 2, 4, 4),), verify=False)
    assert kinds(fused)["BatchNorm2d"] == 1


class SharedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.ConvTranspose2d(2, 2, 3, stride=2), nn.BatchNorm2d(2)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y), y


def test_trap_convT_output_read_twice_keeps_its_bn():
    m = randomized(SharedOutput())
    x = torch.randn(1, 2, 4, 4)
    fused = reparam.fuse(m, (x,))
    assert kinds(fused)["BatchNorm2d"] == 1 or kinds(fused)["ConvTranspose2d"] == 2
    for got, want in zip(fused(x), m(x)):
        assert torch.allclose(got, want, atol=1e-5)


def test_functional_and_torch_export_forms_are_recognized():
    class F_(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4, 3, 3))
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(nn.functional.conv_transpose2d(x, self.w, None, 2, 1, 1))

    m = randomized(F_())
    x = torch.randn(1, 3, 4, 4)
    fused = reparam.fuse(m, (x,))
    assert kinds(fused)["BatchNorm2d"] == 0
    ep = torch.export.export(randomized(ConvTBN(2, 2, 4, 3, 2, 1, 1, 1, 2)), (torch.randn(1, 2, 5, 5),))
    _, rep = reparam.fuse_exported(ep, report=True)
    assert rep.before.convs == 1 and rep.after.bns == 0 and rep.after.convs == 1


# --- ONNX ------------------------------------------------------------------------------------------------------
def export(module: nn.Module, shape) -> onnx.ModelProto:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn(shape),), f, dynamo=False, opset_version=17,
                          do_constant_folding=False)
    return onnx.load_from_string(f.getvalue())


def fuse_onnx_checked(model, shape):
    fused, rep = reparam.fuse_onnx(model, report=True)
    onnx.checker.check_model(fused, full_check=True)
    rng = np.random.default_rng(3)
    feeds = {model.graph.input[0].name: rng.standard_normal(shape).astype(np.float32)}
    assert relative_error(run_ort(fused, feeds), run_ort(model, feeds)) <= 1e-5
    assert rep.verification.error_fp64 is not None and rep.verification.error_fp64 <= 1e-10
    return fused, rep


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_onnx_convT_bn_leaves_no_bn(nd):
    shape = (1, 4, *[4] * nd)
    model = export(randomized(ConvTBN(nd, 4, 6, 3, 2, 1, 1, 1, 2)), shape)
    fused, rep = fuse_onnx_checked(model, shape)
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops["BatchNormalization"] == 0 and ops["ConvTranspose"] == 1
    assert rep.before.convs == 1 and rep.after.convs == 1


def test_onnx_the_parallel_pair_becomes_one():
    shape = (1, 4, 5, 6)
    model = export(randomized(Parallel(2, 4, 6, dict(kernel_size=4, stride=2, padding=1),
                                       dict(kernel_size=2, stride=2), bn=True)), shape)
    fused, rep = fuse_onnx_checked(model, shape)
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops["ConvTranspose"] == 1 and ops["BatchNormalization"] == 0 and ops["Add"] == 0


@given(parallel_geometry(onnx_runtime=True))
def test_onnx_parallel_convT_property(geo):
    nd, c, out, a, b, size = geo
    m = randomized(Parallel(nd, c, out, a, b, bn=True))
    shape = (1, c, *[size] * nd)
    fused, _ = fuse_onnx_checked(export(m, shape), shape)
    aligned = (a["padding"] - b["padding"]) % a["dilation"] == 0
    assert Counter(n.op_type for n in fused.graph.node)["ConvTranspose"] == (1 if aligned else 2)


def test_the_op_kind_owns_its_output_shape():
    op = ConvTranspose(torch.zeros(2, 3, 4, 4, dtype=torch.float64), None, (2, 2), ((1, 1), (1, 0)), (1, 1))
    x = torch.zeros(1, 2, 5, 7, dtype=torch.float64)
    assert op.output_shape([tuple(x.shape)]) == tuple(op.evaluate(x).shape)
