"""Capture: functional forms are recognized, untraceable models are fused region by region, the input
model is never touched, and end-to-end verification names the rewrite that broke a model."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reparam
from reparam.core.ops import Conv
from reparam.core.pattern import P, X
from reparam.frontends.fx.counting import count_model
from tests.randomized import randomize


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


def test_modules_with_hooks_are_kept_with_their_hooks():
    """A hook changes what a module computes; the graph must keep calling it (verification off)."""
    block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    model = randomize(nn.Sequential(block, nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
                                    nn.BatchNorm2d(4))).double().eval()
    block.register_forward_hook(lambda m, args, out: out * 2)  # a non-leaf module: traced through otherwise
    model[2].register_forward_pre_hook(lambda m, args: (args[0] + 1,))
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    fused, rep = reparam.fuse(model, x, verify=False, report=True)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)
    assert any("hooks" in n and "'2'" in n for n in rep.notes)
    assert rep.after.bns == 2  # the hooked BN stays, and the one inside the hooked block


def test_a_submodule_left_in_training_mode_is_reported():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    model[1].train()
    fused, rep = reparam.fuse(model, torch.randn(1, 3, 8, 8), report=True)
    assert any("submodule(s) 1 were in training mode" in n for n in rep.notes), rep.notes
    assert model[1].training and not model.training  # each module's own flag is restored


class Caching(nn.Module):
    """Writes into itself during forward (as attention-bias caches do): tracing must not leave proxies there."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.cache = {}

    def forward(self, x):
        self.cache["last"] = x.shape
        self.calls = getattr(self, "calls", 0) + 1
        return self.bn(self.conv(x))


def test_tracing_leaves_the_model_as_it_was():
    model = randomize(Caching()).eval()
    fused, rep = reparam.fuse(model, torch.randn(1, 3, 8, 8), report=True)
    assert model.cache == {} and not hasattr(model, "calls") and rep.after.bns == 0


class Mixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.window = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), 4

    def forward(self, x):
        return self.bn(self.conv(x))

    def gate(self, x):
        return torch.sigmoid(x.mean())


class ReadsItsChildren(nn.Module):
    """Not traceable as a whole (data-dependent branch); reads an attribute of one child and calls a method
    of another, which a fused GraphModule in their place must still allow."""

    def __init__(self):
        super().__init__()
        self.a, self.b = Mixer(), Mixer()

    def forward(self, x):
        if x.shape[-1] > self.a.window and x.sum() > -1e9:
            x = x + self.a(x)
        return self.b.gate(x) * self.b(x)


def test_regions_keep_what_the_code_around_them_reads():
    model = randomize(ReadsItsChildren()).eval()
    x = torch.randn(1, 4, 8, 8)
    fused, rep = reparam.fuse(model, x, report=True)
    assert rep.verification.passed
    assert fused.a.window == 4 and copy.deepcopy(fused).a.window == 4  # kept across copies too
    assert isinstance(fused.a, torch.fx.GraphModule) and count_model(fused.a).bns == 0
    assert isinstance(fused.b, Mixer) and any("'b': kept as it was" in n for n in rep.notes)


def test_an_affine_along_a_spatial_axis_is_checked_at_its_own_size():
    """A per-column scale is only defined at its width: the local check must not shrink that axis."""
    class ColumnScale(nn.Module):
        def __init__(self, w=7):
            super().__init__()
            self.register_buffer("col", torch.rand(w) + 0.5)

        def forward(self, x):
            return torch.relu(x) * self.col * 2.0

    model = ColumnScale().eval()
    fused, rep = reparam.fuse(model, torch.randn(1, 4, 7, 7), report=True)
    assert rep.fired_counts().get("affine_merge") == 1 and rep.verification.passed


def test_a_misread_operation_is_blamed_on_the_capture_not_on_a_rule(monkeypatch):
    """When the graph is already wrong before any rewrite, no rule is named (bisecting would blame the first
    rewrite that touches the misread node)."""
    from reparam.frontends.fx import importer as fx_import

    real = fx_import._bn_affine
    monkeypatch.setattr(fx_import, "_bn_affine", lambda *a: real(*a).with_(shift=None))
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    with pytest.raises(reparam.VerificationError, match="the capture read .1. wrongly") as info:
        reparam.fuse(model, torch.randn(1, 3, 8, 8))
    assert info.value.rewrite is None


def test_a_correct_capture_has_no_misread_nodes():
    from examples.repnext.model import repnext_m0
    from reparam.frontends.fx.capture import capture
    from reparam.frontends.fx.import_check import misread_nodes

    for model, x in [(randomize(repnext_m0(num_classes=10)).eval(), torch.randn(1, 3, 64, 64)),
                     (FunctionalBlock().eval(), torch.randn(1, 6, 9, 9))]:
        (region,) = capture(model, (x,)).regions
        assert misread_nodes(region.gm) == []


def test_structure_copy_shares_tensors_and_nothing_else():
    from reparam.frontends.module_copy import structure_copy

    model = randomize(nn.Sequential(Caching(), nn.Conv2d(3, 3, 1), nn.utils.parametrizations.weight_norm(
        nn.Conv2d(3, 3, 1)))).eval()
    model[0].table = {"a": [1, 2]}
    model[0].register_forward_hook(lambda m, a, out: out + 1)
    twin = structure_copy(model)
    assert all(a is b for a, b in zip(model.parameters(), twin.parameters()))
    assert all(a is b for a, b in zip(model.buffers(), twin.buffers()))
    assert all(a is not b for a, b in zip(model.modules(), twin.modules()))
    twin[0].table["a"].append(3)
    twin[0].cache["k"] = 1
    assert model[0].table == {"a": [1, 2]} and model[0].cache == {}
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)


def test_a_copy_that_is_only_run_shares_graph_module_graphs_and_nothing_it_writes():
    from reparam.frontends.module_copy import structure_copy

    inner = torch.fx.symbolic_trace(randomize(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))).eval())
    model = nn.Sequential(inner, Caching()).eval()
    twin = structure_copy(model, share_graphs=True)
    assert twin[0] is not inner and twin[0].graph is inner.graph and type(twin[0]) is type(inner)
    assert all(a is b for a, b in zip(model.parameters(), twin.parameters()))
    x = torch.randn(1, 3, 5, 5)
    got = twin(x)
    twin[1].cache["k"] = 1
    twin[0].train()
    assert model[1].cache == {} and not inner.training
    torch.testing.assert_close(got, model(x), rtol=0, atol=0)
    assert structure_copy(model)[0].graph is not inner.graph  # by default a copy may be edited: its own graph
    exported = torch.export.export(nn.Sequential(nn.Conv2d(3, 3, 1)), (x,)).module()  # sets its own train()
    copied = structure_copy(exported, share_graphs=True)
    assert copied.graph is not exported.graph
    copied.eval()


def test_constants_computed_from_parameters_are_folded_in_float64():
    """``sigmoid(α)·(conv(x) − x)`` of a float32 model: the folded constant is the float64 value (what the
    float64 reference computes), and the deploy model keeps float32."""
    class Gated(nn.Module):
        def __init__(self, c=4):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, padding=1)
            self.alpha = nn.Parameter(torch.randn(2, c))

        def forward(self, x):
            gate = torch.sigmoid(self.alpha).view(2, -1, 1, 1)
            return x + gate[0] * (self.conv(x) - x) + gate[1] * x

    model = Gated().eval()
    fused, rep = reparam.fuse(model, torch.randn(1, 4, 8, 8), report=True)
    assert rep.after.convs == 1 and rep.verification.error_fp64 <= 1e-12
    assert all(p.dtype == torch.float32 for p in fused.parameters())
