"""Acceptance: the published reparameterizable blocks fuse to their single-branch form, in 1d/2d/3d.

RepVGG (3×3-BN + 1×1-BN + BN identity, ReLU) → conv + ReLU, also strided and grouped; ACNet
(k×k + 1×k + k×1, each with BN) → one conv; DBB with an avg-pool branch → one conv; MobileOne
(over-parameterized depthwise then pointwise stages) → two convs. Equivalence: ≤ 1e-5 relative in
fp32 (against the float64 original), ≤ 1e-10 in fp64; bf16/fp16 models keep their dtype.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import reparam
from reparam.frontends.fx.dropin import forward_graph

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
SIZE = {1: 12, 2: 9, 3: 6}


def conv_bn(nd, cin, cout, k, stride=1, padding=0, groups=1):
    return nn.Sequential(CONV[nd](cin, cout, k, stride, padding, groups=groups, bias=False), BN[nd](cout))


class RepVGG(nn.Module):
    def __init__(self, nd=2, cin=4, cout=4, stride=1, groups=1):
        super().__init__()
        self.dense = conv_bn(nd, cin, cout, 3, stride, 1, groups)
        self.one = conv_bn(nd, cin, cout, 1, stride, 0, groups)
        self.skip = BN[nd](cin) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.dense(x) + self.one(x)
        if self.skip is not None:
            y = y + self.skip(x)
        return self.act(y)


class ACNet(nn.Module):
    """k×k plus, per axis, a kernel that is k long on that axis and 1 on the others (1×3, 3×1 in 2d)."""

    def __init__(self, nd=2, cin=4, cout=6, k=3):
        super().__init__()
        self.square = conv_bn(nd, cin, cout, k, 1, k // 2)
        self.axes = nn.ModuleList()
        for axis in range(nd):
            ks = tuple(k if a == axis else 1 for a in range(nd))
            pad = tuple(k // 2 if a == axis else 0 for a in range(nd))
            self.axes.append(conv_bn(nd, cin, cout, ks, 1, pad))

    def forward(self, x):
        y = self.square(x)
        for branch in self.axes:
            y = y + branch(x)
        return y


class DBB(nn.Module):
    """3×3-BN + 1×1-BN + (1×1 without bias → AvgPool(3, 1, 1) → BN) + (1×1 without bias → 3×3 → BN)."""

    def __init__(self, nd=2, cin=4, cout=6):
        super().__init__()
        self.square = conv_bn(nd, cin, cout, 3, 1, 1)
        self.one = conv_bn(nd, cin, cout, 1)
        self.avg = nn.Sequential(CONV[nd](cin, cout, 1, bias=False), POOL[nd](3, 1, 1), BN[nd](cout))
        self.chain = nn.Sequential(CONV[nd](cin, cout, 1, bias=False), CONV[nd](cout, cout, 3, 1, 1, bias=False),
                                   BN[nd](cout))

    def forward(self, x):
        return self.square(x) + self.one(x) + self.avg(x) + self.chain(x)


class MobileOneStage(nn.Module):
    """Branches conv_bn(k)×n + conv_bn(1) scale branch (k > 1) + BN skip, then ReLU."""

    def __init__(self, nd, cin, cout, k, groups, n=4):
        super().__init__()
        self.branches = nn.ModuleList(conv_bn(nd, cin, cout, k, 1, k // 2, groups) for _ in range(n))
        self.scale = conv_bn(nd, cin, cout, 1, 1, 0, groups) if k > 1 else None
        self.skip = BN[nd](cin) if cin == cout else None
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.branches[0](x)
        for b in self.branches[1:]:
            y = y + b(x)
        if self.scale is not None:
            y = y + self.scale(x)
        if self.skip is not None:
            y = y + self.skip(x)
        return self.act(y)


class MobileOne(nn.Module):
    def __init__(self, nd=2, c=4):
        super().__init__()
        self.depthwise = MobileOneStage(nd, c, c, 3, groups=c)
        self.pointwise = MobileOneStage(nd, c, c, 1, groups=1)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so every fold is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen))
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen))
    return model.eval()


def call_kinds(gm: nn.Module) -> list[str]:
    """The fused model's call nodes, as module class names or function names, in order."""
    gm = forward_graph(gm)
    mods = dict(gm.named_modules())
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out.append(type(mods[n.target]).__name__)
        elif n.op in ("call_function", "call_method"):
            out.append(getattr(n.target, "__name__", str(n.target)))
    return out


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max())


def example(nd, c, seed=1, batch=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, c, *(SIZE[nd],) * nd, generator=gen, dtype=torch.float64)


def check_fp32_fp64(make, x64, structure):
    """fp32: the fused fp32 model against the float64 original; fp64: a model built and fused in float64."""
    model = randomize(make())
    before = copy.deepcopy(model.state_dict())
    fused, report = reparam.fuse(model, x64.float(), report=True)
    assert call_kinds(fused) == structure, report.summary()
    assert not report.refusals or report.rules_fired  # the blocks fuse: something fired
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x64)
        got = fused(x64.float())
    assert got.dtype == torch.float32
    assert rel(got, want) <= 1e-5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "fuse modified its input"

    model64 = randomize(make()).double()
    fused64, report64 = reparam.fuse(model64, x64, report=True)
    assert call_kinds(fused64) == structure
    assert all(p.dtype == torch.float64 for p in fused64.parameters())
    assert report64.verification.error_fp64 <= 1e-10
    with torch.no_grad():
        assert rel(fused64(x64), model64(x64)) <= 1e-10
    return report


CONV_NAME = {nd: CONV[nd].__name__ for nd in (1, 2, 3)}


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_repvgg(nd):
    report = check_fp32_fp64(lambda: RepVGG(nd), example(nd, 4), [CONV_NAME[nd], "ReLU"])
    fired = report.fired_counts()
    assert fired.get("conv_bn_fold") and fired.get("identity_to_conv") and fired.get("parallel_sum_pad")


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_repvgg_stride2_no_identity(nd):
    check_fp32_fp64(lambda: RepVGG(nd, 4, 6, stride=2), example(nd, 4), [CONV_NAME[nd], "ReLU"])


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_repvgg_grouped(nd):
    report = check_fp32_fp64(lambda: RepVGG(nd, 4, 4, groups=2), example(nd, 4), [CONV_NAME[nd], "ReLU"])
    fused = reparam.fuse(randomize(RepVGG(nd, 4, 4, groups=2)), example(nd, 4).float())
    convs = [m for m in fused.modules() if isinstance(m, CONV[nd])]
    assert [c.groups for c in convs] == [2], report.summary()


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_repvgg_grouped_stride2(nd):
    check_fp32_fp64(lambda: RepVGG(nd, 4, 8, stride=2, groups=4), example(nd, 4), [CONV_NAME[nd], "ReLU"])


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_acnet(nd):
    check_fp32_fp64(lambda: ACNet(nd), example(nd, 4), [CONV_NAME[nd]])


def test_acnet_5x5():
    check_fp32_fp64(lambda: ACNet(2, k=5), example(2, 4), ["Conv2d"])


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_dbb(nd):
    report = check_fp32_fp64(lambda: DBB(nd), example(nd, 4), [CONV_NAME[nd]])
    assert report.fired_counts().get("avgpool_to_conv")


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_mobileone(nd):
    check_fp32_fp64(lambda: MobileOne(nd), example(nd, 4), [CONV_NAME[nd], "ReLU", CONV_NAME[nd], "ReLU"])


def test_mobileone_kernel_shapes():
    fused = reparam.fuse(randomize(MobileOne(2, 6)), example(2, 6).float())
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.groups) for c in convs] == [((3, 3), 6), ((1, 1), 1)]


LOW = {torch.bfloat16: 5e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", ["repvgg", "acnet", "dbb", "mobileone"])
def test_low_precision_keeps_dtype(block, dtype):
    make = {"repvgg": lambda: RepVGG(2), "acnet": lambda: ACNet(2), "dbb": lambda: DBB(2),
            "mobileone": lambda: MobileOne(2)}[block]
    model = randomize(make())
    reference = copy.deepcopy(model).double()
    low = copy.deepcopy(model).to(dtype)
    x64 = example(2, 4)
    fused, report = reparam.fuse(low, x64.to(dtype), report=True)
    params = list(fused.parameters())
    assert params and all(p.dtype == dtype for p in params)
    assert all(b.dtype == dtype for b in fused.buffers() if b.is_floating_point())
    assert all(p.dtype == dtype for p in low.parameters())  # the input model is untouched
    assert report.verification.passed
    with torch.no_grad():
        got = fused(x64.to(dtype))
        want = reference(x64)
        baseline = low(x64.to(dtype))
    assert got.dtype == dtype
    # the fused low-precision model is about as close to the float64 model as the unfused one
    assert rel(got, want) <= LOW[dtype]
    assert rel(got, want) <= 4 * rel(baseline, want) + LOW[dtype] / 10
