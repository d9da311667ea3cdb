"""The generic mechanisms third-party model zoos need, each proven in float64 and with a trap it must refuse.

- unread shape asserts and pure calls are dropped before rewriting (``fx_prune``), so ``torch._assert(x.ndim
  == 4)`` in front of an inlined ``F.batch_norm(..., training=False)`` does not pin the conv; an unread in-place
  op is never dropped;
- a term x of a sum is an identity branch whatever op produced x (``x = conv0(y); conv(x) + x``);
- ``x + 0`` / ``0 + x`` (a literal from an unused branch) is x, unless it promotes the dtype;
- RepMixer (``x + γ·(mixer(x) − norm(x))``), a post-sum BatchNorm (RepVggDw), a layer scale after the last conv of
  an MLP and averaged BatchNorm→Linear heads fuse to single convs / one Linear.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import reparam
from reparam.frontends.fx.capture import capture
from reparam.frontends.fx.importer import import_fx
from reparam.frontends.fx.prune import prune_unused
from reparam.frontends.fx.counting import count_model
from reparam.frontends.fx.dropin import forward_graph


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """BN statistics and affine parameters, layer scales: all far from identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("running_var", "var")):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif name.endswith(("running_mean", "mean", "bias", "shift")):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.5)
            elif name.endswith(("gamma", "scale")) or (name.endswith("weight") and t.ndim == 1):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
    return model


def fuse64(model: nn.Module, x: torch.Tensor, seed: int = 0):
    """Fuse a float64, eval-mode, randomized model; check the fused model on a fresh input; return it."""
    model = randomize(model, seed).double().eval()
    x = x.double()
    fused, report = reparam.fuse(model, x, report=True)
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    with torch.no_grad():
        want, got = model(probe), fused(probe)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert float((got - want).abs().max() / want.abs().max().clamp_min(1e-30)) < 1e-12
    return fused, report


def fired(report, rule: str) -> int:
    return sum(e["rule"] == rule for e in report.rules_fired)


def calls(model: nn.Module, *targets) -> int:
    """Calls of ``targets`` in the graph ``model``'s forward runs."""
    return sum(n.op == "call_function" and n.target in targets for n in forward_graph(model).graph.nodes)


# --- unread asserts and pure calls ----------------------------------------------------------------------

class InlinedBatchNorm(nn.Module):
    """A conv then a BatchNorm written the way subclassed BN layers trace: shape assert, keyword F.batch_norm."""

    def __init__(self, cin, cout, k, eps, zero_left, zero_right):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.weight, self.bias = nn.Parameter(torch.ones(cout)), nn.Parameter(torch.zeros(cout))
        self.register_buffer("running_mean", torch.zeros(cout))
        self.register_buffer("running_var", torch.ones(cout))
        self.eps, self.zero_left, self.zero_right = eps, zero_left, zero_right

    def forward(self, x):
        y = self.conv(x)
        torch._assert(y.ndim == 4, "expected a 4-d input")
        torch._assert(y.dim() == 4, "expected a 4-d input")
        y = F.batch_norm(y, self.running_mean, self.running_var, weight=self.weight, bias=self.bias,
                         training=False, momentum=0.1, eps=self.eps)
        out = 0
        if self.zero_left:
            out += y  # traces as add(0, y)
        else:
            out = y
        if self.zero_right:
            out += 0  # traces as add(y, 0)
        return torch.tanh(out)


@given(cin=st.integers(1, 4), cout=st.integers(1, 4), k=st.sampled_from([1, 3, 5]),
       eps=st.sampled_from([1e-5, 1e-3]), zero_left=st.booleans(), zero_right=st.booleans(),
       seed=st.integers(0, 10_000))
def test_assert_before_functional_batchnorm_does_not_block_the_fold(cin, cout, k, eps, zero_left, zero_right, seed):
    fused, report = fuse64(InlinedBatchNorm(cin, cout, k, eps, zero_left, zero_right), torch.randn(1, cin, 7, 6),
                           seed)
    counts = count_model(fused)
    assert (counts.convs, counts.bns) == (1, 0)
    assert calls(fused, torch._assert, F.batch_norm) == 0
    assert fired(report, "conv_bn_fold") == 1


class UnreadInPlace(nn.Module):
    """``y.mul_(2)`` is read by nobody, yet it changes what the BatchNorm sees."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        y.mul_(2)
        return self.bn(y)


def test_unread_in_place_op_is_never_pruned_and_no_wrong_model_comes_out():
    """The symbolic graph would read bn(conv(x)); the capture on the example inputs functionalizes the write, so
    the conv's one reader is the (now out-of-place) mul, and the block fuses to one conv."""
    model = randomize(UnreadInPlace(), 0).double().eval()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    graph, _ = import_fx(capture(model, (x,)).regions[0].gm)
    conv = next(n for n in graph.nodes if n.name == "conv")
    prune_unused(graph)
    assert len(conv.users) == 1 and type(conv.users[0].op).__name__ == "Affine", "the mul_ must stay the conv's reader"
    fused = reparam.fuse(model, x)
    assert count_model(fused).convs == 1
    assert torch.allclose(fused(x), model(x), rtol=1e-12, atol=1e-12)


# --- x itself as a branch, whatever produced x ---------------------------------------------------------

class PostSumNorm(nn.Module):
    """bn(conv_bn(x) + conv_biased(x) + x) with x = conv0(y): RepVggDw-style, kernel k, groups g."""

    def __init__(self, c, k, groups, bias_first):
        super().__init__()
        self.conv0 = nn.Conv2d(3, c, 3, padding=1, bias=bias_first)
        self.conv = nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(c))
        self.conv1 = nn.Conv2d(c, c, 1, groups=groups, bias=True)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, y):
        x = self.conv0(y)
        return self.bn(self.conv(x) + self.conv1(x) + x)


@given(c=st.sampled_from([2, 4, 6]), k=st.sampled_from([3, 5, 7]), depthwise=st.booleans(),
       bias_first=st.booleans(), seed=st.integers(0, 10_000))
def test_identity_branch_of_a_conv_output_merges(c, k, depthwise, bias_first, seed):
    fused, report = fuse64(PostSumNorm(c, k, c if depthwise else 1, bias_first), torch.randn(1, 3, 9, 8), seed)
    counts = count_model(fused)
    assert (counts.convs, counts.bns) == (2, 0)
    assert fired(report, "identity_to_conv") == 1
    assert calls(fused, torch.add, __import__("operator").add) == 0


class StridedOnOnePixel(nn.Module):
    """x + conv_s2(x) on a 1×1 map: shapes agree, but an identity is a stride-1 conv and cannot join it."""

    def __init__(self, c):
        super().__init__()
        self.conv0 = nn.Conv2d(c, c, 1)
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, y):
        x = self.conv0(y)
        return x + self.conv(x)


def test_identity_is_not_turned_into_a_conv_beside_a_strided_branch():
    fused, report = fuse64(StridedOnOnePixel(3), torch.randn(1, 3, 1, 1))
    assert fired(report, "identity_to_conv") == 0
    assert count_model(fused).convs == 2


# --- x + 0 ------------------------------------------------------------------------------------------

class PlusZero(nn.Module):
    def __init__(self, c, where, buffer_dtype):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.where = where
        self.register_buffer("zero", torch.zeros(c, 1, 1, dtype=buffer_dtype))

    def forward(self, x):
        y = torch.tanh(self.conv(x))
        if self.where == "left":
            return 0 + y
        if self.where == "right":
            return y + 0
        if self.where == "minus":
            return y - 0.0
        return y + self.zero


@given(c=st.integers(1, 5), where=st.sampled_from(["left", "right", "minus", "buffer"]), seed=st.integers(0, 999))
def test_adding_zero_is_dropped(c, where, seed):
    fused, report = fuse64(PlusZero(c, where, torch.float64), torch.randn(1, c, 4, 4), seed)
    assert fired(report, "identity_elim") >= 1
    ops = [n for n in forward_graph(fused).graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    assert len(ops) == 2  # conv, tanh


def test_adding_a_zero_that_promotes_the_dtype_stays():
    model = randomize(PlusZero(3, "buffer", torch.float64), 0).eval()  # float32 model + float64 zeros
    x = torch.randn(1, 3, 4, 4)
    fused = reparam.fuse(model, x)
    with torch.no_grad():
        got, want = fused(x), model(x)
    assert want.dtype == got.dtype == torch.float64
    assert torch.equal(got, want)


# --- zoo block structures: RepMixer, layer scale, averaged BN→Linear heads ----------------------------

class RepMixer(nn.Module):
    """x + γ·(mixer(x) − norm(x)); mixer = BN(x) + convbn_1x1(x) + Σ convbn_kxk(x) (depthwise), norm = BN(x)."""

    def __init__(self, c, k, branches):
        super().__init__()
        self.pre = nn.Conv2d(3, c, 1)
        self.id_bn = nn.BatchNorm2d(c)
        self.scale = nn.Sequential(nn.Conv2d(c, c, 1, groups=c, bias=False), nn.BatchNorm2d(c))
        self.kxk = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=False),
                                               nn.BatchNorm2d(c)) for _ in range(branches))
        self.norm = nn.BatchNorm2d(c)
        self.gamma = nn.Parameter(torch.ones(c, 1, 1))

    def forward(self, y):
        x = self.pre(y)
        out = self.id_bn(x) + self.scale(x)
        for branch in self.kxk:
            out = out + branch(x)
        return x + self.gamma * (out - self.norm(x))


@given(c=st.sampled_from([2, 3, 8]), k=st.sampled_from([3, 5]), branches=st.integers(1, 3),
       seed=st.integers(0, 10_000))
def test_repmixer_becomes_one_conv(c, k, branches, seed):
    fused, _ = fuse64(RepMixer(c, k, branches), torch.randn(1, 3, 8, 7), seed)
    counts = count_model(fused)
    assert (counts.convs, counts.bns, counts.ops) == (2, 0, 2)


class LayerScaledMlp(nn.Module):
    """x + γ·fc2(act(fc1(bn(dwconv(x))))): the BN folds back into the dw conv, γ into fc2."""

    def __init__(self, c, k):
        super().__init__()
        self.dw = nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=False), nn.BatchNorm2d(c))
        self.fc1, self.fc2 = nn.Conv2d(c, 2 * c, 1), nn.Conv2d(2 * c, c, 1)
        self.gamma = nn.Parameter(torch.ones(c, 1, 1))

    def forward(self, x):
        return x + self.gamma * self.fc2(F.gelu(self.fc1(self.dw(x))))


@given(c=st.sampled_from([2, 4]), k=st.sampled_from([3, 7]), seed=st.integers(0, 10_000))
def test_layer_scale_folds_into_the_last_conv(c, k, seed):
    fused, _ = fuse64(LayerScaledMlp(c, k), torch.randn(1, c, 9, 9), seed)
    counts = count_model(fused)
    assert (counts.convs, counts.bns) == (3, 0)
    assert calls(fused, __import__("operator").mul, torch.mul) == 0


class LayerScaleBeforePaddedConv(nn.Module):
    """γ·x + β before a zero-padded conv: the shift would reach the border as 0, so it must not fold forward."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.gamma, self.shift = nn.Parameter(torch.ones(c, 1, 1)), nn.Parameter(torch.zeros(c, 1, 1))

    def forward(self, x):
        return self.conv(torch.tanh(x) * self.gamma + self.shift)


def test_shifted_layer_scale_before_padded_conv_is_refused():
    fused, report = fuse64(LayerScaleBeforePaddedConv(3), torch.randn(1, 3, 5, 5))
    assert fired(report, "bn_prefold") == 0
    assert any(r["rule"] == "bn_prefold" and "border" in r["detail"] for r in report.refusals)


class DistilledHead(nn.Module):
    """(l1(bn1(mean x)) + l2(bn2(mean x))) / 2: two BatchNorm1d → Linear heads averaged."""

    def __init__(self, c, classes):
        super().__init__()
        self.pre = nn.Conv2d(3, c, 3, padding=1)
        self.head = nn.Sequential(nn.BatchNorm1d(c), nn.Linear(c, classes))
        self.head_dist = nn.Sequential(nn.BatchNorm1d(c), nn.Linear(c, classes))

    def forward(self, x):
        x = torch.relu(self.pre(x)).mean((2, 3), keepdim=False)
        return (self.head(x) + self.head_dist(x)) / 2


@given(c=st.sampled_from([2, 5]), classes=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_averaged_normalized_heads_become_one_linear(c, classes, seed):
    fused, _ = fuse64(DistilledHead(c, classes), torch.randn(1, 3, 5, 5), seed)
    counts = count_model(fused)
    assert (counts.linears, counts.bns) == (1, 0)
    assert calls(fused, __import__("operator").truediv, torch.div) == 0


# --- serial_merge decides on cost before composing -------------------------------------------------

@given(st.data())
def test_serial_merge_predicts_the_composite_shape_without_building_it(data):
    """The shape serial_merge's cost guard (and serial_into_sibling's cover test) uses is exactly the composed
    conv's (groups, stride, extent, MACs)."""
    from reparam.core import opmath
    from reparam.core.ops import Conv
    from reparam.rules._serial import composite_shape

    nd = data.draw(st.integers(1, 2))
    axis = lambda values: st.tuples(*[st.sampled_from(values)] * nd)  # noqa: E731
    g1, g2 = data.draw(st.sampled_from([1, 2, 4])), data.draw(st.sampled_from([1, 2, 4]))
    c0, c1, c2 = (4 * data.draw(st.integers(1, 2)) for _ in range(3))
    a = Conv(torch.randn(c1, c0 // g1, *data.draw(axis([1, 2, 3, 5])), dtype=torch.float64), None,
             data.draw(axis([1, 2])), ((0, 0),) * nd, data.draw(axis([1, 2, 3])), g1)
    b = Conv(torch.randn(c2, c1 // g2, *data.draw(axis([1, 2, 3])), dtype=torch.float64), None,
             data.draw(axis([1, 2])), ((0, 0),) * nd, data.draw(axis([1, 2])), g2)
    composed, shape = opmath.compose(a, b), composite_shape(a, b)
    assert (shape.groups, shape.stride, shape.extent, shape.macs) == \
        (composed.groups, composed.stride, composed.extent, opmath.macs_per_pixel(composed))


# --- capture resolves parameters by lookup, with torch.fx's names ------------------------------------

class SharedAndConstant(nn.Module):
    """A parameter used under two module paths, a functional BatchNorm on buffers, a plain tensor attribute."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 2, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 3, padding=1)
        self.b.weight = self.a.weight
        self.bn = nn.BatchNorm2d(2)
        self.constant = torch.ones(1, 2, 1, 1)

    def forward(self, x):
        y = self.b(self.a(x))
        y = F.batch_norm(y, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias, False)
        return F.conv2d(y, self.b.weight, padding=1) + self.constant


def test_indexed_tracer_gives_the_torch_fx_graph():
    from reparam.frontends.fx.capture import trace

    model = SharedAndConstant().eval()
    ours, theirs = trace(model), fx.symbolic_trace(model)

    def calls(gm):  # the same calls in the same order (ours also reads buffers as attributes, to fold them)
        return [(n.op, str(n.target)) for n in gm.graph.nodes if n.op not in ("get_attr", "placeholder", "output")]

    assert calls(ours) == calls(theirs)
    x = torch.randn(1, 2, 5, 5)
    assert torch.equal(ours(x), theirs(x))
