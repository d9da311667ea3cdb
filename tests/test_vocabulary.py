"""The open vocabulary's mechanisms: the exporters check what they write against each op's own semantics
(an emitter bug is reported as an exporter bug, never blamed on a rule), and AvgPool.divisor_override is written."""
from __future__ import annotations

import io
import warnings

import onnx
import pytest
import torch
import torch.nn as nn

import reparam
from reparam.core import vocabulary
from reparam.core.ops import AvgPool, Affine, Conv
from reparam.core.pattern import P, X
from reparam.core.rule import require, rule
from reparam.errors import ExportError
from reparam.testing import assert_equivalent, randomize_bn


@rule(P(Affine, P(AvgPool, X("x"), name="pool"), name="scale"))
def scale_into_divisor(x, pool, scale):
    """c·avgpool_k(x) = sumpool_k(x) / (k²/c): a scalar after an unpadded pool becomes its divisor_override."""
    k = 1
    for v in pool.op.kernel_size:
        k *= v
    require(scale.op.is_scalar and scale.op.shift is None, "not a scalar scale")
    divisor = k / float(scale.op.scale)
    require(divisor == int(divisor) and divisor > 0 and not any(pool.op.padding), "no integer divisor")
    return pool.op.with_(divisor_override=int(divisor))(x)


class PoolScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        return self.pool(x) * 0.5


def test_the_fx_exporter_writes_divisor_override():
    fused, rep = assert_equivalent(PoolScale(), (torch.randn(1, 3, 6, 6),), extra_rules=[scale_into_divisor])
    assert rep.fired_counts()["scale_into_divisor"] == 1


def test_an_fx_emitter_bug_is_an_export_error_naming_op_and_exporter(monkeypatch):
    def dropping_divisor(ctx, node, op, xs):  # the old bug: divisor_override not written
        return ctx.call(torch.nn.functional.avg_pool2d, (xs[0], op.kernel_size, op.stride, op.padding))

    monkeypatch.setitem(vocabulary.FX_EMITTERS, AvgPool, dropping_divisor)
    with pytest.raises(ExportError, match=r"FX exporter: the new AvgPool.*not in a rule"):
        reparam.fuse(PoolScale(), (torch.randn(1, 3, 6, 6),), extra_rules=[scale_into_divisor])


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_an_onnx_emitter_bug_is_an_export_error_naming_op_and_exporter(monkeypatch):
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(randomize_bn(ConvBN()).eval(), (torch.randn(1, 3, 8, 8),), f, dynamo=False,
                          opset_version=17, do_constant_folding=False)
    model = onnx.load_from_string(f.getvalue())
    reparam.fuse_onnx(model)  # the built-in emitter passes its self-check
    builtin = vocabulary.ONNX_EMITTERS[Conv]

    def dropping_bias(ctx, node, op, xs, out):
        return builtin(ctx, node, op.with_(bias=None), xs, out)

    monkeypatch.setitem(vocabulary.ONNX_EMITTERS, Conv, dropping_bias)
    with pytest.raises(ExportError, match=r"ONNX exporter: the new Conv2d.*not in a rule"):
        reparam.fuse_onnx(model)


def test_a_later_recognizer_falls_through_to_the_earlier_one_on_none(monkeypatch):
    monkeypatch.setattr(vocabulary, "FX_MODULES", dict(vocabulary.FX_MODULES))
    seen = []

    @vocabulary.fx_module(nn.Conv2d)
    def watching(ctx, node, module):
        seen.append(node.target)
        return None

    fused = reparam.fuse(randomize_bn(ConvBN()).eval(), (torch.randn(1, 3, 8, 8),))
    assert seen == ["conv"] and not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
