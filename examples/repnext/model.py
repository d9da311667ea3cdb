"""RepNeXt M0-M5, training-time form only.

RepNeXt (Zhao, Luo, Ouyang, "RepNeXt: A Fast Multi-Scale CNN using Structural
Reparameterization", arXiv 2406.16004) is a four-stage CNN whose token mixers are
multi-branch depthwise convolutions while training and collapse to single convolutions
for inference.

This file deliberately contains **no** fuse / reparameterize / switch-to-deploy code:
every block is written exactly as it trains (parallel branches summed, serial convs
applied one after another, BatchNorm after every ConvNorm conv, two classifier heads
averaged).  Turning it into the deploy graph is the job of ``reparam.fuse``, which works
from the torch.fx data flow alone.

The whole model is ``torch.fx.symbolic_trace``-able: the only Python control flow in a
forward is on ``self.training`` / ``self.distillation`` (plain bools at trace time).

Structure (see docs / the architecture page for the full statement):

* ``Stem``: ConvNorm(3, C0/2, 3, s2, p1) -> GELU -> ConvNorm(C0/2, C0, 3, s2, p1).
* Stage 0: ``depth[0]`` ``MetaNeXtBlock`` at C0.  Stages 1-3: a ``Downsample``
  (C -> 2C, stride 2) followed by ``depth[i]`` ``MetaNeXtBlock``.
* ``MetaNeXtBlock``: ``y = x + mlp(norm(token_mixer(x)))`` with ``token_mixer = ChunkConv``.
* ``Downsample``: ``z = norm(CopyConv(x)); out = z + mlp(z)``.
* Head: mean over H, W -> Dropout -> ``(head(x) + head_dist(x)) / 2`` (or both logits
  when training with distillation), each head BatchNorm1d -> Linear.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

__all__ = [
    "ConvNorm",
    "RepDWConvS",
    "RepDWConvM",
    "DWConvL",
    "ChunkConv",
    "CopyConv",
    "Mlp",
    "DropPath",
    "MetaNeXtBlock",
    "Downsample",
    "Stem",
    "BNLinear",
    "RepNeXt",
    "REPNEXT_CONFIGS",
    "repnext_m0",
    "repnext_m1",
    "repnext_m2",
    "repnext_m3",
    "repnext_m4",
    "repnext_m5",
    "register_timm_models",
]


# --------------------------------------------------------------------------------------
# Small building blocks
# --------------------------------------------------------------------------------------


class ConvNorm(nn.Sequential):
    """Conv2d (bias=False) followed by BatchNorm2d, as children ``conv`` and ``bn``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_channels)


def _dw(
    dim: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int] | int = 1,
    padding: tuple[int, int] | int = 0,
    dilation: int = 1,
    bias: bool = True,
) -> nn.Conv2d:
    """Depthwise Conv2d (groups == channels) on ``dim`` channels."""
    return nn.Conv2d(
        dim,
        dim,
        kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=dim,
        bias=bias,
    )


class RepDWConvS(nn.Module):
    """Small-kernel multi-branch depthwise conv; the deploy form is one dw 3x3.

    stride 1: 3x3 (p1) + 1x3 (p 0,1) + 3x1 (p 1,0) + 2x2 dilation 2 (p1), all with bias.
    stride 2: 3x3 (s2, p1, bias)
              + [1x3 (stride (1,2), p (0,1)) then 3x1 (stride (2,1), p (1,0)), bias-free]
              + 2x2 dilation 2 (s2, p1, bias).
    """

    def __init__(self, dim: int, stride: int = 1) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"RepDWConvS supports stride 1 or 2, got {stride}")
        self.stride = stride
        self.conv3x3 = _dw(dim, (3, 3), stride, (1, 1))
        if stride == 1:
            self.conv1x3 = _dw(dim, (1, 3), 1, (0, 1))
            self.conv3x1 = _dw(dim, (3, 1), 1, (1, 0))
        else:
            # Serial pair: 1x3 striding over W, then 3x1 striding over H.
            self.conv1x3_3x1 = nn.Sequential(
                _dw(dim, (1, 3), (1, 2), (0, 1), bias=False),
                _dw(dim, (3, 1), (2, 1), (1, 0), bias=False),
            )
        self.conv2x2_d2 = _dw(dim, (2, 2), stride, (1, 1), dilation=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return self.conv3x3(x) + self.conv1x3(x) + self.conv3x1(x) + self.conv2x2_d2(x)
        return self.conv3x3(x) + self.conv1x3_3x1(x) + self.conv2x2_d2(x)


class RepDWConvM(nn.Module):
    """Medium-kernel ("fovea") multi-branch depthwise conv; the deploy form is one dw 7x7.

    Sum of five kernel patterns, with stride s in {1, 2}:
      7x7 (p3, bias) + 5x3 (p 2,1, bias) + 3x5 (p 1,2, bias)
      + [1x7 (stride (1,s), p 0,3) then 7x1 (stride (s,1), p 3,0)], both bias-free
      + [1x5 (stride (1,s), p 0,2) then 5x1 (stride (s,1), p 2,0)], both bias-free.
    """

    def __init__(self, dim: int, stride: int = 1) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"RepDWConvM supports stride 1 or 2, got {stride}")
        s = stride
        self.conv7x7 = _dw(dim, (7, 7), s, (3, 3))
        self.conv5x3 = _dw(dim, (5, 3), s, (2, 1))
        self.conv3x5 = _dw(dim, (3, 5), s, (1, 2))
        self.conv1x7_7x1 = nn.Sequential(
            _dw(dim, (1, 7), (1, s), (0, 3), bias=False),
            _dw(dim, (7, 1), (s, 1), (3, 0), bias=False),
        )
        self.conv1x5_5x1 = nn.Sequential(
            _dw(dim, (1, 5), (1, s), (0, 2), bias=False),
            _dw(dim, (5, 1), (s, 1), (2, 0), bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (
            self.conv7x7(x)
            + self.conv5x3(x)
            + self.conv3x5(x)
            + self.conv1x7_7x1(x)
            + self.conv1x5_5x1(x)
        )


class DWConvL(nn.Sequential):
    """Large-kernel branch: dw 1x11 (p 0,5) then dw 11x1 (p 5,0), both with bias.

    Because the first conv has a bias and the second one zero-pads, this pair is *not*
    exactly one 11x11 conv near the borders.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1x11 = _dw(dim, (1, 11), 1, (0, 5), bias=True)
        self.conv11x1 = _dw(dim, (11, 1), 1, (5, 0), bias=True)


class ChunkConv(nn.Module):
    """Token mixer of the MetaNeXt block.

    Splits the channels into 4 equal chunks (i, s, m, l) and returns
    ``cat([i, S(s), M(m), L(l)], dim=1)``: identity, RepDWConvS, RepDWConvM, DWConvL.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 4 != 0:
            raise ValueError(f"ChunkConv needs channels divisible by 4, got {dim}")
        c = dim // 4
        self.conv_s = RepDWConvS(c, stride=1)
        self.conv_m = RepDWConvM(c, stride=1)
        self.conv_l = DWConvL(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i, s, m, l = torch.chunk(x, 4, dim=1)
        return torch.cat([i, self.conv_s(s), self.conv_m(m), self.conv_l(l)], dim=1)


class CopyConv(nn.Module):
    """Token mixer of the Downsample block (C -> 2C, stride 2).

    The same input feeds a stride-2 RepDWConvS and a stride-2 RepDWConvM; the outputs are
    concatenated ``[S'(x), M'(x)]`` along channels.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv_s = RepDWConvS(dim, stride=2)
        self.conv_m = RepDWConvM(dim, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv_s(x), self.conv_m(x)], dim=1)


class Mlp(nn.Sequential):
    """Channel mixer: ConvNorm(C, rC, 1) -> GELU -> ConvNorm(rC, C, 1)."""

    def __init__(self, dim: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = ConvNorm(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = ConvNorm(hidden, dim, 1)


class DropPath(nn.Module):
    """Stochastic depth on the residual branch (per sample).  Only built when
    ``drop_path_rate > 0``; identity in eval mode."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        # Feature maps here are always NCHW; a fixed rank keeps this fx-traceable.
        mask = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def _drop_path(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0.0 else nn.Identity()


class MetaNeXtBlock(nn.Module):
    """``y = x + mlp(norm(token_mixer(x)))`` with a ChunkConv token mixer."""

    def __init__(self, dim: int, mlp_ratio: int = 2, drop_path: float = 0.0) -> None:
        super().__init__()
        self.token_mixer = ChunkConv(dim)
        self.norm = nn.BatchNorm2d(dim)
        self.mlp = Mlp(dim, mlp_ratio)
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mlp(self.norm(self.token_mixer(x))))


class Downsample(nn.Module):
    """C -> 2C at stride 2: ``z = norm(CopyConv(x)); out = z + mlp(z)``."""

    def __init__(self, dim: int, mlp_ratio: int = 2, drop_path: float = 0.0) -> None:
        super().__init__()
        self.token_mixer = CopyConv(dim)
        self.norm = nn.BatchNorm2d(2 * dim)
        self.mlp = Mlp(2 * dim, mlp_ratio)
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(self.token_mixer(x))
        return z + self.drop_path(self.mlp(z))


class Stem(nn.Sequential):
    """ConvNorm(in, C0/2, 3, s2, p1) -> GELU -> ConvNorm(C0/2, C0, 3, s2, p1)."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.conv1 = ConvNorm(in_channels, dim // 2, 3, 2, 1)
        self.act = nn.GELU()
        self.conv2 = ConvNorm(dim // 2, dim, 3, 2, 1)


class BNLinear(nn.Sequential):
    """BatchNorm1d -> Linear, as children ``bn`` and ``linear``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.linear = nn.Linear(in_features, out_features)


# --------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------


class RepNeXt(nn.Module):
    """Training-time RepNeXt.

    Args:
        embed_dims: channels of the four stages (C0..C3); each must be divisible by 4 and
            C_{i+1} must equal 2*C_i (the Downsample block doubles channels).
        depths: number of MetaNeXt blocks per stage.
        num_classes: classifier outputs; 0 replaces both heads by identity (features).
        distillation: when True and ``self.training``, forward returns
            ``(head(x), head_dist(x))``; otherwise it returns their average.
        mlp_ratio: hidden expansion of every Mlp (2 in all published variants).
        drop_rate: dropout before the heads.
        drop_path_rate: stochastic depth, linearly increasing over all blocks (the
            Downsample blocks included); 0 builds no DropPath modules at all.
        in_chans: input channels.
    """

    def __init__(
        self,
        embed_dims: Sequence[int],
        depths: Sequence[int],
        num_classes: int = 1000,
        distillation: bool = False,
        mlp_ratio: int = 2,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        embed_dims = list(embed_dims)
        depths = list(depths)
        if len(embed_dims) != 4 or len(depths) != 4:
            raise ValueError("RepNeXt has exactly four stages")
        for a, b in zip(embed_dims[:-1], embed_dims[1:]):
            if b != 2 * a:
                raise ValueError(f"stage channels must double, got {embed_dims}")

        self.num_classes = num_classes
        self.distillation = distillation
        self.num_features = embed_dims[-1]

        self.stem = Stem(in_chans, embed_dims[0])

        n_blocks = sum(depths) + len(depths) - 1  # MetaNeXt blocks + 3 Downsample blocks
        dpr = [float(r) for r in torch.linspace(0, drop_path_rate, n_blocks)] if n_blocks > 1 else [0.0]
        k = 0
        stages = []
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            blocks: list[nn.Module] = []
            if i > 0:
                blocks.append(Downsample(embed_dims[i - 1], mlp_ratio, dpr[k]))
                k += 1
            for _ in range(depth):
                blocks.append(MetaNeXtBlock(dim, mlp_ratio, dpr[k]))
                k += 1
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)

        self.head_drop = nn.Dropout(drop_rate)
        if num_classes > 0:
            self.head = BNLinear(self.num_features, num_classes)
            self.head_dist = BNLinear(self.num_features, num_classes)
        else:
            self.head = nn.Identity()
            self.head_dist = nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor):
        x = x.mean((2, 3))
        x = self.head_drop(x)
        if self.distillation and self.training:
            return self.head(x), self.head_dist(x)
        return (self.head(x) + self.head_dist(x)) / 2

    def forward(self, x: torch.Tensor):
        return self.forward_head(self.forward_features(x))


# --------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------

REPNEXT_CONFIGS: dict[str, dict[str, tuple[int, ...]]] = {
    "repnext_m0": dict(embed_dims=(40, 80, 160, 320), depths=(2, 2, 9, 1)),
    "repnext_m1": dict(embed_dims=(48, 96, 192, 384), depths=(3, 3, 15, 2)),
    "repnext_m2": dict(embed_dims=(56, 112, 224, 448), depths=(3, 3, 15, 2)),
    "repnext_m3": dict(embed_dims=(64, 128, 256, 512), depths=(3, 3, 13, 2)),
    "repnext_m4": dict(embed_dims=(64, 128, 256, 512), depths=(5, 5, 25, 4)),
    "repnext_m5": dict(embed_dims=(80, 160, 320, 640), depths=(7, 7, 35, 2)),
}


def _build(name: str, num_classes: int, distillation: bool, **kw) -> RepNeXt:
    return RepNeXt(num_classes=num_classes, distillation=distillation, **REPNEXT_CONFIGS[name], **kw)


def repnext_m0(num_classes: int = 1000, distillation: bool = False, **kw) -> RepNeXt:
    """RepNeXt-M0: C = 40, 80, 160, 320; depths 2, 2, 9, 1."""
    return _build("repnext_m0", num_classes, distillation, **kw)


def repnext_m1(num_classes: int = 1000, distillation: bool = False, **kw) -> RepNeXt:
    """RepNeXt-M1: C = 48, 96, 192, 384; depths 3, 3, 15, 2."""
    return _build("repnext_m1", num_classes, distillation, **kw)


def repnext_m2(num_classes: int = 1000, distillation: bool = False, **kw) -> RepNeXt:
    """RepNeXt-M2: C = 56, 112, 224, 448; depths 3, 3, 15, 2."""
    return _build("repnext_m2", num_classes, distillation, **kw)


def repnext_m3(num_classes: int = 1000, distillation: bool = False, **kw) -> RepNeXt:
    """RepNeXt-M3: C = 64, 128, 256, 512; depths 3, 3, 13, 2."""
    return _build("repnext_m3", num_classes, distillation, **kw)


def repnext_m4(num_classes: int = 1000, distillation: bool = False, **kw) -> RepNeXt:
    """RepNeXt-M4: C = 64, 128, 256, 512; depths 5, 5, 25, 4."""
    return _build("repnext_m4", num_classes, distillation, **kw)


def repnext_m5(num_classes: int = 1000, distillation: bool = False, **kw) -> RepNeXt:
    """RepNeXt-M5: C = 80, 160, 320, 640; depths 7, 7, 35, 2."""
    return _build("repnext_m5", num_classes, distillation, **kw)


# --------------------------------------------------------------------------------------
# Optional timm registration (never required: torch alone is sufficient)
# --------------------------------------------------------------------------------------

_TIMM_REGISTERED = False


def _timm_entrypoint(name: str):
    factory = globals()[name]

    def entrypoint(pretrained: bool = False, **kwargs) -> RepNeXt:
        if pretrained:
            raise ValueError(f"{name}: no pretrained weights are provided")
        # Arguments timm's create_model passes that these models do not use.
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        return factory(**kwargs)

    entrypoint.__name__ = name
    entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = factory.__doc__
    return entrypoint


def register_timm_models() -> bool:
    """Register ``repnext_m0`` .. ``repnext_m5`` with timm's model registry so that
    ``timm.create_model("repnext_m0")`` works.  Returns False if timm is not installed.
    Idempotent."""
    global _TIMM_REGISTERED
    if _TIMM_REGISTERED:
        return True
    try:
        from timm.models import register_model
    except ImportError:
        return False
    for name in REPNEXT_CONFIGS:
        register_model(_timm_entrypoint(name))
    _TIMM_REGISTERED = True
    return True


# Importing timm costs a couple of seconds, so it is not imported just for this: register
# automatically only when the caller already has timm loaded; otherwise call
# ``register_timm_models()`` explicitly.
import sys as _sys  # noqa: E402

if "timm" in _sys.modules:
    register_timm_models()
