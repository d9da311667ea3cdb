"""RepNeXt M0–M5 through ``reparam.fuse``: exact deploy structure, parameter counts, equivalence.

The expected deploy graph is derived from each variant's config (channels, depths), not from the fused model:
  stem                      2 dense 3×3 stride-2 convs
  per MetaNeXt block (C)    dw 3×3 (RepDWConvS), dw 7×7 (RepDWConvM), dw 1×11 and dw 11×1 (the L branch, which
                            is not exactly one conv and must stay two), 1×1 C→2C and 1×1 2C→C (the Mlp
                            ConvNorms; the token mixer's BN folded into the first)
  per Downsample (C → 2C)   dw 3×3 stride 2 and dw 7×7 stride 2 on C (the BN after the concat folded into
                            both), 1×1 2C→4C and 1×1 4C→2C
  heads                     one Linear; no BatchNorm anywhere.
M0 and M1 are fused at 224×224 in float32 and float64; M2–M5 at 64×64 (the structure does not depend on
the resolution; the fuse is still verified end to end in float64).
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import reparam
from reparam.frontends.fx.dropin import forward_graph
from examples.repnext.measure import build, fp64_reference, relative_error
from examples.repnext.model import REPNEXT_CONFIGS, MetaNeXtBlock
from reparam.frontends.fx.counting import count_model

# Deploy parameter counts of the authors' hand-written fusion (1000 classes).
AUTHORS_DEPLOY_PARAMS = {"m0": 2.33e6, "m1": 4.83e6, "m2": 6.47e6, "m3": 7.82e6, "m4": 13.34e6, "m5": 21.74e6}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _conv(k, cin, cout, groups, stride, padding):
    return ("conv", k, cin, cout, groups, stride, padding)


def expected_layers(variant: str, num_classes: int = 1000, in_chans: int = 3) -> Counter:
    """The deploy layers of a variant, as a multiset of (kind, kernel, in, out, groups, stride, padding)."""
    cfg = REPNEXT_CONFIGS[f"repnext_{variant}"]
    dims, depths = cfg["embed_dims"], cfg["depths"]
    want = Counter()
    want[_conv((3, 3), in_chans, dims[0] // 2, 1, (2, 2), (1, 1))] += 1
    want[_conv((3, 3), dims[0] // 2, dims[0], 1, (2, 2), (1, 1))] += 1
    for i, (c, depth) in enumerate(zip(dims, depths)):
        if i > 0:
            p = dims[i - 1]
            want[_conv((3, 3), p, p, p, (2, 2), (1, 1))] += 1
            want[_conv((7, 7), p, p, p, (2, 2), (3, 3))] += 1
            want[_conv((1, 1), 2 * p, 4 * p, 1, (1, 1), (0, 0))] += 1
            want[_conv((1, 1), 4 * p, 2 * p, 1, (1, 1), (0, 0))] += 1
        q = c // 4
        want[_conv((3, 3), q, q, q, (1, 1), (1, 1))] += depth
        want[_conv((7, 7), q, q, q, (1, 1), (3, 3))] += depth
        want[_conv((1, 11), q, q, q, (1, 1), (0, 5))] += depth
        want[_conv((11, 1), q, q, q, (1, 1), (5, 0))] += depth
        want[_conv((1, 1), c, 2 * c, 1, (1, 1), (0, 0))] += depth
        want[_conv((1, 1), 2 * c, c, 1, (1, 1), (0, 0))] += depth
    want[("linear", dims[-1], num_classes)] += 1
    return want


def called_layers(gm: fx.GraphModule) -> Counter:
    """The Conv2d / Linear / BatchNorm modules the fused graph calls, with their geometry (recursing into
    nested GraphModules)."""
    got = Counter()
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = modules[node.target]
        if isinstance(m, fx.GraphModule):
            got += called_layers(m)
        elif isinstance(m, nn.Conv2d):
            assert m.dilation == (1, 1) and m.padding_mode == "zeros", node.target
            got[_conv(m.kernel_size, m.in_channels, m.out_channels, m.groups, m.stride, m.padding)] += 1
        elif isinstance(m, nn.Linear):
            got[("linear", m.in_features, m.out_features)] += 1
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            got[("batchnorm", m.num_features)] += 1
    return got


def check_structure(variant: str, fused: nn.Module) -> None:
    want = expected_layers(variant)
    assert isinstance(fused, nn.Module) and not isinstance(fused, fx.GraphModule)  # a drop-in of its class
    got = called_layers(forward_graph(fused))
    assert got == want, f"missing: {dict(want - got)}; unexpected: {dict(got - want)}"
    counts = count_model(fused)  # also counts functional conv / batch_norm / linear calls
    n_convs = sum(n for key, n in want.items() if key[0] == "conv")
    assert (counts.convs, counts.bns, counts.linears) == (n_convs, 0, 1)


def check_refused_l_branch(model: nn.Module, report) -> None:
    """Every MetaNeXt block's 1×11 → 11×1 pair (both with bias, zero padding) is reported as refused."""
    blocks = {name for name, m in model.named_modules() if isinstance(m, MetaNeXtBlock)}
    refused = {r["where"].split(".token_mixer.conv_l.")[0] for r in report.refusals
               if ".token_mixer.conv_l." in r["where"]}
    assert refused == blocks


def test_expected_layers_m0_is_98_convs_and_one_linear():
    want = expected_layers("m0")
    assert sum(n for key, n in want.items() if key[0] == "conv") == 98
    assert sum(n for key, n in want.items() if key[0] == "linear") == 1


@pytest.mark.parametrize("variant", ["m0", "m1"])
def test_full_size_float32(variant):
    model = build(variant, seed=1)
    x = torch.randn(1, 3, 224, 224)
    fused, report = reparam.fuse(model, x, report=True)
    check_structure(variant, fused)
    check_refused_l_branch(model, report)
    assert report.after.params <= AUTHORS_DEPLOY_PARAMS[variant]
    assert report.after.bns == 0 and report.before.bns > 0
    assert report.verification.passed and report.verification.error_fp64 <= 1e-10

    probe = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    want = fp64_reference(model, probe)
    with torch.no_grad():
        got = fused(probe)
    assert got.dtype == torch.float32
    assert relative_error(got, want) <= 1e-5


@pytest.mark.parametrize("variant", ["m0", "m1"])
def test_full_size_float64(variant):
    model = build(variant, seed=2).double()
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    fused = reparam.fuse(model, x, verify=False)  # the comparison below is the verification
    check_structure(variant, fused)
    assert all(p.dtype == torch.float64 for p in fused.parameters())

    probe = torch.randn(2, 3, 224, 224, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert relative_error(fused(probe), model(probe)) <= 1e-10


@pytest.mark.parametrize("variant", ["m2", "m3", "m4", "m5"])
def test_reduced_resolution(variant):
    model = build(variant, seed=3)
    x = torch.randn(1, 3, 64, 64)
    fused, report = reparam.fuse(model, x, report=True)
    check_structure(variant, fused)
    check_refused_l_branch(model, report)
    assert report.after.params <= AUTHORS_DEPLOY_PARAMS[variant]
    assert report.verification.passed and report.verification.error_fp64 <= 1e-10

    probe = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = fused(probe)
    assert relative_error(got, fp64_reference(model, probe)) <= 1e-5


def test_structure_check_rejects_the_training_graph():
    """The structural oracle is not vacuous: the traced training-time model (BNs, branches) fails it."""
    with pytest.raises(AssertionError):
        check_structure("m0", fx.symbolic_trace(build("m0")))
