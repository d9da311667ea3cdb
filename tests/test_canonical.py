"""Canonicalizing rules: scaled nested sums flatten so that branches of one input meet and fuse."""
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import reparam
from reparam.testing import randomize_bn


class ScaledNested(nn.Module):
    def __init__(self, c, k, alpha, beta):
        super().__init__()
        self.conv = nn.Conv2d(c, c, k, 1, k // 2)
        self.bn = nn.BatchNorm2d(c)
        self.alpha, self.beta = alpha, beta

    def forward(self, x):
        return self.conv(x) + self.alpha * (x - self.beta * (self.bn(x) + x))


@given(c=st.integers(1, 6), k=st.sampled_from([1, 3, 5]), alpha=st.floats(-2, 2).filter(lambda a: abs(a) > 1e-3),
       beta=st.floats(-2, 2), seed=st.integers(0, 2**16))
def test_scaled_nested_sums_fuse_to_one_conv(c, k, alpha, beta, seed):
    model = ScaledNested(c, k, alpha, beta)
    randomize_bn(model, torch.Generator().manual_seed(seed))
    model = model.double().eval()
    x = torch.randn(2, c, 7, 6, dtype=torch.float64)
    fused, rep = reparam.fuse(model, x, report=True)
    assert rep.fired_counts().get("sum_flatten", 0) >= 1
    assert rep.after.convs == 1 and rep.after.bns == 0, fused.graph
    assert rep.verification.error_fp64 <= 1e-9
    torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-10)


def test_shifted_affine_of_a_sum_is_not_flattened():
    """(y + z)·α + t is not Σ of scaled terms: the shift must not be distributed to both."""
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, 1, 1)

        def forward(self, x):
            return self.conv(x) + ((x + x) * 0.5 + 1.0)

    model = Shifted().double().eval()
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    fused, rep = reparam.fuse(model, x, report=True)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)


def test_python_float_constants_keep_double_precision():
    """``x * 0.1`` holds the double 0.1: read as float32 it would be off by 1e-9 relative, which the float64
    verification of a float32 model then (rightly) rejects."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, 1, 1)

        def forward(self, x):
            return self.conv(x) * 0.1 + x / 3.0 - 0.7 * x

    model = Scaled().eval()
    x = torch.randn(1, 4, 8, 8)
    fused, rep = reparam.fuse(model, x, report=True)
    assert rep.after.convs == 1 and rep.verification.error_fp64 <= 1e-12
