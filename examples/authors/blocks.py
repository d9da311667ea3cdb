"""Reparameterizable blocks written as their authors write them (the published training-time code, not clean
re-implementations), for the tests and benchmarks of the capture: DBB's BN-and-pad with index writes into the
borders and a 1×1 kernel built in forward, ACNet's crops before its asymmetric convs.

Each block's docstring states its minimal form (what the authors' own conversion reaches).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def bn_shift(bn: nn.BatchNorm2d) -> torch.Tensor:
    """What an inference BN gives for a zero input (DBB's pad_values)."""
    return bn.bias.detach() - bn.running_mean * bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)


def border_write(out: torch.Tensor, p: int, values: torch.Tensor) -> torch.Tensor:
    """Zero-pad by p, then write ``values`` (per channel) into the four borders, as DBB's BNAndPadLayer does."""
    out = F.pad(out, [p] * 4)
    v = values.view(1, -1, 1, 1)
    out[:, :, 0:p, :] = v
    out[:, :, -p:, :] = v
    out[:, :, :, 0:p] = v
    out[:, :, :, -p:] = v
    return out


class BNAndPad(nn.Module):
    """DBB's BNAndPadLayer: BN, then pad with what the BN gives for a zero input (``values`` overrides that)."""

    def __init__(self, channels: int, p: int, values=None):
        super().__init__()
        self.bn, self.p, self.values = nn.BatchNorm2d(channels), p, values

    def forward(self, x):
        out = self.bn(x)
        if self.p == 0:
            return out
        return border_write(out, self.p, bn_shift(self.bn) if self.values is None else self.values(self.bn))


class IdentityBasedConv1x1(nn.Conv2d):
    """DBB's 1×1 conv whose kernel is its weight plus the identity, built in forward."""

    def __init__(self, channels: int, groups: int = 1):
        super().__init__(channels, channels, 1, 1, 0, groups=groups, bias=False)
        per = channels // groups
        ident = torch.zeros(channels, per, 1, 1)
        for i in range(channels):
            ident[i, i % per] = 1
        self.register_buffer("id_tensor", ident)
        nn.init.zeros_(self.weight)

    def forward(self, x):
        return F.conv2d(x, self.weight + self.id_tensor, None, 1, 0, self.dilation, self.groups)


def conv_bn(cin, cout, k, stride=1, padding=0, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout))


class DiverseBranchBlock(nn.Module):
    """DBB (Ding et al. 2021) as its authors write it: k×k, 1×1, 1×1 → BN-and-pad → avg, 1×1 → BN-and-pad → k×k
    branches, each with its BN, summed. Minimal form: one k×k conv with the block's stride, padding and groups."""

    def __init__(self, cin, cout, k, stride=1, padding=None, groups=1, internal=None):
        super().__init__()
        padding = k // 2 if padding is None else padding
        self.dbb_origin = conv_bn(cin, cout, k, stride, padding, groups)
        self.dbb_1x1 = conv_bn(cin, cout, 1, stride, 0, groups)
        self.dbb_avg = nn.Sequential()
        self.dbb_avg.add_module("conv", nn.Conv2d(cin, cout, 1, 1, 0, groups=groups, bias=False))
        self.dbb_avg.add_module("bn", BNAndPad(cout, padding))
        self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride, 0))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(cout))
        internal = cin if internal is None else internal
        self.dbb_1x1_kxk = nn.Sequential()
        if internal == cin:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(cin, groups))
        else:
            self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(cin, internal, 1, 1, 0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn1", BNAndPad(internal, padding))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(internal, cout, k, stride, 0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(cout))

    def forward(self, inputs):
        out = self.dbb_origin(inputs)
        out += self.dbb_1x1(inputs)
        out += self.dbb_avg(inputs)
        out += self.dbb_1x1_kxk(inputs)
        return out


class ACBlock(nn.Module):
    """ACNet's asymmetric conv block (Ding et al. 2019) as its authors write it: k×k + k×1 + 1×k, each with a BN,
    summed; with padding < k//2 the k×1 / 1×k inputs are cropped by k//2 − padding so that their windows line up
    with the k×k branch. Minimal form: one k×k conv with the block's padding and stride."""

    def __init__(self, cin, cout, k, stride=1, padding=0, groups=1):
        super().__init__()
        self.square_conv = nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False)
        self.square_bn = nn.BatchNorm2d(cout)
        if padding - k // 2 >= 0:
            self.crop = 0
            hor_padding, ver_padding = [padding - k // 2, padding], [padding, padding - k // 2]
        else:
            self.crop = k // 2 - padding
            hor_padding, ver_padding = [0, padding], [padding, 0]
        self.ver_conv = nn.Conv2d(cin, cout, (k, 1), stride, ver_padding, groups=groups, bias=False)
        self.hor_conv = nn.Conv2d(cin, cout, (1, k), stride, hor_padding, groups=groups, bias=False)
        self.ver_bn, self.hor_bn = nn.BatchNorm2d(cout), nn.BatchNorm2d(cout)

    def forward(self, x):
        square = self.square_bn(self.square_conv(x))
        if self.crop > 0:
            ver_input = x[:, :, :, self.crop:-self.crop]
            hor_input = x[:, :, self.crop:-self.crop, :]
        else:
            ver_input = hor_input = x
        return square + self.ver_bn(self.ver_conv(ver_input)) + self.hor_bn(self.hor_conv(hor_input))


def dbb_net(channels: int = 16, k: int = 3) -> nn.Module:
    """A small DBB network: stem DBB (stride 2), two DBB blocks, each followed by ReLU. Minimal form: 3 convs."""
    return nn.Sequential(DiverseBranchBlock(3, channels, k, stride=2), nn.ReLU(),
                         DiverseBranchBlock(channels, channels, k), nn.ReLU(),
                         DiverseBranchBlock(channels, 2 * channels, k, internal=2 * channels), nn.ReLU())


def acnet_net(channels: int = 16, k: int = 3) -> nn.Module:
    """A small ACNet network with padding < k//2 in every block (so each crops), ReLU between. Minimal form: 3 convs."""
    return nn.Sequential(ACBlock(3, channels, k, stride=2, padding=0), nn.ReLU(),
                         ACBlock(channels, channels, k, padding=0), nn.ReLU(),
                         ACBlock(channels, channels, 5, padding=1), nn.ReLU())


class RepMLPBlock(nn.Module):
    """RepMLPNet's block (Ding et al. 2022) as its authors write it, without its global perceptron (a gate, not
    linear): the (B, C, H, W) input is cut into (h, w) partitions, moved to (B·N·C/S, S, h, w) (S share-sets);
    the partition perceptron is a grouped 1×1 conv over the flattened (·, S·h·w, 1, 1) with a BN over the S
    share-sets after it; local perceptrons (k×k conv + BN per k, groups S) run on the same partition tensor and
    are added to the FC's output; the sum is moved back with ``reshape(*x.size())`` (symbolic tracing fails on
    that, the concrete capture takes over). Minimal form: the grouped 1×1 conv alone (plus the reshapes and
    permutes), its weight the FC's plus each conv written as a matrix on the flattened partition."""

    def __init__(self, channels: int, h: int, w: int, reparam_conv_k=(1, 3), num_sharesets: int = 1):
        super().__init__()
        self.C, self.S, self.h, self.w = channels, num_sharesets, h, w
        self.fc3 = nn.Conv2d(h * w * num_sharesets, h * w * num_sharesets, 1, 1, 0, bias=False, groups=num_sharesets)
        self.fc3_bn = nn.BatchNorm2d(num_sharesets)
        self.reparam_conv_k = reparam_conv_k
        for k in reparam_conv_k:
            self.__setattr__(f"repconv{k}", conv_bn(num_sharesets, num_sharesets, k, 1, k // 2, num_sharesets))

    def partition_affine(self, x, h_parts, w_parts):
        fc_inputs = x.reshape(-1, self.S * self.h * self.w, 1, 1)
        out = self.fc3(fc_inputs)
        out = out.reshape(-1, self.S, self.h, self.w)
        out = self.fc3_bn(out)
        out = out.reshape(-1, h_parts, w_parts, self.S, self.h, self.w)
        return out

    def forward(self, inputs):
        origin_shape = inputs.size()
        h_parts = origin_shape[2] // self.h
        w_parts = origin_shape[3] // self.w
        partitions = inputs.reshape(-1, self.C, h_parts, self.h, w_parts, self.w)
        partitions = partitions.permute(0, 2, 4, 1, 3, 5)
        fc3_out = self.partition_affine(partitions, h_parts, w_parts)
        conv_inputs = partitions.reshape(-1, self.S, self.h, self.w)
        conv_out = 0
        for k in self.reparam_conv_k:
            conv_out += self.__getattr__(f"repconv{k}")(conv_inputs)
        conv_out = conv_out.reshape(-1, h_parts, w_parts, self.S, self.h, self.w)
        fc3_out += conv_out
        fc3_out = fc3_out.permute(0, 3, 1, 4, 2, 5)
        return fc3_out.reshape(*origin_shape)


def repmlp_net(channels: int = 8, h: int = 7, sharesets: int = 2) -> nn.Module:
    """A small RepMLP network: a 4×4 stride-4 patch stem, three RepMLP blocks on h×h partitions (local perceptrons
    k = 1, 3) each followed by ReLU. Minimal form: 4 convs (the stem and each block's grouped FC)."""
    blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, 4)]
    for _ in range(3):
        blocks += [RepMLPBlock(channels, h, h, (1, 3), sharesets), nn.ReLU()]
    return nn.Sequential(*blocks)
