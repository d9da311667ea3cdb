"""torch.export programs (.pt2) fuse on their ATen graph through the same rules as modules.

Each model is exported in eval mode, saved to a .pt2, loaded back and fused: the fused program reaches
the exact single-branch structure (counted as ATen calls in its graph), its fp64 verification passes
(≤ 1e-12, against ``ep.module()``), and it matches the original model in fp32 (≤ 1e-5 relative,
against the float64 original).
"""
from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn as nn

import reparam
from examples.repnext import repnext_m0
from examples.repnext.utils import randomize_bn_stats
from reparam.errors import CaptureError, ReparamError, VerificationError
from reparam.frontends.aten.backend import fuse_exported, is_core_aten
from reparam.io.pt2 import load_pt2, save_pt2
from reparam.core.ops import Affine
from reparam.core.pattern import P, X
from reparam.frontends.fx.counting import count_model
from reparam.core.rule import rule

aten = torch.ops.aten
CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default}
BNS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default, aten.native_batch_norm.default}


def conv_bn(cin, cout, k, padding=0, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, 1, padding, groups=groups, bias=False), nn.BatchNorm2d(cout))


class RepVGG(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.dense, self.one, self.skip = conv_bn(c, c, 3, 1), conv_bn(c, c, 1), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.dense(x) + self.one(x) + self.skip(x))


class ACNet(nn.Module):
    def __init__(self, cin=4, cout=6):
        super().__init__()
        self.square, self.hor, self.ver = conv_bn(cin, cout, 3, 1), conv_bn(cin, cout, (1, 3), (0, 1)), \
            conv_bn(cin, cout, (3, 1), (1, 0))

    def forward(self, x):
        return self.square(x) + self.hor(x) + self.ver(x)


class ChunkCat(nn.Module):
    """One BN over two concatenated convs; the result is chunked and each half gets a residual depthwise conv."""

    def __init__(self, c=4):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.Conv2d(c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(2 * c)
        self.da, self.db = nn.Conv2d(c, c, 3, padding=1, groups=c), nn.Conv2d(c, c, 3, padding=1, groups=c)

    def forward(self, x):
        y = self.bn(torch.cat([self.a(x), self.b(x)], 1))
        p, q = y.chunk(2, 1)
        return torch.cat([p + self.da(p), q + self.db(q)], 1)


def prepared(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    randomize_bn_stats(model, torch.Generator().manual_seed(seed))
    return model.eval()


def calls(ep: torch.export.ExportedProgram) -> Counter:
    return Counter(n.target for n in ep.graph.nodes if n.op == "call_function")


def roundtrip(model: nn.Module, x: torch.Tensor, tmp_path, **kwargs):
    """Export → .pt2 → load → fuse_exported; returns (loaded program, fused program, report)."""
    path = tmp_path / "model.pt2"
    save_pt2(torch.export.export(model, (x,)), path)
    ep = load_pt2(path)
    fused, rep = reparam.fuse_exported(ep, report=True, **kwargs)
    assert isinstance(fused, torch.export.ExportedProgram)
    assert rep.verification.passed and rep.verification.error_fp64 <= 1e-12
    return ep, fused, rep


def relative_error_fp32(model: nn.Module, fused: torch.export.ExportedProgram, x: torch.Tensor) -> float:
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
        got = fused.module()(x)
    assert got.dtype == torch.float32 and got.shape == want.shape
    return float((got.double() - want).abs().max() / want.abs().max())


def test_repvgg_block_becomes_one_conv(tmp_path):
    model, x = prepared(RepVGG()), torch.randn(2, 8, 10, 10)
    ep, fused, rep = roundtrip(model, x, tmp_path)
    assert calls(fused) == Counter({aten.conv2d.default: 1, aten.relu.default: 1})
    assert [tuple(t.shape) for t in fused.state_dict.values()] == [(8, 8, 3, 3), (8,)]
    assert relative_error_fp32(model, fused, x) <= 1e-5
    assert (rep.before.convs, rep.before.bns, rep.after.convs, rep.after.bns) == (2, 3, 1, 0)


def test_acnet_block_becomes_one_conv(tmp_path):
    model, x = prepared(ACNet()), torch.randn(1, 4, 9, 9)
    _, fused, _ = roundtrip(model, x, tmp_path)
    assert calls(fused) == Counter({aten.conv2d.default: 1})
    assert [tuple(t.shape) for t in fused.state_dict.values()] == [(6, 4, 3, 3), (6,)]
    assert relative_error_fp32(model, fused, x) <= 1e-5


def test_chunk_cat_block_same_structure_as_module_path(tmp_path):
    model, x = prepared(ChunkCat()), torch.randn(1, 4, 8, 8)
    _, fused, rep = roundtrip(model, x, tmp_path)
    assert calls(fused) == Counter({aten.conv2d.default: 4, aten.cat.default: 2, aten.chunk.default: 1,
                                    __import__("operator").getitem: 2})
    assert count_model(reparam.fuse(model, (x,))).convs == 4  # the module path reaches the same
    assert {"concat_affine_split", "conv_bn_fold", "identity_to_conv"} <= set(rep.fired_counts())
    assert relative_error_fp32(model, fused, x) <= 1e-5


class Mixed(nn.Module):
    """An avg-pool branch, scale/shift/divide, explicit pad, eval dropout, clone, pooled head: each an ATen call."""

    def __init__(self):
        super().__init__()
        self.dense, self.pool, self.pool_bn = conv_bn(4, 4, 3, 1), nn.AvgPool2d(3, 1, 1), nn.BatchNorm2d(4)
        self.scale = nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)
        self.conv, self.fc = nn.Conv2d(4, 6, 3), nn.Linear(6, 3)

    def forward(self, x):
        y = (self.dense(x) + self.pool_bn(self.pool(x))) * self.scale
        y = self.conv(nn.functional.pad((y - 0.5) / 2, [1, 1, 1, 1]))
        y = nn.functional.dropout(y, 0.3, training=False).clone()
        return self.fc(nn.functional.adaptive_avg_pool2d(y, 1).view(1, -1))


@pytest.mark.parametrize("decomposed", [False, True])
def test_mixed_aten_ops_fold_away(decomposed):
    model, x = prepared(Mixed()), torch.randn(1, 4, 8, 8)
    ep = torch.export.export(model, (x,))
    ep = ep.run_decompositions() if decomposed else ep
    fused, rep = fuse_exported(ep, report=True)
    assert rep.verification.passed and rep.verification.error_fp64 <= 1e-12
    if decomposed:
        want = {aten.convolution.default: 2, aten.mean.dim: 1, aten.view.default: 1, aten.permute.default: 1,
                aten.addmm.default: 1}
    else:
        want = {aten.conv2d.default: 2, aten.adaptive_avg_pool2d.default: 1, aten.view.default: 1,
                aten.linear.default: 1}
    assert calls(fused) == Counter(want)
    assert count_model(reparam.fuse(model, (x,))).convs == 2  # the module path reaches the same
    assert relative_error_fp32(model, fused, x) <= 1e-5


def test_decomposed_program_fuses_too(tmp_path):
    """run_decompositions() gives convolution + _native_batch_norm_legit_no_training + getitem: same result."""
    model, x = prepared(RepVGG(6)), torch.randn(1, 6, 7, 7)
    ep = torch.export.export(model, (x,)).run_decompositions()
    assert any(t in BNS - {aten.batch_norm.default} for t in calls(ep))
    fused = fuse_exported(ep)
    counted = calls(fused)
    assert sum(counted[t] for t in CONVS) == 1 and not any(t in BNS for t in counted)
    assert is_core_aten(fused) and counted[aten.convolution.default] == 1  # decomposed like its input
    assert relative_error_fp32(model, fused, x) <= 1e-5


def test_repnext_m0_fuses_to_98_convs(tmp_path):
    model, x = prepared(repnext_m0()), torch.randn(1, 3, 64, 64)
    _, fused, rep = roundtrip(model, x, tmp_path)
    counted = calls(fused)
    assert sum(counted[t] for t in CONVS) == 98
    assert not any(t in BNS for t in counted)
    assert rep.after.convs == 98 and rep.after.bns == 0 and rep.before.bns == 55
    assert relative_error_fp32(model, fused, x) <= 1e-5


class ShuffleThenBN(nn.Module):
    """A trap, a BN after a channel shuffle (view/transpose/reshape), beside a BN after a transposed conv (which
    folds into it: the ConvTranspose op kind)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.up, self.up_bn = nn.ConvTranspose2d(8, 8, 2, stride=2), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x).view(1, 2, 4, 6, 6).transpose(1, 2).reshape(1, 8, 6, 6)
        return self.up_bn(self.up(self.bn(y)))


def test_traps_stay_as_they_were():
    model, x = prepared(ShuffleThenBN()), torch.randn(1, 8, 6, 6)
    ep = torch.export.export(model, (x,))
    fused, rep = fuse_exported(ep, report=True)
    assert [e["rule"] for e in rep.rules_fired] == ["conv_transpose_bn_fold"]  # the shuffled BN stays
    assert rep.verification.passed and rep.verification.error_fp64 < 1e-12


class KwargsAndDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = RepVGG(4)

    def forward(self, x, *, bias):
        y = self.block(x)
        return {"out": y + bias, "pair": (y, x)}


def test_calling_convention_is_kept(tmp_path):
    """Keyword inputs and a nested output structure survive: the fused program is called like the original."""
    model, x, b = prepared(KwargsAndDict()), torch.randn(1, 4, 6, 6), torch.randn(1, 4, 1, 1)
    ep = torch.export.export(model, (x,), {"bias": b})
    fused, rep = fuse_exported(ep, report=True)
    assert rep.verification.passed
    assert sum(calls(fused)[t] for t in CONVS) == 1
    with torch.no_grad():
        got, want = fused.module()(x, bias=b), model(x, bias=b)
    assert set(got) == {"out", "pair"} and isinstance(got["pair"], tuple) and len(got["pair"]) == 2
    torch.testing.assert_close(got["out"], want["out"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["pair"][1], x)


def test_input_program_untouched(tmp_path):
    model, x = prepared(RepVGG()), torch.randn(1, 8, 6, 6)
    ep = torch.export.export(model, (x,))
    before_calls, before_state = calls(ep), {k: v.clone() for k, v in ep.state_dict.items()}
    with torch.no_grad():
        before = ep.module()(x)
    fuse_exported(ep)
    assert calls(ep) == before_calls
    assert all(torch.equal(before_state[k], v) for k, v in ep.state_dict.items())
    with torch.no_grad():
        assert torch.equal(ep.module()(x), before)


@rule(P(Affine, X("x"), name="scale"))
def drop_affine(x, scale):
    """A wrong rule: drops every affine."""
    return x


def test_a_wrong_rule_is_caught_and_named():
    model, x = prepared(RepVGG(4)), torch.randn(1, 4, 5, 5)
    ep = torch.export.export(model, (x,))
    with pytest.raises(VerificationError, match="drop_affine"):
        fuse_exported(ep, extra_rules=[drop_affine], check=False)


def test_training_mode_program_is_refused():
    model, x = RepVGG(4).train(), torch.randn(2, 4, 5, 5)
    ep = torch.export.export(model, (x,))
    with pytest.raises(CaptureError, match="eval mode"):
        fuse_exported(ep)


def test_dynamic_shapes_are_refused():
    model, x = prepared(RepVGG(4)), torch.randn(2, 4, 5, 5)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    with pytest.raises(CaptureError, match="dynamic shapes"):
        fuse_exported(ep)


def test_bad_files(tmp_path):
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a program")
    with pytest.raises(ReparamError, match="not a loadable"):
        load_pt2(junk)
    with pytest.raises(ReparamError, match="no such file"):
        load_pt2(tmp_path / "missing.pt2")
    with pytest.raises(ReparamError, match="ExportedProgram"):
        fuse_exported(nn.Conv2d(1, 1, 1))
