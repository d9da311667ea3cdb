"""rules/identity_elim.py: its property test (float64 hypothesis: equivalence, the rule fired, the structure
reached) and its traps (what it must refuse or leave alone)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st

from reparam.testing import Scale
from tests.rules.support import Fn, bn, build, dims, example, fuse64, fuse_fired, not_fired, pad_ops, specs, unchanged


def _fresh_bn(shifted: bool) -> nn.Module:
    """A BatchNorm that looks like the identity and is not: default statistics (scale 1/√(1+ε)), or running
    variance 1 − ε (scale exactly 1) with a running mean of 0.5 (shift −0.5)."""
    norm = bn(4).double()
    if shifted:
        with torch.no_grad():
            norm.running_var.fill_(1 - norm.eps)
            norm.running_mean.fill_(0.5)
    return norm


@given(st.data())
def test_property(data):
    """Identity, eval Dropout and x·1 vanish around a conv."""
    nd = data.draw(dims)
    spec = data.draw(specs(nd))
    model = build(nn.Sequential(nn.Identity(), spec.module(), nn.Dropout(0.3), Scale(1.0)), data.draw)
    x = example(data.draw, nd, spec.in_channels, spec.min_size())
    _, _, n = fuse_fired("identity_elim", model, x)
    assert n["ops"] == pad_ops(spec) and n["convs"] == 1


@pytest.mark.parametrize("shifted", [False, True], ids=["eps-scale", "shift"])
def test_trap(shifted):
    """A default-initialized BN is x/√(1+ε), not x; a BN with scale exactly 1 still shifts: neither vanishes."""
    model = Fn(lambda s, x: torch.relu(s.bn(x)), bn=_fresh_bn(shifted))
    _, _, report = fuse64(model, (2, 4, 6, 6), randomize=False)
    not_fired(report, "identity_elim")
    unchanged(report)
    assert report.after.bns == 1


def test_trap_control():
    """The control: variance 1 − ε, mean 0, γ = 1, β = 0 is exactly the identity, and is dropped."""
    norm = _fresh_bn(shifted=True)
    with torch.no_grad():
        norm.running_mean.zero_()
    _, _, report = fuse64(Fn(lambda s, x: torch.relu(s.bn(x)), bn=norm), (2, 4, 6, 6), randomize=False)
    assert report.fired_counts().get("identity_elim") == 1 and report.after.bns == 0
