"""timm's reparameterizable families fused with no model-specific code, at least as far as timm's own fuse.

Each model is built untrained (nothing downloaded) with BatchNorm statistics and layer scales randomized.
Counts are made the same way for both sides: ``reparam.core.report.count_model`` on the FX graph of our deploy
model and of ``timm.models.reparameterize_model``'s. Structure does not depend on the input size, so most
models run at 32×32; repvgg_a0 runs at 224×224.
"""
from __future__ import annotations

import copy

import pytest
import torch

import reparam
from examples.zoo.timm_models import MODELS, build, timm_deploy
from reparam.frontends import verify
from reparam.frontends.fx.counting import count_model

SIZES = {"repvgg_a0": 224}
FP32_RTOL = 1e-5


def probe(size: int, seed: int = 7, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("name", MODELS)
def test_fuses_at_least_as_far_as_timm(name):
    size = SIZES.get(name, 32)
    model = build(name)
    state = copy.deepcopy(model.state_dict())
    fused, report = reparam.fuse(model, probe(size, seed=0), report=True)

    assert report.verification.passed, report.summary()
    assert report.verification.error_fp64 <= 1e-9
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in state.items()), "fuse modified its input"

    ours, theirs = count_model(fused), count_model(timm_deploy(model))
    assert ours.convs <= theirs.convs, (ours, theirs)
    assert ours.bns <= theirs.bns, (ours, theirs)
    assert ours.bns == 0, ours  # every BatchNorm of these families is foldable
    assert ours.linears <= theirs.linears

    x = probe(size)
    want = verify.run(model, (x,), torch.float64)
    got = verify.run(fused, (x,))
    assert all(g.dtype == torch.float32 for g in got)
    assert verify.relative_error(got, want) <= FP32_RTOL


def test_bfloat16_model_fuses_and_stays_bfloat16():
    model = build("repvgg_a0", dtype=torch.bfloat16)
    fused, report = reparam.fuse(model, probe(32, seed=0, dtype=torch.bfloat16), report=True)
    assert report.verification.passed, report.summary()
    tensors = list(fused.parameters()) + [b for b in fused.buffers() if b.is_floating_point()]
    assert tensors and all(t.dtype == torch.bfloat16 for t in tensors)
    assert count_model(fused).bns == 0

    x = probe(32, dtype=torch.bfloat16)
    want = verify.run(model, (x,), torch.float64)
    got, baseline = verify.run(fused, (x,)), verify.run(model, (x,))
    assert all(g.dtype == torch.bfloat16 for g in got)
    # folding in float64 and rounding once is no worse than running the unfused model in bfloat16
    assert verify.relative_error(got, want) <= 2 * verify.relative_error(baseline, want)
