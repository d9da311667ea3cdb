"""Drop-in deploy models: ``reparam.fuse`` keeps the model's class, attributes and methods; forward runs no more
convs or BatchNorms than the whole fused graph (and than timm's own ``reparameterize_model``)."""
from __future__ import annotations

import io

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import reparam
from reparam.frontends.fx import dropin
from reparam.frontends.fx.counting import count_run

timm = pytest.importorskip("timm")
from timm.utils.model import reparameterize_model  # noqa: E402

TIMM_MODELS = ["repvit_m0_9", "fastvit_t8", "mobileone_s0", "repghostnet_050", "efficientvit_m0"]
SIZE = 64  # the smallest size all five take (efficientvit_m0's attention needs 64)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def close(got, want, tol=1e-5) -> bool:
    got, want = ([t.detach() for t in v] if isinstance(v, (list, tuple)) else [v.detach()] for v in (got, want))
    return len(got) == len(want) and all(
        g.shape == w.shape and float((g - w).abs().max()) <= tol * max(float(w.abs().max()), 1e-30)
        for g, w in zip(got, want))


def runs(model: nn.Module, x) -> tuple[int, int, int]:
    """The convs, BatchNorms and Linear products ``model`` runs on ``x``."""
    c = count_run(model, (x,))
    return c.convs, c.bns, c.linears


def roundtrip(model: nn.Module) -> nn.Module:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_model_keeps_its_class_and_methods(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    fused = reparam.fuse(model, x, verify=False)
    assert isinstance(fused, type(model))
    for attr in ("pretrained_cfg", "num_classes", "num_features"):
        assert getattr(fused, attr) == getattr(model, attr)
    with torch.no_grad():
        assert close(fused(x), model(x))
        feats = model.forward_features(x)
        assert close(fused.forward_features(x), feats)
        assert close(fused.forward_head(feats), model.forward_head(feats))
        assert close(fused.forward_head(feats, pre_logits=True), model.forward_head(feats, pre_logits=True))
        assert close(fused.forward_intermediates(x, intermediates_only=True),
                     model.forward_intermediates(x, intermediates_only=True))
    ours, theirs = count_run(fused, (x,)), count_run(reparameterize_model(model), (x,))
    assert ours.convs <= theirs.convs and ours.bns <= theirs.bns, (ours, theirs)
    whole = reparam.fuse(model, x, verify=False, keep_class=False)  # a GraphModule when traced whole
    ours, graph = count_run(fused, (x,)), count_run(whole, (x,))
    assert ours.convs <= graph.convs and ours.bns <= graph.bns, (ours, graph)
    again = roundtrip(fused)
    assert isinstance(again, type(model)) and close(again(x), fused(x), 0)
    assert type(model).__name__ in repr(fused)


@pytest.mark.parametrize("name", ["mobileone_s0", "repghostnet_050"])
def test_timm_features_only(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, features_only=True).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    fused = reparam.fuse(model, x)
    assert isinstance(fused, type(model))
    assert fused.feature_info.channels() == model.feature_info.channels()
    with torch.no_grad():
        assert close(fused(x), model(x))
    ours, theirs = count_run(fused, (x,)), count_run(reparameterize_model(model), (x,))
    assert ours.convs <= theirs.convs and ours.bns <= theirs.bns, (ours, theirs)


class Stem(nn.Module):
    """A conv and its BatchNorm as siblings of the root (timm's repghostnet), plus methods that observe
    the blocks: the fold of bn1 into conv_stem crosses the boundary between two regions."""

    def __init__(self):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)),
                                    nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)))
        self.width = 8

    def forward_features(self, x):
        return self.blocks(self.bn1(self.conv_stem(x)))

    def forward_intermediates(self, x):
        x = self.bn1(self.conv_stem(x))
        out = []
        for block in self.blocks:
            x = block(x)
            out.append(x)
        return out

    def forward(self, x):
        return self.forward_features(x).mean((2, 3))


def randomized(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
    return model.eval()


def test_whole_graph_installed_when_it_folds_across_boundaries():
    model = randomized(Stem())
    x = torch.randn(2, 3, 8, 8)
    fused, rep = reparam.fuse(model, x, report=True)
    assert isinstance(fused, Stem) and fused.width == 8
    assert dropin.installed_graph(fused) is not None
    whole = reparam.fuse(model, x, keep_class=False)
    assert runs(fused, x) == runs(whole, x) and runs(fused, x)[1] == 0
    assert any("forward runs the whole fused graph" in n for n in rep.notes)
    with torch.no_grad():
        assert close(fused(x), model(x))
        assert close(fused.forward_features(x), model.forward_features(x))
        assert close(fused.forward_intermediates(x), model.forward_intermediates(x))
    again = roundtrip(fused)
    assert dropin.installed_graph(again) is not None and close(again(x), fused(x), 0)
    assert close(copy_of(fused)(x), fused(x), 0)
    # a method that rebuilds a submodule: the graph no longer describes the model, its own forward runs
    fused.blocks[1] = nn.Identity()
    model.blocks[1] = nn.Identity()
    assert dropin.installed_graph(fused) is None
    with torch.no_grad():
        assert close(fused(x), model(x))
    assert dropin.installed_graph(roundtrip(fused)) is None


class BlockThenNorm(nn.Module):
    """``bn2(block(x))`` with ``block = Sequential(conv, bn1)``: the block is fused on its own (its conv absorbs
    bn1), then the whole graph over it folds bn2 into that fused conv. Minimal form: one conv."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.bn2 = nn.BatchNorm2d(8)

    def features(self, x):  # a method besides forward: the class is not sealed
        return self.block(x)

    def forward(self, x):
        return self.bn2(self.block(x))


def test_a_fold_across_a_boundary_rounds_once():
    """The whole graph reads the fused block's conv as the float64 values it was rounded from: the installed
    conv is the float32 rounding of the exact fold of both BatchNorms, bit for bit."""
    model = randomized(BlockThenNorm())
    x = torch.randn(2, 3, 8, 8)
    fused, rep = reparam.fuse(model, x, report=True)
    graph = dropin.installed_graph(fused)
    assert graph is not None and rep.verification.error_fp64 <= 1e-13
    convs = [m for m in graph.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and not any(isinstance(m, nn.BatchNorm2d) for m in graph.modules())
    conv, bn1, bn2 = (m.double() for m in copy_of([model.block[0], model.block[1], model.bn2]))
    s1 = bn1.weight / (bn1.running_var + bn1.eps).sqrt()
    s2 = bn2.weight / (bn2.running_var + bn2.eps).sqrt()
    weight = conv.weight * (s1 * s2).view(-1, 1, 1, 1)
    bias = ((conv.bias - bn1.running_mean) * s1 + bn1.bias - bn2.running_mean) * s2 + bn2.bias
    assert torch.equal(convs[0].weight, weight.float()) and torch.equal(convs[0].bias, bias.float())
    with torch.no_grad():
        assert close(fused.features(x), model.features(x))


def copy_of(model):
    import copy
    return copy.deepcopy(model)


def test_a_hook_on_a_submodule_is_honoured():
    model = randomized(Stem())
    x = torch.randn(1, 3, 8, 8)
    fused = reparam.fuse(model, x)
    seen = []
    fused.blocks[0].register_forward_hook(lambda m, a, out: seen.append(out.shape))
    with torch.no_grad():
        assert close(fused(x), model(x))
    assert seen == [torch.Size([1, 8, 8, 8])]


class Aliased(Stem):
    """Stem holding its first block at a second path too, which only another method calls."""

    def __init__(self):
        super().__init__()
        self.first = self.blocks[0]

    def forward(self, x):
        return self.forward_features(x)

    def first_block(self, x):
        return self.first(x)


def test_a_module_held_at_two_paths_keeps_working_at_both():
    model = randomized(Aliased())
    x, y = torch.randn(1, 3, 8, 8), torch.randn(1, 8, 8, 8)
    fused = reparam.fuse(model, x)
    with torch.no_grad():
        assert close(fused(x), model(x)) and close(fused.first_block(y), model.first_block(y))
        assert close(fused.forward_intermediates(x), model.forward_intermediates(x))


def test_the_attributes_a_fused_region_carries_are_copies():
    model = randomized(Stem())
    model.blocks[0].widths = [8, 8]  # read by code around the region, say
    fused = reparam.fuse(model, torch.randn(1, 3, 8, 8))
    assert isinstance(fused.blocks[0], fx.GraphModule)  # the region, fused
    assert fused.blocks[0].widths == [8, 8] and fused.blocks[0].widths is not model.blocks[0].widths


class ConvBN(nn.Module):
    """No public method but forward: sealed, the graph replaces its children."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.stride = 1

    def forward(self, x):
        return self.bn(self.conv(x))


def test_sealed_class_holds_only_the_graph():
    model = randomized(ConvBN())
    x = torch.randn(1, 3, 8, 8)
    fused = reparam.fuse(model, x)
    assert isinstance(fused, ConvBN) and fused.stride == 1
    assert [n for n, _ in fused.named_children()] == [dropin.GRAPH_NAME]
    assert runs(fused, x) == (1, 0, 0)
    assert close(roundtrip(fused)(x), model(x))
    assert "ConvBN(" in repr(fused)
    exported = torch.export.export(fused, (x,)).module()  # torch.export reads the installed forward
    assert close(exported(x), model(x))


def test_container_stays_a_graph():
    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    fused = reparam.fuse(model, torch.randn(1, 3, 8, 8))
    assert isinstance(fused, fx.GraphModule)


def test_checkpoint_container_roundtrips_through_the_cli(tmp_path):
    from typer.testing import CliRunner

    from reparam.cli.app import app

    torch.manual_seed(0)
    model = timm.create_model("mobileone_s0", pretrained=False).eval()
    ckpt = {"model": model, "epoch": 3, "ema": None, "train_args": {"imgsz": SIZE}}
    src, out = tmp_path / "ckpt.pt", tmp_path / "fused.pt"
    torch.save(ckpt, src)
    result = CliRunner().invoke(app, ["fuse", str(src), "--trust", "-s", f"1,3,{SIZE},{SIZE}", "-o", str(out)])
    assert result.exit_code == 0, result.output
    back = torch.load(out, weights_only=False)
    assert isinstance(back, dict) and back["epoch"] == 3 and back["ema"] is None and back["train_args"] == {"imgsz": SIZE}
    assert isinstance(back["model"], type(model))
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert close(back["model"](x), model(x))
    assert count_run(back["model"], (x,)).bns == 0
