"""rules/identity_to_conv.py: its property test (float64 hypothesis: equivalence, the rule fired, the structure
reached) and its traps (what it must refuse or leave alone)."""
from __future__ import annotations

import pytest
import torch.nn as nn
from hypothesis import given, strategies as st

from reparam.testing import BN, Branches, LayerScale, Scale
from tests.rules.support import Fn, bn, build, dims, example, fuse64, fuse_fired, not_fired, pad_ops, refused, specs, unchanged


def _bn_skip_also_returned(s, x):
    skip = s.bn(x)
    return s.conv(x) + skip, skip


@given(st.data(), st.sampled_from(["x", "bn", "alpha", "layerscale"]), st.sampled_from(["sum", "residual"]))
def test_property(data, skip, form):
    """x, BN(x), α·x or γ⊙x beside conv(x) (C → C, stride 1): one conv; also the residual x + conv(x)."""
    nd = data.draw(dims)
    c = data.draw(st.integers(1, 8))
    spec = data.draw(specs(nd, in_channels=c, out_channels=c, padding="same", strides=(1,)))
    branch = {"x": nn.Identity(), "bn": BN[nd](c), "alpha": Scale(data.draw(st.sampled_from([0.5, -2.0]))),
              "layerscale": LayerScale(c, nd)}[skip]
    coeff = data.draw(st.sampled_from([1.0, -1.0, 0.5]))
    if form == "sum":
        model = Branches([spec.module(), branch], [1.0, coeff])
    else:
        model = Branches([branch, spec.module()], [1.0, coeff])
    model = build(model, data.draw)
    x = example(data.draw, nd, c, spec.min_size())
    _, _, n = fuse_fired("identity_to_conv", model, x, times=1)
    assert n["convs"] == 1 and n["bns"] == 0 and n["ops"] == pad_ops(spec)


def test_trap_skip_also_returned():
    """conv(x) + BN(x) where BN(x) is also a model output: the BN cannot become part of the conv."""
    model = Fn(_bn_skip_also_returned, conv=nn.Conv2d(4, 4, 3, padding=1), bn=bn(4))
    _, _, report = fuse64(model, (2, 4, 7, 7))
    refused(report, "identity_to_conv", "also used by", "graph output")
    not_fired(report, "identity_to_conv")
    unchanged(report)


@pytest.mark.parametrize("conv, shape", [
    (lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1), (2, 4, 1, 1)),  # shapes agree on a 1×1 map only
    (lambda: nn.Conv2d(1, 4, 3, padding=1), (2, 1, 7, 7)),  # x has 1 channel, broadcast over 4
], ids=["strided-sibling", "channel-broadcast"])
def test_trap(conv, shape):
    """x + conv(x) with a stride-2 conv (an identity is a stride-1 conv), or with x broadcast from 1 channel to
    the conv's 4: no identity kernel joins the conv."""
    _, _, report = fuse64(Fn(lambda s, x: x + s.conv(x), conv=conv()), shape)
    not_fired(report, "identity_to_conv")
    unchanged(report)
