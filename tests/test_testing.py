"""The testing kit itself: its strategies build valid models, its assertions pass and fail when they should."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings

from reparam.testing import (BN, assert_equivalent, assert_fires, assert_refuses, bn_stats, conv_specs,
                             count_ops, linear_blocks, randomize_bn, set_bn_stats)


@settings(max_examples=8)
@given(conv_specs(nd=2))
def test_conv_specs_build_runnable_convs_and_bn_folds_into_them(spec):
    model = randomize_bn(nn.Sequential(spec.module(), BN[2](spec.out_channels)))
    fused, _ = assert_fires("conv_bn_fold", model, spec.example_input(), times=1)
    assert count_ops(fused)["convs"] == 1 and count_ops(fused)["bns"] == 0


@settings(max_examples=10)
@given(conv_specs(nd=1, groups="depthwise", padding="same", strides=(1,)))
def test_conv_specs_honour_their_options(spec):
    assert spec.groups == spec.in_channels == spec.out_channels
    assert all(lo + hi == e - 1 for (lo, hi), e in zip(spec.padding, spec.extent))
    x = spec.example_input()
    assert spec.module().double()(x).shape == x.shape


@pytest.mark.parametrize("nd, examples", [(1, 3), (2, 6), (3, 3)])
def test_linear_blocks_fuse_to_their_minimal_conv_count(nd, examples):
    settings(max_examples=examples)(given(linear_blocks(nd=nd, max_channels=4 if nd == 3 else 6))(
        _fuses_to_min_convs))()


def _fuses_to_min_convs(case):
    fused, _ = assert_equivalent(case.module, case.inputs)
    counts = count_ops(fused)
    assert (counts["convs"], counts["bns"]) == (case.min_convs, 0), case


@settings(max_examples=5)
@given(bn_stats(3))
def test_bn_stats_are_valid_inference_statistics(stats):
    assert bool((stats["running_var"] > 0).all()) and all(t.shape == (3,) for t in stats.values())
    model = nn.Sequential(nn.Conv1d(2, 3, 3), set_bn_stats(BN[1](3), stats))
    assert_fires("conv_bn_fold", model, torch.randn(2, 2, 9), times=1)


def test_assertions_fail_loudly():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 9, 9)
    model = randomize_bn(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)))
    with pytest.raises(AssertionError, match="fired 1 time"):
        assert_fires("conv_bn_fold", model, x, times=2)
    with pytest.raises(AssertionError, match="not among the rules"):
        assert_fires("no_such_rule", model, x)
    with pytest.raises(AssertionError, match="refused nothing"):
        assert_refuses("conv_bn_fold", model, x)
    # RepNeXt's trap: 1×5 with bias, then a zero-padded 5×1: not one conv at the borders
    trap = nn.Sequential(nn.Conv2d(4, 4, (1, 5), padding=(0, 2)), nn.Conv2d(4, 4, (5, 1), padding=(2, 0)))
    fused, _ = assert_refuses("serial_merge", trap, x, reason_contains="bias")
    assert count_ops(fused)["convs"] == 2
    with pytest.raises(AssertionError, match="no reason contains"):
        assert_refuses("serial_merge", trap, x, reason_contains="dilation")
