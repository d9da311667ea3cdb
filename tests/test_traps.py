"""Negative tests: every trap of transforms.md is refused (or handled exactly), with a reason in the report.

Each trap checks that the fused model equals the original in float64, that the report names why the
tempting rewrite was not done, that the structure stayed as it must, and that the input model
(parameters, buffers, training flag) is untouched by fuse.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import reparam
from reparam.frontends.fx.dropin import forward_graph


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(n, generator=gen))
                    m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=gen))
    return model


def kinds(gm: nn.Module, kind) -> int:
    gm = forward_graph(gm)
    mods = dict(gm.named_modules())
    return sum(n.op == "call_module" and isinstance(mods[n.target], kind) for n in gm.graph.nodes)


def outputs(model, x):
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, tuple) else (out,)


def fuse_trap(model: nn.Module, x: torch.Tensor, *, eval_mode: bool = True):
    """Fuse a float64 copy of the trap; check exactness and that the input model is untouched."""
    model = randomize(model).double()
    if eval_mode:
        model.eval()
    training = model.training
    before = copy.deepcopy(model.state_dict())
    x = x.double()
    fused, report = reparam.fuse(model, x, report=True)
    assert model.training == training
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "fuse modified the input model"
    reference = copy.deepcopy(model).eval()
    for got, want in zip(outputs(fused, x), outputs(reference, x), strict=True):
        assert got.shape == want.shape
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-12
    return fused, report


def refused(report, rule: str, *words: str) -> dict:
    """The refusal of ``rule`` whose reason contains every word."""
    for r in report.refusals:
        if r["rule"] == rule and all(w in r["detail"] for w in words):
            return r
    raise AssertionError(f"no refusal of {rule} mentioning {words}: {report.refusals}")


class Separable(nn.Module):
    """RepNeXt's 1×11 (with bias) → 11×1 (zero-padded), optionally beside an 11×11 depthwise conv of x."""

    def __init__(self, bias=True, sibling=False):
        super().__init__()
        self.row = nn.Conv2d(4, 4, (1, 11), padding=(0, 5), groups=4, bias=bias)
        self.col = nn.Conv2d(4, 4, (11, 1), padding=(5, 0), groups=4, bias=False)
        self.square = nn.Conv2d(4, 4, 11, padding=5, groups=4) if sibling else None

    def forward(self, x):
        y = self.col(self.row(x))
        return y if self.square is None else y + self.square(x)


@pytest.mark.parametrize("sibling", [False, True])
def test_separable_with_bias_stays_two_convs(sibling):
    fused, report = fuse_trap(Separable(bias=True, sibling=sibling), torch.randn(1, 4, 12, 12))
    assert kinds(fused, nn.Conv2d) == 2 + sibling
    refused(report, "serial_merge", "bias")
    assert "serial_merge" not in report.fired_counts()


def test_separable_without_bias_merges():
    """The control: without the bias the chain is exactly an 11×11 depthwise conv, absorbed by its sibling."""
    fused, report = fuse_trap(Separable(bias=False, sibling=True), torch.randn(1, 4, 12, 12))
    assert kinds(fused, nn.Conv2d) == 1
    assert report.fired_counts().get("serial_into_sibling") == 1


class OneBnPadded(nn.Module):
    """Naive DBB: 1×1 (bias) → BN → 3×3 with zero padding."""

    def __init__(self, bias=True):
        super().__init__()
        self.one = nn.Conv2d(4, 6, 1, bias=bias)
        self.bn = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(self.bn(self.one(x)))


def test_one_bias_bn_padded_not_merged():
    fused, report = fuse_trap(OneBnPadded(), torch.randn(1, 4, 8, 8))
    assert kinds(fused, nn.Conv2d) == 2
    assert kinds(fused, nn.BatchNorm2d) == 0  # the BN itself folds backwards into the 1×1
    refused(report, "serial_merge", "bias")


def test_one_bn_padded_without_bias_still_not_merged():
    """The BN shift becomes a bias of the 1×1, so the chain is not one conv either."""
    fused, report = fuse_trap(OneBnPadded(bias=False), torch.randn(1, 4, 8, 8))
    assert kinds(fused, nn.Conv2d) == 2
    refused(report, "serial_merge", "bias")


class BnPadded(nn.Module):
    def __init__(self, k=3, padding=1):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 6, k, padding=padding)

    def forward(self, x):
        return self.conv(self.bn(x))


def test_bn_before_padded_conv_not_prefolded():
    fused, report = fuse_trap(BnPadded(), torch.randn(1, 4, 8, 8))
    assert kinds(fused, nn.BatchNorm2d) == 1 and kinds(fused, nn.Conv2d) == 1
    refused(report, "bn_prefold", "pad")


def test_bn_before_unpadded_conv_prefolds():
    """The control: the same BN before an unpadded 3×3 folds."""
    fused, report = fuse_trap(BnPadded(padding=0), torch.randn(1, 4, 8, 8))
    assert kinds(fused, nn.BatchNorm2d) == 0 and kinds(fused, nn.Conv2d) == 1
    assert report.fired_counts().get("bn_prefold") == 1


class BnPaddedPool(nn.Module):
    """A BN shift before a zero-padded AvgPool (then a 1×1): the border averages see 0, not t."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AvgPool2d(3, 1, 1)
        self.conv = nn.Conv2d(4, 6, 1)

    def forward(self, x):
        return self.conv(self.pool(self.bn(x)))


def test_bn_before_padded_pool_not_prefolded():
    fused, report = fuse_trap(BnPaddedPool(), torch.randn(1, 4, 8, 8))
    assert kinds(fused, nn.BatchNorm2d) == 1
    refused(report, "bn_prefold", "pad")


class SecondConsumer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y), torch.relu(y)


def test_conv_with_second_consumer_not_folded():
    model = randomize(SecondConsumer()).double().eval()
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    fused, report = fuse_trap(model, x)
    assert kinds(fused, nn.BatchNorm2d) == 1
    refused(report, "conv_bn_fold", "also used by")
    with torch.no_grad():  # the other consumer sees the unfolded conv output
        assert torch.equal(fused(x)[1], torch.relu(model.conv(x)))


class Tied(nn.Module):
    """One conv module called twice; a BN after the second call only, or after both."""

    def __init__(self, both=False):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4) if both else nn.Identity()
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn1(self.conv(x))
        return self.bn2(self.conv(torch.relu(y))), y


def test_tied_conv_second_call_folded_first_untouched():
    model = randomize(Tied()).double().eval()
    weight = model.conv.weight.detach().clone()
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    fused, report = fuse_trap(model, x)
    assert report.fired_counts().get("conv_bn_fold") == 1
    assert torch.equal(model.conv.weight, weight)
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2 and kinds(fused, nn.BatchNorm2d) == 0
    # the first call site still holds the original weights; the folded one holds new ones
    assert sum(torch.equal(c.weight, weight) for c in convs) == 1
    assert all(c.weight.data_ptr() != model.conv.weight.data_ptr() for c in convs)


def test_tied_conv_both_calls_folded():
    fused, report = fuse_trap(Tied(both=True), torch.randn(1, 4, 8, 8))
    assert report.fired_counts().get("conv_bn_fold") == 2
    assert kinds(fused, nn.BatchNorm2d) == 0 and kinds(fused, nn.Conv2d) == 2


class NoStats(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_bn_without_running_stats_left_as_is():
    fused, report = fuse_trap(NoStats(), torch.randn(3, 4, 8, 8))
    assert kinds(fused, nn.BatchNorm2d) == 1
    assert "conv_bn_fold" not in report.fired_counts()
    assert any("running statistics" in n for n in report.notes) or report.refusals, report.summary()


class Training(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.bn(self.conv(x)))


def test_training_mode_noted_and_input_untouched():
    model = randomize(Training()).double().train()
    bn_before = model.bn.num_batches_tracked.clone()
    fused, report = fuse_trap(model, torch.randn(2, 4, 8, 8), eval_mode=False)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model.bn.num_batches_tracked, bn_before)
    assert any("training mode" in n for n in report.notes)
    assert not fused.training
    assert kinds(fused, nn.BatchNorm2d) == 0 and kinds(fused, nn.Dropout) == 0


class MixedModes(nn.Module):
    def __init__(self):
        super().__init__()
        self.zeros = nn.Conv2d(4, 4, 3, padding=1)
        self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")

    def forward(self, x):
        return self.zeros(x) + self.reflect(x)


def test_mixed_padding_modes_not_merged():
    fused, report = fuse_trap(MixedModes(), torch.randn(1, 4, 8, 8))
    assert kinds(fused, nn.Conv2d) == 2
    refused(report, "parallel_sum_pad", "padding mode")


class Misaligned(nn.Module):
    """3×3 p0 + 1×1 p0: on a 3×3 input the 1×1 output broadcasts against the 3×3 one; never one conv."""

    def __init__(self):
        super().__init__()
        self.big = nn.Conv2d(4, 4, 3)
        self.small = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.big(x) + self.small(x)


def test_misaligned_branches_not_merged():
    fused, report = fuse_trap(Misaligned(), torch.randn(1, 4, 3, 3))
    assert kinds(fused, nn.Conv2d) == 2
    refused(report, "parallel_sum_pad", "misaligned")


class ShiftedPad(nn.Module):
    """3×3 p0 on F.pad(x, (2, 0, 2, 0)) + 1×1 p0 on x: equal slack, so one conv with padding (2, 0)."""

    def __init__(self):
        super().__init__()
        self.big = nn.Conv2d(4, 4, 3)
        self.small = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.big(nn.functional.pad(x, (2, 0, 2, 0))) + self.small(x)


def test_asymmetric_pad_alignment_merges():
    """The control for the misaligned trap: an explicit asymmetric F.pad makes the branches mergeable."""
    fused, report = fuse_trap(ShiftedPad(), torch.randn(1, 4, 7, 7))
    assert kinds(fused, nn.Conv2d) == 1
    assert report.fired_counts().get("pad_fold") and report.fired_counts().get("parallel_sum_pad")
