"""timm's reparameterizable families, built untrained, with every statistic and layer scale randomized.

A freshly built model has BatchNorms that are almost identities and layer scales of 1e-5, so a fusion that
dropped them would look right; :func:`build` makes each of them matter. :func:`timm_deploy` is timm's own
hand-written reparameterization (``timm.models.reparameterize_model``), the yardstick.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from examples.repnext.utils import randomize_bn_stats

MODELS = ("repvgg_a0", "mobileone_s0", "repvit_m0_9", "fastvit_t8")


@torch.no_grad()
def randomize_layer_scales(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Every parameter named ``gamma`` (timm's layer scales) drawn from U(0.5, 1.5), in place."""
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] == "gamma":
            p.copy_((torch.rand(p.shape, generator=generator) + 0.5).to(p.dtype))
    return model


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """timm model ``name`` (pretrained=False, eval), BatchNorm statistics and layer scales randomized."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False).eval()
    gen = torch.Generator().manual_seed(seed)
    randomize_bn_stats(model, gen)
    randomize_layer_scales(model, gen)
    return model.to(dtype)


def timm_deploy(model: nn.Module) -> nn.Module:
    """timm's own deploy form of a copy of ``model`` (the model itself is left as it was)."""
    from timm.models import reparameterize_model

    return reparameterize_model(copy.deepcopy(model)).eval()
