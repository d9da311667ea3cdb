"""rules/serial_merge.py: its property test (float64 hypothesis: equivalence, the rule fired, the structure
reached) and its traps (what it must refuse or leave alone)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st

from reparam.testing import assert_refuses, ConvSpec, count_ops
from tests.rules.support import RTOL, build, dims, example, fuse64, fuse_fired, not_fired, params, refused, specs, unchanged


class Chain(nn.Module):
    def __init__(self, *layers, sibling=None):
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.sibling = sibling

    def forward(self, x):
        y = self.layers(x)
        return y if self.sibling is None else y + self.sibling(x)


@given(st.data(), st.sampled_from(["1x1-kxk", "kxk-1x1", "1x1-1x1", "1x1(bias)-kxk(padded)"]))
def test_property(data, form):
    """1×1 → k×k (exact: the 1×1 has no bias, or the k×k is unpadded), k×k → 1×1, 1×1 → 1×1 → one conv;
    a 1×1 with a bias before a zero-padded k×k is refused (the border would see the bias) and stays two convs."""
    nd = data.draw(dims)
    cin, cout = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    mid = max(cin, cout) + data.draw(st.integers(0, 2))  # wide enough that the merged conv is cheaper
    ones = (1,) * nd
    one = lambda a, b, bias: ConvSpec(nd, a, b, ones, ones, ones, ((0, 0),) * nd, 1, bias)  # noqa: E731
    if form == "1x1-1x1":
        first, second = one(cin, mid, data.draw(st.booleans())), one(mid, cout, data.draw(st.booleans()))
    elif form == "1x1-kxk":
        k = data.draw(specs(nd, in_channels=mid, out_channels=cout, groups="dense"))
        bias = data.draw(st.booleans()) and all(p == (0, 0) for p in k.padding)
        first, second = one(cin, mid, bias), k
    elif form == "1x1(bias)-kxk(padded)":
        k = data.draw(specs(nd, in_channels=mid, out_channels=cout, groups="dense").filter(
            lambda s: any(p != (0, 0) for p in s.padding)))
        first, second = one(cin, mid, True), k
    else:
        k = data.draw(specs(nd, in_channels=cin, out_channels=mid, groups="dense"))
        first, second = k, one(mid, cout, data.draw(st.booleans()))
    model = build(nn.Sequential(first.module(), second.module()), data.draw)
    x = example(data.draw, nd, cin, max(first.min_size(), second.min_size()))
    if form == "1x1(bias)-kxk(padded)":
        fused, report = assert_refuses("serial_merge", model, (x,), "bias", rtol=RTOL)
        assert "serial_merge" not in report.fired_counts() and count_ops(fused)["convs"] == 2
        return
    _, _, n = fuse_fired("serial_merge", model, x, times=1)
    assert n["convs"] == 1


@given(st.data())
def test_property_linear(data):
    """Linear → Linear → one Linear when a·c ≤ a·b + b·c; a bottleneck (a·c larger) is refused and stays two
    Linears, so the parameter count never grows."""
    a, b, c = (data.draw(st.integers(1, 8)) for _ in range(3))
    model = build(nn.Sequential(nn.Linear(a, b, bias=data.draw(st.booleans())),
                                nn.Linear(b, c, bias=data.draw(st.booleans()))), data.draw)
    x = torch.randn(3, a, dtype=torch.float64)
    if a * c > a * b + b * c:
        fused, report = assert_refuses("serial_merge", model, (x,), "multiply-adds", rtol=RTOL)
        assert "serial_merge" not in report.fired_counts() and count_ops(fused)["linears"] == 2
        assert count_ops(fused)["params"] == count_ops(model)["params"]
        return
    fused, _, n = fuse_fired("serial_merge", model, x, times=1)
    assert n["linears"] == 1 and n["ops"] == 1
    assert next(m for m in fused.modules() if isinstance(m, nn.Linear)).weight.numel() <= a * b + b * c


@pytest.mark.parametrize("chain, shape, words", [
    (lambda: Chain(nn.Linear(256, 8), nn.Linear(8, 256)), (2, 256), ("merged Linear", "multiply-adds", "256→8→256")),
    (lambda: Chain(nn.Linear(64, 4), nn.Linear(4, 64)), (2, 7, 64), ("multiply-adds",)),  # tokens (N, T, C)
    (lambda: Chain(nn.Conv2d(64, 4, 1), nn.Conv2d(4, 64, 1)), (1, 64, 8, 8), ("multiply-adds",)),
    (lambda: Chain(nn.Conv2d(4, 6, 1), nn.Conv2d(6, 4, 3, padding=1)), (1, 4, 8, 8), ("bias",)),
], ids=["linear-bottleneck", "token-bottleneck", "conv1x1-bottleneck", "bias-then-padded"])
def test_trap(chain, shape, words):
    """Bottlenecks (the merged layer costs more than the two: 256→8→256 would go from 4,360 to 65,792
    parameters), and a 1×1 with a bias before a zero-padded 3×3 (the border sees the bias, not 0)."""
    model, fused, report = fuse64(chain(), shape)
    refused(report, "serial_merge", *words)
    not_fired(report, "serial_merge")
    unchanged(report)
    assert params(fused) <= params(model)


@pytest.mark.parametrize("chain, shape, rule", [
    (lambda: Chain(nn.Linear(16, 32), nn.Linear(32, 16)), (3, 16), "serial_merge"),  # widening: cheaper merged
    (lambda: Chain(nn.Linear(64, 4, bias=False), nn.Linear(4, 64, bias=False), sibling=nn.Linear(64, 64)),
     (2, 5, 64), "serial_into_sibling"),  # a low-rank (LoRA) branch beside a full Linear: then linear_sum
], ids=["widening", "low-rank-beside-full"])
def test_trap_linear_still_fuses(chain, shape, rule):
    """The controls: a chain that is cheaper merged, and a bottleneck that vanishes into a sibling, become one
    Linear with no more parameters than before."""
    model, fused, report = fuse64(chain(), shape)
    assert report.fired_counts().get(rule) == 1 and not report.refusals
    assert report.after.linears == 1 and report.after.ops == 1
    assert params(fused) <= params(model)
