"""Ops hold the model's tensors as they are (no float64 copy at import); rewrites compute in float64 and the
exporter rounds once; the deploy model never shares the original's storage."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import reparam
from reparam.core import opmath
from reparam.core.ops import Affine, Conv, as_float64, borrowed, held
from reparam.frontends.fx.importer import conv_op


def _block(dtype=torch.float32):
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.k3 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
            self.k1 = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
            self.tail = nn.Conv2d(8, 4, 3)  # its padding is folded in: a new op holding the model's own weight

        def forward(self, x):
            return self.tail(F.pad(torch.relu(self.k3(x) + self.k1(x)), (1, 1, 1, 1)))

    m = Block()
    for bn in (m.k3[1], m.k1[1]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2)
    return m.to(dtype).eval()


def test_imported_conv_holds_a_view_of_the_parameter():
    w = nn.Parameter(torch.randn(4, 3, 3, 3))
    op = conv_op(w, None, 1, 1, 1, 1)
    assert op.weight.dtype == torch.float32 and op.dtype == torch.float32
    assert op.weight.data_ptr() == w.data_ptr() and not op.weight.requires_grad
    assert borrowed(op.weight)
    assert not borrowed(torch.randn(3))


def test_rewrite_computes_in_float64_from_the_held_values():
    w = torch.randn(4, 3, 3, 3)
    conv = Conv(held(w), held(torch.randn(4)), (1, 1), ((1, 1), (1, 1)), (1, 1), dtype=torch.float32)
    scale = torch.tensor(1 / 3, dtype=torch.float64)  # a scalar: float32 · 0-d float64 would stay float32
    folded = opmath.affine_after(conv, Affine(scale, None, None))
    assert folded.weight.dtype == torch.float64 and folded.bias.dtype == torch.float64
    assert torch.equal(folded.weight, w.double() * scale)
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    assert torch.allclose(folded.evaluate(x), conv.evaluate(x) / 3, rtol=1e-13, atol=1e-13)


def test_per_channel_fold_is_float64_without_a_copy_first():
    w = torch.randn(4, 3, 3, 3)
    conv = Conv(held(w), None, (1, 1), ((1, 1), (1, 1)), (1, 1), dtype=torch.float32)
    scale = torch.rand(4, dtype=torch.float64) + 0.5
    folded = opmath.affine_after(conv, Affine(scale, torch.randn(4, dtype=torch.float64), 1))
    assert folded.weight.dtype == torch.float64 and folded.bias.dtype == torch.float64
    assert torch.equal(folded.weight, w.double() * scale.reshape(-1, 1, 1, 1))


def test_parallel_merge_reads_float32_kernels_exactly():
    a = torch.randn(4, 4, 3, 3)
    b = torch.randn(4, 4, 1, 1)
    convs = [Conv(held(a), None, (1, 1), ((1, 1), (1, 1)), (1, 1), dtype=torch.float32),
             Conv(held(b), None, (1, 1), ((0, 0), (0, 0)), (1, 1), dtype=torch.float32)]
    merged = opmath.merge_parallel(convs, [1.0, 0.5])
    want = as_float64(a).clone()
    want[:, :, 1:2, 1:2] += 0.5 * as_float64(b)
    assert merged.weight.dtype == torch.float64 and torch.equal(merged.weight, want)


def test_deploy_model_shares_no_storage_with_the_original():
    model = _block()
    fused = reparam.fuse(model, torch.randn(1, 8, 6, 6))
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    for name, t in [*fused.named_parameters(), *fused.named_buffers()]:
        assert t.untyped_storage().data_ptr() not in own, name
        assert t.dtype == torch.float32, name


def test_half_model_keeps_its_dtype():
    model = _block(torch.float16)
    fused, rep = reparam.fuse(model, torch.randn(1, 8, 6, 6, dtype=torch.float16), report=True)
    assert rep.verification.passed
    assert {p.dtype for p in fused.parameters()} == {torch.float16}
