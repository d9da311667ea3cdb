"""const_pad_commute and the ChannelPad op kind: per-channel constant padding (F.pad(value=v), or a zero pad whose
border is overwritten by index writes of constants) moved before the 1×1 conv (or affine) whose response to a zero
input it equals; DBB's 1×1 → BN → pad-with-the-BN-bias → k×k branch, and the whole DBB block, then reach one k×k
conv. Property tests in float64, traps (pad values that are not the bias) refused, never wrong."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from examples.authors.blocks import BNAndPad, DiverseBranchBlock, border_write, bn_shift
from reparam.testing import assert_equivalent, assert_refuses, count_ops, randomize_params

RTOL = 1e-9


def build(module: nn.Module, seed: int) -> nn.Module:
    return randomize_params(module, torch.Generator().manual_seed(seed)).double().eval()


def fired(report, rule: str) -> int:
    return report.fired_counts().get(rule, 0)


# ------------------------------------------------------------------------------------------------- property
@given(st.data())
def test_property(data):
    """1×1 conv (any groups, bias or not) → BN → pad p with the BN's zero response, written as four border writes
    or, for a scalar, as F.pad(value=v) → k×k conv (no padding) → BN: one k×k conv, padding p."""
    groups = data.draw(st.sampled_from([1, 2]))
    cin, cout = (groups * data.draw(st.integers(1, 3)) for _ in range(2))
    mid = cin + groups * data.draw(st.integers(0, 2))  # not narrower than the input: the merged conv is not costlier
    k, p = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 2))
    how = data.draw(st.sampled_from(["border writes", "F.pad value"]))
    size = data.draw(st.integers(max(1, k - 2 * p), 7))

    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(cin, mid, 1, groups=groups, bias=data.draw(st.booleans()))
            self.bn1 = nn.BatchNorm2d(mid)
            self.c2 = nn.Conv2d(mid, cout, k, groups=groups, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)

        def forward(self, x):
            y = self.bn1(self.c1(x))
            b = self.c1.bias if self.c1.bias is not None else torch.zeros_like(self.bn1.running_mean)
            s1 = self.bn1.weight.detach() / torch.sqrt(self.bn1.running_var + self.bn1.eps)
            zero = bn_shift(self.bn1) + b.detach() * s1  # what the branch gives for a zero input
            if how == "F.pad value":
                y = F.pad(y - zero.view(1, -1, 1, 1) + 0.25, [p] * 4, value=0.25)  # one value: shift it to 0.25
            else:
                y = border_write(y, p, zero)
            return self.bn2(self.c2(y))

    model = build(Branch(), data.draw(st.integers(0, 2 ** 16)))
    x = torch.randn(2, cin, size, size, dtype=torch.float64)
    fused, report = assert_equivalent(model, (x,), rtol=RTOL)
    assert fired(report, "const_pad_commute") == 1, report.summary()
    n = count_ops(fused)
    assert n["convs"] == 1 and n["bns"] == 0, report.summary()


@given(st.integers(1, 2), st.sampled_from([1, 2]), st.sampled_from([3, 5]), st.integers(0, 2 ** 16))
def test_dbb_block_reaches_one_kxk_conv(cout_factor, groups, k, seed):
    """DBB written as its authors do (border writes of the BN's zero response, an identity-based 1×1 built in
    forward, in-place adds): one k×k conv, as the authors' own conversion reaches."""
    c = 2 * groups
    model = build(DiverseBranchBlock(c, c * cout_factor, k, groups=groups), seed)
    x = torch.randn(2, c, 8, 8, dtype=torch.float64)
    fused, report = assert_equivalent(model, (x,), rtol=RTOL)
    assert fired(report, "const_pad_commute") == 2, report.summary()
    n = count_ops(fused)
    assert n["convs"] == 1 and n["bns"] == 0 and n["ops"] == 1, report.summary()
    conv = next(m for m in fused.modules() if isinstance(m, nn.Conv2d))
    assert conv.kernel_size == (k, k) and conv.padding == (k // 2, k // 2) and conv.groups == groups


def test_dbb_block_with_a_wider_internal_1x1():
    model = build(DiverseBranchBlock(4, 6, 3, internal=8), 3)
    fused, report = assert_equivalent(model, (torch.randn(1, 4, 7, 7, dtype=torch.float64),), rtol=RTOL)
    assert count_ops(fused)["convs"] == 1, report.summary()


def test_per_channel_pad_of_an_input_commutes_with_its_affine():
    """BN(x) padded with the BN's shift is BN(zero-pad(x)): the pad moves before the affine (no conv to fold)."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = BNAndPad(3, 1)

        def forward(self, x):
            return torch.relu(self.bn(x))

    fused, report = assert_equivalent(build(Block(), 0), (torch.randn(1, 3, 5, 5, dtype=torch.float64),), rtol=RTOL)
    assert fired(report, "const_pad_commute") == 1, report.summary()


# ----------------------------------------------------------------------------------------------------- traps
def test_trap_values_that_are_not_the_bias_are_refused():
    """Padding with the BN's β (not its zero response β − μγ/√(σ²+ε)), or with the response of a k×k conv, or
    after a strided 1×1: not what the conv gives for a zero input; refused with a reason, the result still exact."""
    model = build(DiverseBranchBlock(4, 4, 3), 1)
    for branch in (model.dbb_avg.bn, model.dbb_1x1_kxk.bn1):
        branch.values = lambda bn: bn.bias.detach()
    x = (torch.randn(1, 4, 8, 8, dtype=torch.float64),)
    fused, report = assert_refuses("const_pad_commute", model, x, "differ from")
    assert count_ops(fused)["convs"] > 1

    class Strided(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(4, 4, 1, stride=2), nn.Conv2d(4, 4, 3)

        def forward(self, x):
            return self.c2(border_write(self.c1(x), 1, self.c1.bias.detach()))

    assert_refuses("const_pad_commute", build(Strided(), 2), x, "stride")

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)

        def forward(self, x):
            return self.c2(border_write(self.c1(x), 1, self.c1.bias.detach()))

    assert_refuses("const_pad_commute", build(Wide(), 3), x, "not 1×1")


def test_trap_border_writes_that_are_not_a_pad_stay_as_they_are():
    """A write into the input's own positions, or a side given another value after the four border writes: the
    extra write is not part of a ChannelPad (it stays opaque, on top of the pad the four writes make), and the
    branch stays two convs, exactly as it computes."""
    class Inside(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 3)

        def forward(self, x):
            y = border_write(self.c1(x), 1, self.c1.bias.detach())
            y[:, :, 2:3, :] = 0.0  # inside: a real change of the values
            return self.c2(y)

    class Sides(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 3)

        def forward(self, x):
            y = border_write(self.c1(x), 1, self.c1.bias.detach())
            y[:, :, :, 0:1] = 0.5  # one side differs
            return self.c2(y)

    for cls in (Inside, Sides):
        fused, report = assert_equivalent(build(cls(), 0), (torch.randn(1, 3, 6, 6, dtype=torch.float64),), rtol=RTOL)
        assert count_ops(fused)["convs"] == 2, report.summary()


def test_trap_unequal_sides_are_not_a_channel_pad():
    """Each side written with its own value: no single value per channel, so no ChannelPad (nothing commutes)."""
    class Sides(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 3)

        def forward(self, x):
            y = F.pad(self.c1(x), [1] * 4)
            y[:, :, 0:1, :] = self.c1.bias.detach().view(1, -1, 1, 1)
            y[:, :, :, -1:] = 0.5
            return self.c2(y)

    fused, report = assert_equivalent(build(Sides(), 0), (torch.randn(1, 3, 6, 6, dtype=torch.float64),), rtol=RTOL)
    assert fired(report, "const_pad_commute") == 0 and count_ops(fused)["convs"] == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dbb_network_keeps_its_dtype(dtype):
    """Three DBB blocks (examples.authors.blocks.dbb_net) in fp32 / fp16 / bf16: three convs in that dtype, verified."""
    import reparam
    from examples.authors.blocks import dbb_net

    model = randomize_params(dbb_net(8), torch.Generator().manual_seed(0)).eval().to(dtype)
    x = torch.randn(1, 3, 16, 16).to(dtype)
    fused, report = reparam.fuse(model, x, report=True)
    assert count_ops(fused)["convs"] == 3 and report.verification.passed, report.summary()
    assert {p.dtype for p in fused.parameters()} == {dtype} and fused(x).dtype == dtype
