"""Small importable models for the CLI tests (pickling needs importable classes)."""
from __future__ import annotations

import torch
import torch.nn as nn


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model


class RepVGGBlock(nn.Module):
    """3×3 conv+BN, 1×1 conv+BN and a BN identity branch, summed, then ReLU."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv3 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        self.conv1 = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.skip = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.conv3(x) + self.conv1(x) + self.skip(x))


class TinyRepVGG(nn.Module):
    """A stem conv and two RepVGG blocks: 3 → 4 channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.blocks = nn.Sequential(RepVGGBlock(4), RepVGGBlock(4))

    def forward(self, x):
        return self.blocks(self.stem(x))


class TwoInputs(nn.Module):
    """Two inputs, each through its own RepVGG block, summed."""

    def __init__(self):
        super().__init__()
        self.a, self.b = RepVGGBlock(3), RepVGGBlock(3)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


def tiny_repvgg() -> nn.Module:
    """Deterministic weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    return _randomize_bn(TinyRepVGG()).eval()


def two_inputs() -> nn.Module:
    torch.manual_seed(1)
    return _randomize_bn(TwoInputs()).eval()


def broken_factory() -> nn.Module:
    raise RuntimeError("this factory always fails")


class DataDependent(nn.Module):
    """A conv and a BN, then a branch on the output's values: torch.export cannot export it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y * 2 if y.sum() > 0 else y


class Wide(nn.Module):
    """A RepVGG block between two convs, its width a factory argument (``--arg channels=6``)."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels))
        self.block = RepVGGBlock(channels)

    def forward(self, x):
        return self.block(self.stem(x))
