"""Local checks run side by side (checks of one shape as one program) judge each rewrite as if alone."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import reparam
from reparam.core import checks
from reparam.core.ops import Conv
from reparam.core.pattern import P, X
from reparam.testing import linear_blocks, randomize_bn


def collected_checks(model, x) -> list[checks.Check]:
    """The checks an engine run makes, collected instead of run."""
    found: list[checks.Check] = []

    class Collect(checks.Checks):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.cancelled = True

        def submit(self, check):
            found.append(check)

    real = checks.Checks
    checks.Checks = Collect
    try:
        reparam.fuse(model, x, verify=False)
    finally:
        checks.Checks = real
    return found


class DepthwiseBlocks(nn.Module):
    """Repeated identical blocks (RepVGG-like depthwise sums), so that their checks share a shape."""

    def __init__(self, c=6, n=5):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleList([nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c),
                                                   nn.Conv2d(c, c, 1, groups=c), nn.BatchNorm2d(c)])
                                    for _ in range(n))

    def forward(self, x):
        for k3, b3, k1, b1 in self.blocks:
            x = torch.relu(b3(k3(x)) + b1(k1(x)) + x)
        return x


def test_checks_of_repeated_blocks_run_together_and_pass():
    model = randomize_bn(DepthwiseBlocks()).eval()
    found = collected_checks(model, torch.randn(1, 6, 9, 9))
    signatures = [c.signature() for c in found]
    assert len(set(signatures)) < len(signatures)  # some run side by side
    assert checks.run_all(found) == [] and checks.run_all(found, workers=2) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_a_wrong_rewrite_among_equal_ones_is_the_one_named(workers):
    """Break one check of a group (its replacement's weight off by 1e-6 relative): exactly it fails."""
    model = randomize_bn(DepthwiseBlocks()).eval()
    found = collected_checks(model, torch.randn(1, 6, 9, 9))
    with_conv = [c.signature() for c in found if any(isinstance(op, Conv) for op, _ in c.steps)]
    sig = max(sorted(set(with_conv), key=str), key=with_conv.count)  # deterministic (a tie is broken by text)
    group = [k for k, c in enumerate(found) if c.signature() == sig]
    victim = found[group[len(group) // 2]]
    step = next(k for k, (op, _) in reversed(list(enumerate(victim.steps))) if isinstance(op, Conv))
    op, args = victim.steps[step]
    victim.steps[step] = (op.with_(weight=op.weight * (1 + 1e-6)), args)
    failures = checks.run_all(found, workers)
    assert [k for k, _ in failures] == [group[len(group) // 2]]
    assert failures[0][1].rule == victim.rule and failures[0][1].where == victim.where


@settings(max_examples=15)
@given(st.data())
def test_side_by_side_judges_like_alone(data):
    """Random linear blocks: every check passes batched exactly when it passes alone."""
    case = data.draw(linear_blocks())
    found = collected_checks(case.module, case.inputs)
    twice = found + [checks.Check(c.rule, c.where, c.steps, c.shapes, c.want, c.got, c.seed + 1) for c in found]
    assert checks.run_all(twice) == []


@reparam.rule(P(Conv, X("x"), name="conv"), name="nudge_last_block")
def nudge_last_block(x, conv):
    """conv(x) → conv(x)·(1 + 1e-7) for the one conv whose weight starts with 0.25 (deliberately wrong)."""
    if float(conv.op.weight.flatten()[0]) != 0.25:
        return None
    return conv.op.with_(weight=conv.op.weight * (1 + 1e-7) + 1e-12)(x)


def test_the_engine_names_the_wrong_rewrite_among_many_equal_ones():
    model = randomize_bn(DepthwiseBlocks()).eval()
    with torch.no_grad():
        model.blocks[3][0].weight.flatten()[0] = 0.25
    with pytest.raises(reparam.RewriteMismatch, match="nudge_last_block") as info:
        reparam.fuse(model, torch.randn(1, 6, 9, 9), extra_rules=[nudge_last_block])
    assert info.value.where == "blocks.3.0"


def test_cancelling_terms_are_judged_against_the_size_of_the_computation():
    """``a(x) − b(x)`` of nearly equal terms: the old value is ~1e-5 of the terms, so float64 rounding of the terms
    (~1e-16 of their size, moved by torch's summation order) reads as ~1e-10 of the old value. Judged against the
    computation's size as well, that passes, while a wrong result 1e-12 of the terms' size away still fails."""
    check = checks.Check("rule", "here", [], [(1, 1)], 0, 0, 0)
    terms = torch.full((4,), 10.0, dtype=torch.float64)
    want = torch.full((4,), 1e-4, dtype=torch.float64)
    size = float(terms.abs().max())
    checks._judge(check, want, want + 1e-14 * size, size)  # rounding of the terms: passes
    with pytest.raises(reparam.errors.RewriteMismatch):
        checks._judge(check, want, want + 1e-11 * size, size)
    with pytest.raises(reparam.errors.RewriteMismatch):  # without cancellation the old value's size is the scale
        checks._judge(check, terms, terms + 1e-8 * size, size)
