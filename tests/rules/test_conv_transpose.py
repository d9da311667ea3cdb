"""The ConvTranspose op kind (rules/conv_transpose.py), added through the public extension API: its front-end forms and its output shape."""
from __future__ import annotations

import torch
import torch.nn as nn

import reparam
from reparam.rules.conv_transpose import ConvTranspose
from tests.rules.support import ConvTBN, kinds, randomized_bn


def test_functional_and_torch_export_forms_are_recognized():
    class F_(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4, 3, 3))
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(nn.functional.conv_transpose2d(x, self.w, None, 2, 1, 1))

    m = randomized_bn(F_())
    x = torch.randn(1, 3, 4, 4)
    fused = reparam.fuse(m, (x,))
    assert kinds(fused)["BatchNorm2d"] == 0
    ep = torch.export.export(randomized_bn(ConvTBN(2, 2, 4, 3, 2, 1, 1, 1, 2)), (torch.randn(1, 2, 5, 5),))
    _, rep = reparam.fuse_exported(ep, report=True)
    assert rep.before.convs == 1 and rep.after.bns == 0 and rep.after.convs == 1


def test_the_op_kind_owns_its_output_shape():
    op = ConvTranspose(torch.zeros(2, 3, 4, 4, dtype=torch.float64), None, (2, 2), ((1, 1), (1, 0)), (1, 1))
    x = torch.zeros(1, 2, 5, 7, dtype=torch.float64)
    assert op.output_shape([tuple(x.shape)]) == tuple(op.evaluate(x).shape)
