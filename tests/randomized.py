"""Test models with non-trivial BatchNorm statistics (shared by the capture tests)."""
from __future__ import annotations

import torch
import torch.nn as nn


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every BatchNorm's running statistics, weight and bias drawn from ``seed`` (in place); returns ``module``."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.3)
    return module
