"""Capture beyond symbolic tracing: in-place writes, index writes, size arithmetic, shape-only second uses and
weights computed in forward all fuse to the plain form of their block (stated per test), verified in float64,
in the model's own dtype with and without verification."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

import reparam
from reparam.frontends.fx.counting import count_model, count_run
from reparam.frontends.fx.dropin import forward_graph
from tests.randomized import randomize as randomize_batchnorms


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    return randomize_batchnorms(module, seed).eval()


def fused_counts(model, x, **kw):
    fused, rep = reparam.fuse(model, x, report=True, **kw)
    assert rep.verification.passed and rep.verification.error_fp64 <= 1e-9, rep.summary()
    return fused, rep, count_model(fused)


class InPlaceScale(nn.Module):
    """Minimal form: one conv with weights and bias ×2."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        y.mul_(2.0)
        return y


def test_in_place_method_is_not_pruned():
    model = InPlaceScale().eval()
    x = torch.randn(2, 3, 8, 8)
    fused, rep, counts = fused_counts(model, x)
    assert (counts.convs, counts.ops) == (1, 1)
    conv = next(m for m in fused.modules() if isinstance(m, nn.Conv2d))
    torch.testing.assert_close(conv.weight, model.conv.weight * 2)
    assert any("captured on the example inputs" in n for n in rep.notes)


class InPlaceRepVGG(nn.Module):
    """RepVGG written with in-place adds (``out += ...``, ``add_``) and an in-place ReLU.
    Minimal form: one 3×3 conv, then the ReLU."""

    def __init__(self, c=4):
        super().__init__()
        self.k3 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.k1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.id = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.k3(x)
        out += self.k1(x)
        out.add_(self.id(x))
        return out.relu_()


class KeywordRepVGG(InPlaceRepVGG):
    """The same block with keyword operands. Minimal form: one 3×3 conv, then the ReLU."""

    def forward(self, x):
        return F.relu(torch.sub(torch.add(self.k3(x), other=self.k1(x)), other=self.id(x).neg()))


@pytest.mark.parametrize("cls", [InPlaceRepVGG, KeywordRepVGG])
def test_in_place_and_keyword_variants_fuse_like_the_plain_block(cls):
    model = randomize(cls())
    _, _, counts = fused_counts(model, torch.randn(2, 4, 8, 8))
    assert (counts.convs, counts.bns) == (1, 0)


class IndexWrite(nn.Module):
    """A conv → BN whose output gets a constant written into its first rows. Minimal form: one conv, the write."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        y[:, :, 0:1, :] = 0.5
        return y


def test_index_write_is_functionalized():
    model = randomize(IndexWrite())
    fused, _, counts = fused_counts(model, torch.randn(2, 3, 8, 8))
    assert (counts.convs, counts.bns) == (1, 0)
    names = [n for n, m in forward_graph(fused).named_modules() if isinstance(m, nn.Conv2d)]
    assert names == ["bn"] or names == ["conv"], names  # named after the module it came from


class SizeArithmetic(nn.Module):
    """OREPA-style: the kernel is built in forward from branch parameters (an einsum with a basis, a scaled
    copy), with Python arithmetic on a parameter size; then a BN. Minimal form: one plain 3×3 conv."""

    def __init__(self, c=4, groups=2):
        super().__init__()
        self.groups = groups
        self.w = nn.Parameter(torch.randn(c, c // groups, 3, 3) * 0.2)
        self.a = nn.Parameter(torch.randn(c, c // groups, 5) * 0.2)
        self.basis = nn.Parameter(torch.randn(5, 3, 3) * 0.2)
        self.s = nn.Parameter(torch.rand(c) + 0.5)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        per_group = int(self.w.size(0) / self.groups)
        k = torch.einsum("oib,bhw->oihw", self.a, self.basis) + self.w * self.s.view(-1, 1, 1, 1)
        k = k.reshape(self.groups, per_group, *k.shape[1:]).reshape(k.shape)
        return self.bn(F.conv2d(x, k, None, 1, 1, 1, self.groups))


def test_kernel_built_in_forward_with_size_arithmetic_becomes_one_conv():
    model = randomize(SizeArithmetic())
    fused, _, counts = fused_counts(model, torch.randn(2, 4, 8, 8))
    assert (counts.convs, counts.bns) == (1, 0)
    assert counts.params == 4 * 2 * 3 * 3 + 4  # the branch parameters are gone: the trained kernel and a bias


class WithInPlaceBlock(nn.Module):
    """A drop-in model (a method besides forward) whose block writes in place: ``head(bn(conv(x)).mul_(2))``.
    Minimal form: one conv. The block is fused at its boundary as captured on the example inputs, never as its
    symbolic trace (which would drop the write)."""

    def __init__(self):
        super().__init__()
        self.block = InPlaceBlock()
        self.head = nn.Conv2d(4, 2, 1)

    def features(self, x):
        return self.block(x)

    def forward(self, x):
        return self.head(self.block(x))


class InPlaceBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        y.mul_(2.0)
        return y


@pytest.mark.parametrize("verify", [False, True])
def test_a_submodule_that_writes_in_place_is_never_misread(verify):
    model = randomize(WithInPlaceBlock())
    x = torch.randn(2, 3, 8, 8)
    fused = reparam.fuse(model, x, verify=verify)
    with torch.no_grad():
        for method in ("forward", "features"):
            want, got = getattr(model, method)(x), getattr(fused, method)(x)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (count_run(fused, (x,)).convs, count_run(fused, (x,)).bns) == (1, 0)


class ShapeOnlyUse(nn.Module):
    """LeViT's ``bn(lin(x).flatten(0, 1)).reshape_as(lin(x))``. Minimal form: the Linear alone."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 8, bias=False)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        y = self.lin(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


def test_a_shape_only_use_is_not_a_consumer():
    model = randomize(ShapeOnlyUse())
    _, _, counts = fused_counts(model, torch.randn(2, 5, 6))
    assert (counts.linears, counts.bns) == (1, 0)


class AssertedRank(nn.Module):
    """timm's norm layers: ``torch._assert(y.ndim == 4)`` before ``F.batch_norm(y)``. Minimal form: one conv.
    The shape query only feeds an assert (pruned before rewriting), so symbolic tracing reads the whole model:
    no concrete capture, and the deploy graph keeps a free batch size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        torch._assert(y.ndim == 4, "expected a 4-d input")
        return F.batch_norm(y, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias)


def test_a_shape_query_that_only_feeds_an_assert_keeps_symbolic_tracing():
    model = randomize(AssertedRank())
    fused, rep, counts = fused_counts(model, torch.randn(2, 3, 8, 8))
    assert (counts.convs, counts.bns) == (1, 0)
    assert not any("on the example inputs" in n for n in rep.notes), rep.notes
    other = torch.randn(5, 3, 6, 6)  # another batch size and image size
    with torch.no_grad():
        torch.testing.assert_close(fused(other), model(other), rtol=1e-5, atol=1e-5)


class Reshaped(nn.Module):
    """``bn(y.reshape(*y.size()))``. Minimal form: one conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y.reshape(*y.size()))


def test_reshape_by_unpacked_sizes():
    _, _, counts = fused_counts(randomize(Reshaped()), torch.randn(2, 3, 5, 5))
    assert (counts.convs, counts.bns) == (1, 0)


class ComputedWeight(nn.Module):
    """``F.conv2d(x, w * 0.5 + 0.1 * m)`` with a parameter w and a buffer m. Minimal form: one plain conv."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.register_buffer("m", torch.rand(4, 1, 1, 1))

    def forward(self, x):
        return F.conv2d(x, self.w * 0.5 + 0.1 * self.m)


class WeightNormBN(nn.Module):
    """A weight-normalized conv (torch.nn.utils.parametrizations) then a BN. Minimal form: one plain conv."""

    def __init__(self):
        super().__init__()
        self.conv = weight_norm(nn.Conv2d(3, 4, 3, padding=1))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


class Symmetric(nn.Module):
    def forward(self, w):
        return (w + w.transpose(0, 1)) / 2


class Parametrized(nn.Module):
    """A conv with a user parametrization of its weight. Minimal form: one plain conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        parametrize.register_parametrization(self.conv, "weight", Symmetric())

    def forward(self, x):
        return self.conv(x)


class LoRA(nn.Module):
    """``F.linear(x, W + B @ A, b)``. Minimal form: one Linear."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 6)
        self.A = nn.Parameter(torch.randn(2, 8) * 0.1)
        self.B = nn.Parameter(torch.randn(6, 2) * 0.1)

    def forward(self, x):
        return F.linear(x, self.lin.weight + self.B @ self.A, self.lin.bias)


def _std_conv():
    from timm.layers import ScaledStdConv2d, StdConv2d

    class StdConvs(nn.Module):
        """timm's weight-standardized convs, a 3×3 then a 1×1. Minimal form: one plain 3×3 conv (the 1×1
        composes with it once both weights are constants)."""

        def __init__(self):
            super().__init__()
            self.a = StdConv2d(3, 4, 3, padding=1)
            self.b = ScaledStdConv2d(4, 4, 1)

        def forward(self, x):
            return self.b(self.a(x))

    return StdConvs()


COMPUTED = {"computed": (ComputedWeight, (2, 3, 8, 8), "convs", 1), "weight_norm": (WeightNormBN, (2, 3, 8, 8), "convs", 1),
            "parametrize": (Parametrized, (2, 4, 8, 8), "convs", 1), "lora": (LoRA, (2, 8), "linears", 1),
            "std_conv": (_std_conv, (2, 3, 8, 8), "convs", 1)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(COMPUTED))
def test_weights_computed_in_forward_are_folded_in_the_model_dtype(case, dtype):
    build, shape, kind, n = COMPUTED[case]
    model = randomize(build()).to(dtype)
    x = torch.randn(shape).to(dtype)
    fused, rep, counts = fused_counts(model, x)
    assert getattr(counts, kind) == n and counts.ops == n and counts.bns == 0, fused.code
    for f in (fused, reparam.fuse(model, x, verify=False)):
        tensors = [t for t in [*f.parameters(), *f.buffers()] if t.is_floating_point()]
        assert tensors and all(t.dtype == dtype for t in tensors)
        assert f(x).dtype == dtype
    layers = [m for m in fused.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert all(type(m) in (nn.Conv2d, nn.Linear) and not parametrize.is_parametrized(m) for m in layers)


class Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class ControlFlowAroundInPlace(nn.Module):
    """Data-dependent control flow at the root; a child that symbolic tracing reads wrongly (in place)."""

    def __init__(self):
        super().__init__()
        self.block = InPlaceScale()
        self.gate = Gate()

    def forward(self, x):
        y = self.block(x)
        if y.mean() > 100:
            y = y * 0
        return self.gate(y)


def test_data_dependent_control_flow_keeps_capturable_regions_fused():
    model = ControlFlowAroundInPlace().eval()
    fused, rep, _ = fused_counts(model, torch.randn(2, 3, 8, 8))
    assert "" in rep.opaque and "on the example inputs" in rep.opaque[""]
    assert isinstance(fused.block.get_submodule("conv"), nn.Conv2d)
    assert any("'block'" in n for n in rep.notes)


class Loop(nn.Module):
    """A conv called twice and a conv → BN pair, behind data-dependent control flow."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.pair = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))

    def forward(self, x):
        for _ in range(2):
            x = self.conv(x)
        if x.mean() > 100:
            x = -x
        return self.pair(x)


def test_counts_count_what_runs():
    model = randomize(Loop())
    _, rep, _ = fused_counts(model, torch.randn(1, 3, 8, 8))
    assert (rep.before.convs, rep.before.bns) == (3, 1)  # the module list has 2 convs; 3 run
    assert (rep.after.convs, rep.after.bns) == (3, 0)


def test_counts_are_the_same_for_every_form():
    from reparam.frontends.fx.counting import count_run

    x = torch.randn(2, 3, 8, 8)
    module = ComputedWeight().eval()
    plain = nn.Conv2d(3, 4, 3, bias=False).eval()
    computed, fused, conv = (count_run(m, (x,)) for m in (module, reparam.fuse(module, x), plain))
    assert (conv.ops, conv.convs) == (fused.ops, fused.convs) == (1, 1)
    assert (computed.ops, computed.convs) == (4, 1)  # w * 0.5, 0.1 * m, their sum, the conv: all run
