"""conv_to_dense: a conv on an input whose size the model fixes, summed with an FC over the same tensor flattened, is
the conv's matrix on the flattened sample added to the FC's weight (RepMLP's local perceptrons merged into its FC).

The block (examples.authors.blocks.RepMLPBlock, RepMLPNet's as its authors write it, without its global
perceptron): x (B, C, H, W) is cut into (h, w) partitions moved to (B·N·C/S, S, h, w); the FC is a 1×1 conv with S
groups over (·, S·h·w, 1, 1) followed by a BN over the S share-sets of its output reshaped to (·, S, h, w); the local
perceptrons (k×k conv + BN, k in reparam_conv_k, groups S) read the same partitions; the sum is moved back with
``reshape(*x.size())`` (symbolic tracing fails there: the concrete capture takes over). Minimal form: the grouped
1×1 conv alone, plus the reshapes and permutes (its authors' ``local_inject``), no BN and no k×k conv left."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import reparam
from examples.authors.blocks import RepMLPBlock, conv_bn
from reparam.testing import assert_equivalent, assert_refuses, count_ops, randomize_params

RTOL = 1e-9


def build(module: nn.Module, seed: int) -> nn.Module:
    return randomize_params(module, torch.Generator().manual_seed(seed)).double().eval()


def fired(report, rule: str = "conv_to_dense") -> int:
    return report.fired_counts().get(rule, 0)


class LinearWithLocalConvs(nn.Module):
    """The Linear form: an nn.Linear over x.flatten(1) reshaped back with ``reshape(*x.size())``-style sizes, plus
    k×k conv + BN branches on x. Minimal form: the Linear alone (plus its flatten and reshape)."""

    def __init__(self, c, h, w, ks=(3,), groups=1, unpack=True):
        super().__init__()
        self.fc = nn.Linear(c * h * w, c * h * w)
        self.convs = nn.ModuleList(conv_bn(c, c, k, 1, k // 2, groups) for k in ks)
        self.sizes, self.unpack = (c, h, w), unpack

    def forward(self, x):
        y = self.fc(x.flatten(1))
        out = y.reshape(*x.size()) if self.unpack else y.reshape(-1, *self.sizes)  # concrete / symbolic capture
        for conv in self.convs:
            out = out + conv(x)
        return out



@given(st.sampled_from([1, 2]), st.integers(1, 2), st.integers(2, 4), st.integers(2, 4),
       st.lists(st.sampled_from([1, 3, 5]), min_size=1, max_size=3, unique=True), st.integers(1, 2),
       st.integers(0, 2 ** 16))
def test_property_repmlp_block(sharesets, per, h, w, ks, parts, seed):
    """RepMLPNet's block with any share-sets, partition size, kernels and number of partitions: its FC alone."""
    c = sharesets * per
    model = build(RepMLPBlock(c, h, w, tuple(ks), sharesets), seed)
    x = torch.randn(2, c, h * parts, w, dtype=torch.float64)
    fused, report = assert_equivalent(model, (x,), rtol=RTOL)
    assert fired(report) == 1, report.summary()
    n = count_ops(fused)
    assert n["convs"] == 1 and n["bns"] == 0, report.summary()
    d = sharesets * h * w
    assert n["params"] == d * h * w + d  # the grouped FC's weight and bias: the convs' and BNs' parameters gone



@given(st.integers(1, 3), st.integers(2, 4), st.integers(2, 4),
       st.lists(st.sampled_from([1, 3, 5]), min_size=1, max_size=2, unique=True), st.sampled_from([1, -1]),
       st.booleans(), st.integers(0, 2 ** 16))
def test_property_linear_form(c, h, w, ks, groups, unpack, seed):
    """An nn.Linear over the flattened input and conv branches (depthwise or dense), its output reshaped back with
    ``reshape(*x.size())`` (the concrete capture) or with literal sizes (symbolic torch.fx)."""
    model = build(LinearWithLocalConvs(c, h, w, tuple(ks), c if groups == -1 else 1, unpack), seed)
    x = torch.randn(3, c, h, w, dtype=torch.float64)
    fused, report = assert_equivalent(model, (x,), rtol=RTOL)
    assert fired(report) == 1, report.summary()
    n = count_ops(fused)
    assert n["convs"] == 0 and n["bns"] == 0 and n["linears"] == 1, report.summary()
    assert n["params"] == (c * h * w) ** 2 + c * h * w


class SumOfFlattened(nn.Module):
    """The flattened form: fc(x.flatten(1)) + conv(x).flatten(1), x a reshape of the input to fixed sizes (strided
    conv). Minimal form: the Linear alone (x's reshape and flatten stay)."""

    def __init__(self, c=2, h=4, w=4):
        super().__init__()
        self.sizes = (c, h, w)
        self.conv = nn.Conv2d(c, 3, 3, stride=2, padding=1)
        self.fc = nn.Linear(c * h * w, 3 * ((h + 1) // 2) * ((w + 1) // 2))

    def forward(self, inputs):
        x = inputs.reshape(-1, *self.sizes)
        return self.fc(x.flatten(1)) + self.conv(x).flatten(1)


def test_the_flattened_form_with_a_strided_conv():
    fused, report = assert_equivalent(build(SumOfFlattened(), 0), (torch.randn(3, 32, dtype=torch.float64),), rtol=RTOL)
    assert fired(report) == 1, report.summary()
    assert count_ops(fused)["convs"] == 0 and count_ops(fused)["linears"] == 1


def test_onnx_the_authors_block_reaches_its_fc_alone():
    from collections import Counter

    from reparam.frontends.onnx.backend import fuse_onnx
    from reparam.testing import onnx_of

    model = randomize_params(RepMLPBlock(4, 3, 3, (1, 3), 2), torch.Generator().manual_seed(0)).eval()
    out, report = fuse_onnx(onnx_of(model, (torch.randn(1, 4, 6, 9),)), report=True)
    kinds = Counter(n.op_type for n in out.graph.node)
    assert fired(report) == 1 and kinds["Conv"] == 1 and kinds["BatchNormalization"] == 0, kinds


@given(st.integers(1, 2), st.integers(1, 2), st.integers(2, 5), st.integers(2, 5), st.sampled_from([1, 3]),
       st.integers(1, 2), st.integers(1, 2), st.sampled_from(["zeros", "reflect", "circular"]), st.integers(0, 2 ** 16))
def test_property_conv_matrix(groups, per, h, w, k, stride, dilation, mode, seed):
    """kernels.conv_matrix: x.flatten(1) @ Mᵀ + m is the conv of x, padding (any mode), stride, dilation, groups."""
    from reparam.math import kernels

    gen = torch.Generator().manual_seed(seed)
    c = groups * per
    p = dilation * (k - 1) // 2
    h, w = h + 2 * p, w + 2 * p  # big enough for reflect padding and the kernel's extent
    conv = nn.Conv2d(c, 2 * groups, k, stride, p, dilation, groups, padding_mode=mode).double()
    x = torch.randn(3, c, h, w, dtype=torch.float64, generator=gen)
    M, m = kernels.conv_matrix(conv.weight.detach(), conv.bias.detach(), (c, h, w), conv.stride, ((p, p), (p, p)),
                               conv.dilation, groups, mode)
    want = conv(x).detach()
    torch.testing.assert_close(x.flatten(1) @ M.t() + m, want.flatten(1), rtol=1e-12, atol=1e-12)


def test_float32_within_1e5():
    model = randomize_params(RepMLPBlock(4, 3, 3, (1, 3, 5), 2), torch.Generator().manual_seed(3)).eval()
    x = torch.randn(2, 4, 6, 9)
    fused = reparam.fuse(model, (x,))
    with torch.no_grad():
        want, got = model(x), fused(x)
    assert got.dtype == torch.float32
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5
    assert all(p.dtype == torch.float32 for p in fused.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_keep_their_dtype(dtype):
    model = randomize_params(RepMLPBlock(4, 3, 3, (1, 3), 2), torch.Generator().manual_seed(0)).eval().to(dtype)
    x = torch.randn(2, 4, 6, 9).to(dtype)
    fused, report = reparam.fuse(model, (x,), report=True)
    assert fired(report) == 1 and fused(x).dtype == dtype
    fc = [m for m in fused.modules() if isinstance(m, nn.Conv2d)][-1]
    assert fc.weight.dtype == dtype and fc.bias.dtype == dtype


def test_the_fc_keeps_its_groups_when_the_convs_are_grouped_alike():
    fused, _ = assert_equivalent(build(RepMLPBlock(4, 2, 3, (3,), 2), 0), (torch.randn(1, 4, 4, 6),), rtol=RTOL)
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert [m.groups for m in convs][-1] == 2


# ----------------------------------------------------------------------------------------------------- traps
class ConvOnAnotherTensor(nn.Module):
    """The FC flattens x, the conv reads relu(x) (or x channels-last): not the tensor the FC flattens."""

    def __init__(self, c=2, h=3, w=3, channels_last=False):
        super().__init__()
        self.fc, self.conv, self.channels_last = nn.Linear(c * h * w, c * h * w), nn.Conv2d(c, c, 3, padding=1), channels_last

    def forward(self, x):
        flat = x.permute(0, 2, 3, 1).flatten(1) if self.channels_last else x.flatten(1)
        other = x if self.channels_last else torch.relu(x)
        return self.fc(flat).reshape(-1, *x.shape[1:]) + self.conv(other)


def test_trap_a_conv_on_another_tensor_is_refused():
    fused, _ = assert_refuses("conv_to_dense", build(ConvOnAnotherTensor(), 0), (torch.randn(2, 2, 3, 3),),
                              "no conv of the sum reads the tensor the FC")
    assert count_ops(fused)["convs"] == 1


def test_trap_a_channels_last_flatten_is_refused():
    """The FC's features are x in (H, W, C) order; the conv's matrix would be in (C, H, W) order."""
    fused, _ = assert_refuses("conv_to_dense", build(ConvOnAnotherTensor(channels_last=True), 0),
                              (torch.randn(2, 2, 3, 3),), "no conv of the sum reads the tensor the FC")
    assert count_ops(fused)["convs"] == 1


class FlatSum(nn.Module):
    """fc(x.flatten(1)) + conv(x).flatten(1): the FC's weight fixes only C·H·W, so an input (C, W, H) runs as well,
    where the conv's matrix for (C, H, W) would be wrong."""

    def __init__(self, c=2, h=2, w=3):
        super().__init__()
        self.fc, self.conv = nn.Linear(c * h * w, c * h * w), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.fc(x.flatten(1)) + self.conv(x).flatten(1)


def test_trap_a_size_the_model_does_not_fix_is_refused():
    fused, _ = assert_refuses("conv_to_dense", build(FlatSum(), 0), (torch.randn(2, 2, 2, 3),), "not fixed by the model")
    assert count_ops(fused)["convs"] == 1


def test_trap_a_matrix_above_the_limit_is_refused(monkeypatch):
    monkeypatch.setattr(importlib.import_module("reparam.rules.conv_to_dense"), "MAX_ELEMENTS", 100)
    model = build(LinearWithLocalConvs(2, 3, 3), 0)
    fused, _ = assert_refuses("conv_to_dense", model, (torch.randn(2, 2, 3, 3),), "above the limit")
    assert count_ops(fused)["convs"] == 1
