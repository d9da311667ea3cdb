"""rules/linear_sum.py: its property test (float64 hypothesis: equivalence, the rule fired, the structure
reached) and its traps (what it must refuse or leave alone)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st
from tests.rules.support import Fn, _two, build, fuse64, fuse_fired, not_fired, refused, unchanged


def _heads_of_halves(s, x):
    return s.a(x[..., :4]) + s.b(x[..., 4:])


def _head_also_returned(s, x):
    h = s.a(x)
    return h + s.b(x), h


@given(st.data())
def test_property(data):
    """(h₁(x) + h₂(x)) / 2 or weighted heads (± BN1d) → one Linear."""
    fin, fout = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8))
    n_heads = data.draw(st.integers(2, 3))
    heads = [nn.Linear(fin, fout, bias=data.draw(st.booleans())) for _ in range(n_heads)]
    if data.draw(st.booleans()):
        heads[0] = nn.Sequential(heads[0], nn.BatchNorm1d(fout))
    weights = [data.draw(st.sampled_from([1.0, 0.5, -1.0, 0.25])) for _ in heads]

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList(heads)

        def forward(self, x):
            y = weights[0] * self.heads[0](x)
            for w, h in zip(weights[1:], self.heads[1:]):
                y = y + w * h(x)
            return y / n_heads

    model = build(Heads(), data.draw)
    x = torch.randn(3, fin, dtype=torch.float64)
    _, _, n = fuse_fired("linear_sum", model, x)
    assert n["linears"] == 1 and n["bns"] == 0 and n["ops"] == 1


def test_trap_head_also_returned():
    """a(x) + b(x) where a(x) is also a model output: the heads cannot become one Linear."""
    _, _, report = fuse64(Fn(_head_also_returned, a=nn.Linear(8, 3), b=nn.Linear(8, 3)), (2, 5, 8))
    refused(report, "linear_sum", "also used by", "graph output")
    not_fired(report, "linear_sum")
    unchanged(report)


@pytest.mark.parametrize("fn, heads", [
    (_heads_of_halves, lambda: dict(a=nn.Linear(4, 3), b=nn.Linear(4, 3))),  # different inputs
    (_two, lambda: dict(a=nn.Linear(8, 1), b=nn.Linear(8, 3))),  # 1 output broadcast against 3
], ids=["different-inputs", "broadcast-output"])
def test_trap(fn, heads):
    """Linears of different inputs (the two halves of x), or of different output sizes (one broadcast): their
    weights do not add up."""
    _, _, report = fuse64(Fn(fn, **heads()), (2, 5, 8))
    not_fired(report, "linear_sum")
    unchanged(report)
    assert report.after.linears == 2
