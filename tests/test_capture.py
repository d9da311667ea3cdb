"""Capture: functional forms are recognized, untraceable models are fused region by region, the input
model is never touched, and end-to-end verification names the rewrite that broke a model."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reparam
from reparam.ops import Conv
from reparam.pattern import P, X
from reparam.report import count_model


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.3)
    return module


class FunctionalBlock(nn.Module):
    """A RepVGG/ACNet-like block written only with functional calls on parameters and buffers."""

    def __init__(self, c=6):
        super().__init__()
        self.w3 = nn.Parameter(torch.randn(c, c, 3, 3) * 0.2)
        self.w13 = nn.Parameter(torch.randn(c, c, 1, 3) * 0.2)
        self.w1 = nn.Parameter(torch.randn(c, c, 1, 1) * 0.2)
        self.b1 = nn.Parameter(torch.randn(c) * 0.1)
        self.register_buffer("mean", torch.randn(c) * 0.1)
        self.register_buffer("var", torch.rand(c) + 0.5)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.beta = nn.Parameter(torch.randn(c) * 0.1)
        self.scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x):
        a = F.batch_norm(F.conv2d(x, self.w3, None, 1, 1), self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-5)
        b = F.conv2d(F.pad(x, (1, 1, 0, 0)), self.w13)  # explicit pad: width first
        c = F.conv2d(x, self.w1, self.b1)
        parts = torch.chunk(a + b - c * 0.5 + x, 2, dim=1)
        y = torch.cat([parts[0] * 2.0, parts[1] / 4.0], dim=1)
        return F.relu(y * self.scale)


def test_functional_forms_fuse_to_one_conv():
    model = FunctionalBlock().double().eval()
    x = torch.randn(2, 6, 9, 11, dtype=torch.float64)
    fused, rep = reparam.fuse(model, x, report=True)
    assert rep.verification.passed and rep.verification.error_fp64 < 1e-12
    assert count_model(fused).convs == 1, fused.graph
    fired = rep.fired_counts()
    assert fired.get("pad_fold") == 1 and fired.get("identity_to_conv") == 1
    torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)


class Gate(nn.Module):
    """Data-dependent control flow: not traceable by torch.fx."""

    def forward(self, x):
        return x if x.sum() > 0 else -x


class Untraceable(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.gate = Gate()
        self.block2 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        x = self.block1(x)
        if x.mean() > 100:  # data-dependent: the root cannot be traced
            x = x * 0
        return self.block2(self.gate(x))


def test_untraceable_model_fuses_its_traceable_parts():
    model = randomize(Untraceable()).eval()
    x = torch.randn(1, 4, 8, 8)
    fused, rep = reparam.fuse(model, x, report=True)
    assert "control flow" in rep.opaque[""]  # the root is named as opaque, with torch.fx's reason
    assert isinstance(fused.block1, torch.fx.GraphModule) and isinstance(fused.block2, torch.fx.GraphModule)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert rep.verification.passed
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-6)


def test_input_model_untouched_and_training_mode_reported():
    model = randomize(Untraceable()).train()
    state = copy.deepcopy(model.state_dict())
    fused, rep = reparam.fuse(model, torch.randn(1, 4, 8, 8), report=True)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert any("training mode" in n for n in rep.notes)
    assert not fused.training
    own = {id(p) for p in model.parameters()}
    assert not any(id(p) in own for p in fused.parameters())


def test_example_input_is_guessed_when_missing():
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8))).eval()
    fused, rep = reparam.fuse(model, report=True)
    assert rep.verification.passed and rep.verification.input_shapes == [[1, 3, 224, 224]]
    assert any("guessed" in n for n in rep.notes)
    assert count_model(fused).bns == 0


@reparam.rule(P(Conv, X("x"), name="conv"), name="wrong_bias")
def wrong_bias(x, conv):
    """conv(x) → conv(x) + 1 (deliberately wrong, for the verifier to catch)."""
    if conv.op.bias is not None and float(conv.op.bias[0]) == 123.0:
        return None
    bias = torch.full((conv.op.out_channels,), 123.0, dtype=torch.float64)
    return conv.op.with_(bias=bias)(x)


def test_local_check_rejects_a_wrong_rule():
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    with pytest.raises(reparam.RewriteMismatch, match="wrong_bias"):
        reparam.fuse(model, torch.randn(1, 3, 8, 8), extra_rules=[wrong_bias])


def test_end_to_end_verification_names_the_wrong_rewrite():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1)).eval()
    with pytest.raises(reparam.VerificationError, match="wrong_bias") as err:
        reparam.fuse(model, torch.randn(1, 3, 8, 8), extra_rules=[wrong_bias], check=False)
    assert err.value.rewrite and "wrong_bias" in err.value.rewrite


def test_bad_input_shape_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    with pytest.raises(reparam.CaptureError, match="shape"):
        reparam.fuse(model, torch.randn(1, 5, 8, 8))


class ArithmeticForms(nn.Module):
    """Every operand order of add/sub with alpha, mul and div, by a scalar and by a per-channel constant,
    each on its own conv, so that every one is folded into that conv's weights."""

    FORMS = [
        lambda y, k: torch.add(k, y, alpha=0.3), lambda y, k: torch.add(y, k, alpha=-1.5),
        lambda y, k: torch.sub(k, y, alpha=2.5), lambda y, k: torch.sub(y, k, alpha=0.7),
        lambda y, k: torch.add(0.25, y, alpha=3.0), lambda y, k: 1.5 - y, lambda y, k: y / k,
        lambda y, k: 0.5 * y, lambda y, k: y * k, lambda y, k: y - 0.1, lambda y, k: -y,
    ]

    def __init__(self, c=4):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in self.FORMS)
        self.register_buffer("k", torch.linspace(0.5, 2.0, c).reshape(1, c, 1, 1))

    def forward(self, x):
        return sum(form(conv(x), self.k) for form, conv in zip(self.FORMS, self.convs))


def test_arithmetic_operand_order_and_alpha_are_read_exactly():
    """``c + α·x`` is not ``x + α·c``: checked with verification off, so only the import is on trial."""
    model = ArithmeticForms().double().eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(model, x, verify=False)
    assert count_model(fused).convs == 1
    torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)
