"""crop_as_pad: a spatial crop before a conv is padding −c, i.e. the conv's kernel zero-extended by the crop, where
the conv does not pad the cropped side; the cropping ACNet block (padding < k//2) reaches one conv. Property tests
in float64 through both captures (symbolic torch.fx and the concrete ATen capture); traps refused, never wrong."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from examples.authors.blocks import ACBlock
from reparam.testing import assert_equivalent, assert_refuses, count_ops, randomize_params

RTOL = 1e-9


def build(module: nn.Module, seed: int) -> nn.Module:
    return randomize_params(module, torch.Generator().manual_seed(seed)).double().eval()


def fired(report, rule: str) -> int:
    return report.fired_counts().get(rule, 0)


@given(st.sampled_from([3, 5, 7]), st.data(), st.sampled_from([1, 2]), st.sampled_from([1, 2]), st.integers(0, 2 ** 16))
def test_property(k, data, stride, groups, seed):
    """ACNet with every padding below k//2 (so it crops): one k×k conv, exactly."""
    padding = data.draw(st.integers(0, k // 2 - 1))
    c = 2 * groups
    model = build(ACBlock(c, c, k, stride, padding, groups), seed)
    size = data.draw(st.integers(k, k + 4))
    fused, report = assert_equivalent(model, (torch.randn(2, c, size, size + 1, dtype=torch.float64),), rtol=RTOL)
    assert fired(report, "crop_as_pad") == 2, report.summary()
    n = count_ops(fused)
    assert n["convs"] == 1 and n["bns"] == 0 and n["ops"] == 1, report.summary()
    conv = next(m for m in fused.modules() if isinstance(m, nn.Conv2d))
    assert conv.kernel_size == (k, k) and conv.padding == (padding, padding)


def test_acnet_without_crop_is_unchanged_by_the_rule():
    model = build(ACBlock(4, 4, 3, padding=1), 0)
    fused, report = assert_equivalent(model, (torch.randn(1, 4, 6, 6, dtype=torch.float64),), rtol=RTOL)
    assert fired(report, "crop_as_pad") == 0 and count_ops(fused)["convs"] == 1


def test_a_crop_of_two_axes_through_the_concrete_capture():
    """x[:, :, 1:-1, 2:-2] (one getitem of two axes) beside a conv of x: the ATen capture gives two slices."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 3, 5), nn.Conv2d(3, 3, (3, 1))

        def forward(self, x):
            y = x.clone()
            y[:, :1] *= 1.0  # an index write: symbolic tracing fails, the concrete capture takes over
            return self.a(y) + self.b(y[:, :, 1:-1, 2:-2])

    fused, report = assert_equivalent(build(Block(), 1), (torch.randn(1, 3, 9, 9, dtype=torch.float64),), rtol=RTOL)
    assert fired(report, "crop_as_pad") == 1 and count_ops(fused)["convs"] == 1, report.summary()


# ----------------------------------------------------------------------------------------------------- traps
class CropThenPad(nn.Module):
    """A crop c followed by a conv padding p > 0 on the same side: [0]*p + x[c:] is not a conv of x."""

    def __init__(self, c=1, p=1):
        super().__init__()
        self.c = c
        self.a, self.b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, (3, 1), padding=(1, p))

    def forward(self, x):
        return self.a(x) + self.b(x[:, :, :, self.c:-self.c])


def test_trap_a_crop_the_conv_pads_again_is_refused():
    x = (torch.randn(1, 3, 7, 7, dtype=torch.float64),)
    fused, report = assert_refuses("crop_as_pad", build(CropThenPad(1, 1), 0), x, "pads axis 3")
    assert count_ops(fused)["convs"] == 2


@pytest.mark.parametrize("case", ["dilation", "misaligned"])
def test_trap_what_it_cannot_line_up_is_refused(case):
    """A crop that is not a whole number of dilated taps; a crop that leaves the conv's window off its sibling's
    (equal output sizes at this input size only)."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            if case == "dilation":
                self.a, self.b = nn.Conv2d(3, 3, 5), nn.Conv2d(3, 3, (5, 2), dilation=(1, 2))
            else:
                self.a, self.b = nn.Conv2d(3, 3, 5, stride=2), nn.Conv2d(3, 3, (5, 3), stride=2)

        def forward(self, x):
            return self.a(x) + self.b(x[:, :, :, 1:-1] if case == "dilation" else x[:, :, :, 1:])

    x = (torch.randn(1, 3, 9, 9, dtype=torch.float64),)
    fused, _ = assert_refuses("crop_as_pad", build(Block(), 0), x, "dilation" if case == "dilation" else "line up")
    assert count_ops(fused)["convs"] == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_acnet_network_keeps_its_dtype(dtype):
    """Three cropping ACNet blocks (examples.authors.blocks.acnet_net) in fp32 / fp16 / bf16: three convs in that
    dtype, verified."""
    import reparam
    from examples.authors.blocks import acnet_net

    model = randomize_params(acnet_net(8), torch.Generator().manual_seed(0)).eval().to(dtype)
    x = torch.randn(1, 3, 16, 16).to(dtype)
    fused, report = reparam.fuse(model, x, report=True)
    assert count_ops(fused)["convs"] == 3 and report.verification.passed, report.summary()
    assert {p.dtype for p in fused.parameters()} == {dtype} and fused(x).dtype == dtype
