"""One case per built-in rule through both front ends in one call: torch.fx, and the same model exported with
torch.onnx.export and fused by reparam.fuse_onnx (reparam.testing.assert_fires_everywhere). The rule fires as
many times on both, each result is verified, and both reach the same number of convs."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reparam
from reparam.testing import assert_fires_everywhere, randomize_params


class Fn(nn.Module):
    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        for k, m in modules.items():
            setattr(self, k, m)

    def forward(self, x):
        return self.fn(self, x)


def conv(cin=4, cout=4, k=3, **kw):
    return nn.Conv2d(cin, cout, k, padding=kw.pop("padding", k // 2), **kw)


CASES = {
    "identity_elim": (lambda: Fn(lambda s, x: torch.relu(s.c(x) * 1.0), c=conv()), (1, 4, 6, 6), 1),
    "sum_flatten": (lambda: Fn(lambda s, x: (s.a(x) + s.b(x)) + s.c(x), a=conv(), b=conv(), c=conv()),
                    (1, 4, 6, 6), 1),
    "pad_fold": (lambda: Fn(lambda s, x: s.c(F.pad(x, (1, 1, 1, 1))), c=conv(padding=0)), (1, 4, 6, 6), 1),
    "conv_bn_fold": (lambda: nn.Sequential(conv(), nn.BatchNorm2d(4)), (1, 4, 6, 6), 1),
    "affine_before_flatten": (lambda: nn.Sequential(conv(4, 6, 6, padding=0), nn.Flatten(), nn.BatchNorm1d(6)),
                              (2, 4, 6, 6), 1),
    "affine_merge": (lambda: Fn(lambda s, x: s.b2(s.b1(torch.relu(s.c(x)))), c=conv(), b1=nn.BatchNorm2d(4),
                                b2=nn.BatchNorm2d(4)), (1, 4, 6, 6), 1),
    "concat_affine_split": (lambda: Fn(lambda s, x: s.bn(torch.cat([s.a(x), s.b(x)], 1)), a=conv(4, 2), b=conv(4, 3),
                                       bn=nn.BatchNorm2d(5)), (1, 4, 6, 6), 1),
    "scale_fold": (lambda: Fn(lambda s, x: 0.5 * (s.a(x) + s.b(torch.relu(x))), a=conv(), b=conv()),
                   (1, 4, 6, 6), 1),
    "identity_to_conv": (lambda: Fn(lambda s, x: x + s.c(x), c=conv()), (1, 4, 6, 6), 1),
    "avgpool_to_conv": (lambda: Fn(lambda s, x: s.c(x) + s.p(x), c=conv(), p=nn.AvgPool2d(3, 1, 1)),
                        (1, 4, 6, 6), 1),
    "dilated_to_dense": (lambda: Fn(lambda s, x: s.a(x) + s.b(x), a=conv(k=5), b=conv(padding=2, dilation=2)),
                         (1, 4, 9, 9), 1),
    "groups_merge": (lambda: Fn(lambda s, x: s.a(x) + s.b(x), a=conv(), b=conv(groups=4)), (1, 4, 6, 6), 1),
    "serial_into_sibling": (lambda: Fn(lambda s, x: s.b(s.a(x)) + s.c(x), a=conv(4, 2, 1, bias=False),
                                       b=conv(2, 4), c=conv()), (1, 4, 6, 6), 1),
    "parallel_sum_pad": (lambda: Fn(lambda s, x: s.a(x) + s.b(x), a=conv(), b=conv(k=1)), (1, 4, 6, 6), 1),
    "linear_sum": (lambda: Fn(lambda s, x: s.a(x) + s.b(x), a=nn.Linear(8, 3), b=nn.Linear(8, 3)), (2, 8), 1),
    "serial_merge": (lambda: nn.Sequential(conv(4, 8, 1), conv(8, 4, 1)), (1, 4, 6, 6), 1),
    "bn_prefold": (lambda: nn.Sequential(nn.BatchNorm2d(4), conv(k=1)), (1, 4, 6, 6), 1),
    "affine_through_pool": (lambda: nn.Sequential(conv(), nn.ReLU(), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1),
                                                  nn.Flatten(), nn.Linear(4, 3)), (2, 4, 6, 6), 2),
    # F.pad(value=v) after a 1×1 conv whose bias (here the folded + v) is v in every channel: ONNX Pad's constant_value
    "const_pad_commute": (lambda: Fn(lambda s, x: s.b(F.pad(s.a(x) + 0.5, [1] * 4, value=0.5)),
                                     a=conv(k=1, bias=False), b=conv(padding=0)), (1, 4, 6, 6), 1),
    "crop_as_pad": (lambda: Fn(lambda s, x: s.a(x) + s.b(x[:, :, :, 1:-1]), a=conv(padding=0),
                               b=nn.Conv2d(4, 4, (3, 1))), (1, 4, 6, 6), 1),
    "conv_transpose_bn_fold": (lambda: nn.Sequential(nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1),
                                                     nn.BatchNorm2d(4)), (1, 4, 5, 5), 1),
    "parallel_conv_transpose": (lambda: Fn(lambda s, x: s.a(x) + s.b(x), a=nn.ConvTranspose2d(4, 4, 4, 2, 1),
                                           b=nn.ConvTranspose2d(4, 4, 2, 2, 0)), (1, 4, 5, 5), 1),
    # ConvNeXt's Linear over [N, H, W, C] → permute(0, 3, 1, 2) → BatchNorm: on ONNX MatMul + Add → Transpose →
    # BatchNormalization, the Transpose read as Permute
    "affine_through_layout": (lambda: Fn(lambda s, x: s.bn(s.fc(x).permute(0, 3, 1, 2)), fc=nn.Linear(4, 6),
                                         bn=nn.BatchNorm2d(6)), (2, 5, 5, 4), 1),
    # RepMLP's FC with a local conv: Flatten → Gemm → Reshape(-1, C, h, w) beside a Conv of the same input
    "conv_to_dense": (lambda: Fn(lambda s, x: s.fc(x.flatten(1)).reshape(-1, 2, 3, 3) + s.c(x), fc=nn.Linear(18, 18),
                                 c=conv(2, 2)), (2, 2, 3, 3), 1),
    # a BN over the share-sets of an FC's output reshaped to (·, S, h, w): Gemm → Reshape → BatchNormalization
    "affine_through_reshape": (lambda: Fn(lambda s, x: s.bn(s.fc(x).reshape(-1, 2, 3, 3)), fc=nn.Linear(8, 18),
                                          bn=nn.BatchNorm2d(2)), (2, 8), 1),
}
# rules whose ops the ONNX front end does not recognize yet, with the reason
FX_ONLY: dict[str, str] = {}


def test_every_builtin_rule_has_a_parity_case():
    assert set(CASES) | set(FX_ONLY) == {r.name for r in reparam.builtin_rules()}
    assert not set(CASES) & set(FX_ONLY)


@pytest.mark.parametrize("name", sorted(CASES))
def test_parity(name):
    make, shape, times = CASES[name]
    torch.manual_seed(0)
    model = randomize_params(make(), torch.Generator().manual_seed(1)).eval()
    assert_fires_everywhere(name, model, torch.randn(shape), times)
