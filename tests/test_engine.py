"""The engine's iteration guard: a rule (or a pair of rules) that rewrites its own output forever is stopped
with a FixpointError naming the rule, instead of hanging; a terminating rule set is not affected."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import reparam
from reparam import FixpointError
from reparam.core.ops import Affine
from reparam.core.pattern import P, X
from reparam.core.rule import require, rule
from reparam.testing import count_ops, randomize_bn


@rule(P(Affine, X("x"), name="a"))
def restate_affine(x, a):
    """a(x) = a(x): rebuilds the same affine as a new node, so it matches its own output forever."""
    return a.op.with_()(x)


@rule(P(Affine, X("x"), name="a"))
def split_affine(x, a):
    """x·s + t = (x·s) + t as two affines: the inverse of the built-in affine_merge."""
    require(a.op.shift is not None, "nothing to split")
    scale_only = Affine(a.op.scale, None, a.op.axis, dtype=a.op.dtype, device=a.op.device)
    shift_only = Affine(torch.ones_like(a.op.shift), a.op.shift, a.op.axis, dtype=a.op.dtype, device=a.op.device)
    return shift_only(scale_only(x))


def _model():
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))).eval()


def test_a_rule_that_rewrites_its_own_output_is_stopped_and_named():
    with pytest.raises(FixpointError) as info:
        reparam.fuse(_model(), torch.randn(1, 3, 8, 8), rules=[restate_affine])
    assert info.value.rule == "restate_affine" and set(info.value.involved) == {"restate_affine"}
    message = str(info.value)
    assert "'restate_affine' keeps firing" in message and "\n" not in message


def test_two_rules_undoing_each_other_are_stopped_and_one_of_them_named():
    with pytest.raises(FixpointError) as info:
        reparam.fuse(_model(), torch.randn(1, 3, 8, 8), extra_rules=[split_affine])
    assert "split_affine" in info.value.involved and info.value.rule in info.value.involved
    assert "'split_affine'" in str(info.value) and f"'{info.value.rule}' keeps firing" in str(info.value)


def test_a_terminating_rule_set_reaches_its_fixpoint():
    fused = reparam.fuse(_model(), torch.randn(1, 3, 8, 8))
    assert count_ops(fused)["bns"] == 1  # the BN after the ReLU stays; the one after the conv folds


@rule(P(Affine, X("x"), name="a"))
def crashing(x, a):
    """a(x) = ? (raises, as a buggy rule would)."""
    raise KeyError("nope")


@rule(P(Affine, X("x"), name="a"))
def returns_a_number(x, a):
    """a(x) = 3 (not an expression)."""
    return 3


@pytest.mark.parametrize("bad, says", [(crashing, "KeyError: 'nope'"), (returns_a_number, "returned a int")])
def test_a_broken_rule_is_named_with_where_it_failed(bad, says):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(reparam.RuleError) as info:
        reparam.fuse(model, torch.randn(1, 3, 8, 8), extra_rules=[bad])
    assert info.value.rule == bad.name and info.value.where == "1" and says in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@rule(P(Affine, X("x"), name="a"))
def wrong_then_fine(x, a):
    """a(x) = 2·a(x) once (deliberately wrong), so that the check that fails is an early one."""
    if a.op.dtype == torch.float16:
        return None
    return Affine(a.op.scale * 2, a.op.shift, a.op.axis, dtype=torch.float16, device=a.op.device)(x)


def test_a_failed_local_check_wins_over_a_later_error():
    """Checks run beside the rewriting; when a later step fails, the earlier wrong rewrite is what is reported."""
    with pytest.raises(reparam.RewriteMismatch, match="wrong_then_fine"):
        reparam.fuse(_model(), torch.randn(1, 3, 8, 8), rules=[wrong_then_fine, crashing])


def test_a_refusal_that_a_later_rewrite_made_moot_is_not_reported():
    """BN → two heads: folding the BN into one head is refused while the other reads it too; once the heads
    are one Linear, the fold happens, and the earlier refusal is no longer true of the graph."""
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.h1, self.h2 = nn.BatchNorm1d(8), nn.Linear(8, 3), nn.Linear(8, 3)

        def forward(self, x):
            y = self.bn(x)
            return (self.h1(y) + self.h2(y)) / 2

    model = randomize_bn(Heads()).eval()
    fused, rep = reparam.fuse(model, torch.randn(2, 8), report=True)
    assert rep.after.bns == 0 and rep.after.linears == 1
    assert rep.fired_counts().get("bn_prefold") == 1 and rep.refusals == []
