"""timm models that symbolic torch.fx tracing reads only in part, fused with no model-specific code.

- ``levit_128s``: every LinearNorm is ``bn(linear(x).flatten(0, 1)).reshape_as(linear(x))``, a shape-only second
  use of the Linear's output. Minimal form (timm's own fuse reaches it): no BatchNorm left.
- ``resnetv2_50x1_bit``: weight-standardized convs (``StdConv2d``: each forward normalizes the conv's weight).
  Minimal form: plain convs, no statistics of the weights computed at run time.

Counts are what the deploy model executes on the example input (``count_run``, ATen calls: a weight
standardization's batch-norm call counts as a BN)."""
from __future__ import annotations

import pytest
import torch

import reparam
from examples.zoo.timm_models import build
from reparam.frontends import verify
from reparam.frontends.fx.counting import count_run

pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fused_and_counts(name: str, size: int):
    model = build(name)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    fused, rep = reparam.fuse(model, x, report=True)
    assert rep.verification.passed and rep.verification.error_fp64 <= 1e-12, rep.summary()
    probe = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    want = verify.run(model, (probe,), torch.float64)[0]
    with torch.no_grad():
        ours, theirs = (float((m(probe).double() - want).abs().max()) / float(want.abs().max()) for m in (fused, model))
    assert ours <= max(1e-5, 2 * theirs)  # float32 as deployed: no worse than the model's own rounding allows
    return model, fused, count_run(model, (x,)), count_run(fused, (x,))


def test_levit_leaves_no_batchnorm():
    model, fused, before, after = fused_and_counts("levit_128s", 224)  # its attention biases fix the size
    assert before.bns > 0 and after.bns == 0
    assert after.linears <= before.linears and type(fused) is type(model)


def test_weight_standardized_convs_become_plain_convs():
    model, fused, before, after = fused_and_counts("resnetv2_50x1_bit", 64)
    assert before.bns > after.bns == 0 and after.convs == before.convs
    convs = [m for m in fused.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(type(m) is torch.nn.Conv2d for m in convs)  # no StdConv2d computing its weight
