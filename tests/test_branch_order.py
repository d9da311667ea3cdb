"""The result of fusing does not depend on the order in which a forward writes its branches.

The engine keeps every phase at its fixpoint before a later one acts, and revisits what a rewrite touches, so
a sibling's BatchNorm is folded before any sum-level rule looks at it, whichever term comes first. Property:
over permutations of a sum's terms, several block kinds fuse to the same number of convs (one, for these
blocks), equivalent in float64.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from reparam.testing import assert_equivalent, count_ops, randomize_bn


class Branches(nn.Module):
    """Σ branchᵢ(x), written in ``order``."""

    def __init__(self, branches: list[nn.Module], order: list[int]):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.order = list(order)

    def forward(self, x):
        y = self.branches[self.order[0]](x)
        for k in self.order[1:]:
            y = y + self.branches[k](x)
        return y


def conv_bn(cin, cout, k, padding, bias=False):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=padding, bias=bias), nn.BatchNorm2d(cout))


BLOCKS = {
    # 1×1 (8→2, no bias) → 3×3 beside a 3×3 → BN: the composite is covered by the sibling's 3×3
    "bottleneck": lambda: [nn.Sequential(nn.Conv2d(8, 2, 1, bias=False), nn.Conv2d(2, 8, 3, padding=1)),
                           conv_bn(8, 8, 3, 1)],
    "repvgg": lambda: [conv_bn(8, 8, 3, 1), conv_bn(8, 8, 1, 0), nn.BatchNorm2d(8)],
    "acnet": lambda: [conv_bn(8, 8, 3, 1), conv_bn(8, 8, (1, 3), (0, 1)), conv_bn(8, 8, (3, 1), (1, 0))],
    "dbb": lambda: [conv_bn(8, 8, 3, 1), conv_bn(8, 8, 1, 0),
                    nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.AvgPool2d(3, 1, 1), nn.BatchNorm2d(8)),
                    nn.Sequential(nn.Conv2d(8, 4, 1, bias=False), nn.Conv2d(4, 8, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(8))],
    "dilated": lambda: [conv_bn(8, 8, 5, 2), nn.Sequential(nn.Conv2d(8, 8, 3, padding=2, dilation=2),
                                                           nn.BatchNorm2d(8))],
}


def _fused_convs(name: str, order: list[int], seed: int) -> int:
    torch.manual_seed(seed)
    model = randomize_bn(Branches(BLOCKS[name](), order)).eval()
    fused, report = assert_equivalent(model, torch.randn(2, 8, 7, 7), rtol=1e-9)
    return count_ops(fused)["convs"]


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(sorted(BLOCKS)), data=st.data(), seed=st.integers(0, 2**16))
def test_branch_order_does_not_change_the_result(name, data, seed):
    n = len(BLOCKS[name]())
    order = data.draw(st.permutations(range(n)), label="order")
    assert _fused_convs(name, order, seed) == _fused_convs(name, list(range(n)), seed) == 1


def test_bottleneck_beside_conv_bn_fuses_to_one_conv_in_both_orders():
    assert _fused_convs("bottleneck", [0, 1], 0) == 1
    assert _fused_convs("bottleneck", [1, 0], 0) == 1
