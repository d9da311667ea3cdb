"""Helpers for tests and demos of RepNeXt fusion."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["randomize_bn_stats"]


@torch.no_grad()
def randomize_bn_stats(
    model: nn.Module,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Give every BatchNorm (1d/2d/3d, incl. SyncBatchNorm) non-trivial statistics and
    affine parameters, so that folding BN into convs/linears is actually exercised
    (freshly initialised BN is mean 0, var 1, weight 1, bias 0, i.e. almost identity).

    Per channel:
      running_mean ~ N(0, 0.1^2),  running_var ~ U(0.5, 2),
      weight       ~ U(0.5, 1.5),  bias        ~ N(0, 0.1^2).

    Values are drawn on the CPU from ``generator`` (a CPU ``torch.Generator``; the
    global RNG when None) and copied to each tensor's device and dtype, so results are
    reproducible regardless of where the model lives. Non-affine BNs or BNs without
    running stats get only the parts they have. Modifies ``model`` in place and returns it.
    """

    def uniform(n: int, lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (hi - lo) + lo

    def normal(n: int, std: float) -> torch.Tensor:
        return torch.randn(n, generator=generator) * std

    for m in model.modules():
        if not isinstance(m, _BatchNorm):
            continue
        n = m.num_features
        if m.running_mean is not None:
            m.running_mean.copy_(normal(n, 0.1))
        if m.running_var is not None:
            m.running_var.copy_(uniform(n, 0.5, 2.0))
        if m.weight is not None:
            m.weight.copy_(uniform(n, 0.5, 1.5))
        if m.bias is not None:
            m.bias.copy_(normal(n, 0.1))
    return model
