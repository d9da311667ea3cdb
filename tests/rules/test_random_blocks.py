"""Random multi-branch linear blocks of one input (all rules together) reach the minimal conv count."""
from __future__ import annotations

from hypothesis import given, strategies as st

from reparam.testing import assert_equivalent, count_ops, linear_blocks
from tests.rules.support import RTOL


@given(linear_blocks(nd=2))
def test_random_linear_blocks_2d(case):
    """Random multi-branch linear blocks of one input fuse to the minimal conv count, exactly."""
    fused, report = assert_equivalent(case.module, case.inputs, rtol=RTOL)
    n = count_ops(fused)
    assert n["convs"] == case.min_convs and n["bns"] == 0, f"{case}\n{report.summary()}\n{report.refusals}"


@given(st.sampled_from([1, 3]).flatmap(lambda nd: linear_blocks(nd=nd, max_channels=4, max_branches=3)))
def test_random_linear_blocks_1d_3d(case):
    fused, report = assert_equivalent(case.module, case.inputs, rtol=RTOL)
    n = count_ops(fused)
    assert n["convs"] == case.min_convs and n["bns"] == 0, f"{case}\n{report.summary()}\n{report.refusals}"
