"""Shape propagation without running the model: the same shapes and dtypes as running it for real."""
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

import reparam
from examples.repnext.model import repnext_m0
from reparam.frontends.fx.capture import trace
from reparam.frontends.fx.nodes import fx_dtype, fx_shape
from reparam.frontends.fx.shapes import attach_shapes


class Mixed(nn.Module):
    """Conv variants (string paddings, reflect padding, dilation, stride, groups), a Linear, activations,
    repeated identical calls (memoized), chunk/cat and a method call."""

    def __init__(self):
        super().__init__()
        self.same = nn.Conv2d(4, 8, (3, 5), padding="same", dilation=(2, 1))
        self.valid = nn.Conv2d(8, 8, 3, padding="valid", stride=2, groups=4)
        self.reflect = nn.Conv2d(8, 6, 3, padding=2, padding_mode="reflect", stride=(1, 2))
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.GELU()
        self.a = nn.Conv2d(3, 3, 1)
        self.b = nn.Conv2d(3, 3, 1)
        self.fc = nn.Linear(6, 5)
        self.scale = nn.Parameter(torch.ones(1, 6, 1, 1))

    def forward(self, x):
        y = self.act(self.bn(self.reflect(self.valid(self.same(x)))))
        p, q = y.chunk(2, 1)
        y = torch.cat([self.a(p) + self.a(p), self.b(q) * 2.0], 1) / self.scale - 1
        y = torch.add(y, y.mean((2, 3), keepdim=True), alpha=0.5) * torch.sigmoid(y)
        return self.fc(F.relu(y).mean((2, 3))), y.flatten(1)


def shapes_by_running(gm: fx.GraphModule, x) -> dict:
    ShapeProp(gm).propagate(x)
    return {n.name: (fx_shape(n), fx_dtype(n)) for n in gm.graph.nodes if n.op != "output"}


def shapes_by_meta(gm: fx.GraphModule, x) -> dict:
    for n in gm.graph.nodes:
        n.meta.pop("tensor_meta", None)
    assert attach_shapes(gm, (x,))
    return {n.name: (fx_shape(n), fx_dtype(n)) for n in gm.graph.nodes if n.op != "output"}


def test_meta_shapes_equal_real_shapes_on_mixed_layers():
    model = Mixed().eval()
    x = torch.randn(2, 4, 17, 23)
    gm = trace(model)
    want = shapes_by_running(gm, x)
    assert shapes_by_meta(gm, x) == want
    modules = [n.name for n in gm.graph.nodes if n.op == "call_module"]
    assert modules and all(want[name][0] is not None for name in modules)


def test_meta_shapes_equal_real_shapes_on_repnext_in_float64():
    model = repnext_m0(num_classes=10).double().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    gm = trace(model)
    assert shapes_by_meta(gm, x) == shapes_by_running(gm, x)


def test_a_model_that_rejects_its_input_gets_no_shapes():
    """The configuration shortcut must not accept what the layer itself would refuse (channels, dtype)."""
    gm = trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval())
    assert not attach_shapes(gm, (torch.randn(1, 5, 8, 8),))
    assert not attach_shapes(gm, (torch.randn(1, 3, 8, 8, dtype=torch.float64),))
    assert not attach_shapes(gm, (torch.randn(1, 3, 2, 2),))
    assert attach_shapes(gm, (torch.randn(1, 3, 8, 8),))


def test_more_inputs_than_the_forward_takes_is_a_capture_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    x = torch.randn(1, 3, 8, 8)
    assert not attach_shapes(trace(model), (x, x))
    with pytest.raises(reparam.CaptureError, match="does not run"):
        reparam.fuse(model, (x, x), verify=False)
