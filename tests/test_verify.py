"""Streamed float64 runs (verify.run_float64) give exactly what a float64 copy of the model gives."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from reparam.frontends import verify
from reparam.testing import linear_blocks


class Tricky(nn.Module):
    """Reads its parameters in ways a streamed run must get right: through a view kept across operations,
    by dtype, in a buffer filled in place, in a method of its own, and with state kept between calls."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, groups=1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(4)
        self.scale = nn.Parameter(torch.rand(4) + 0.5)
        self.register_buffer("shift", torch.randn(4))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        w = self.conv.weight.reshape(4, -1)  # a view of a parameter, used by the next operations
        y = F.conv2d(x, w.reshape(self.conv.weight.shape), self.conv.bias, padding=1)
        out = torch.zeros(y.shape, dtype=self.scale.dtype)  # created in the forward, filled in place
        out[:, :2] = y[:, :2]
        out[:, 2:] = y[:, 2:] * 2
        y = self.bn(self.dw(out)) * self.scale.reshape(1, -1, 1, 1) + self.shift.reshape(1, -1, 1, 1)
        return y, w.sum()


def _bn_stats(m: nn.Module) -> nn.Module:
    for b in m.modules():
        if isinstance(b, nn.BatchNorm2d):
            b.running_mean.uniform_(-0.5, 0.5)
            b.running_var.uniform_(0.5, 2)
    return m.eval()


def test_streamed_equals_float64_copy_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = _bn_stats(Tricky())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = (torch.randn(2, 3, 9, 9),)
    want = verify.run(model, x, torch.float64)
    got = verify.run_float64(model, x)
    assert [t.dtype for t in got] == [torch.float64, torch.float64]
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert model.calls == 0  # ran on a copy of the modules
    assert all(v.dtype == state[k].dtype and torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_outputs_do_not_alias_the_scratch_buffer():
    """An operation returning a view of a converted argument hands out its own copy."""
    p = nn.Parameter(torch.randn(5, 6))
    with verify.Float64Stream() as mode:
        v = p.t()
        w = p * 2  # reuses the scratch buffer
    assert v.dtype == torch.float64 and torch.equal(v, p.detach().double().t())
    assert torch.equal(w, p.detach().double() * 2)
    assert v.untyped_storage().data_ptr() != mode.scratch.untyped_storage().data_ptr()


def test_streamed_run_of_a_half_precision_model_is_float64():
    torch.manual_seed(1)
    model = _bn_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))).half()
    x = (torch.randn(1, 3, 8, 8).half(),)
    got, want = verify.run_float64(model, x), verify.run(model, x, torch.float64)
    assert got[0].dtype == torch.float64 and torch.equal(got[0], want[0])


@settings(max_examples=10, deadline=None)
@given(st.data())
def test_streamed_equals_copy_on_random_blocks(data):
    case = data.draw(linear_blocks())
    module = copy.deepcopy(case.module).float()  # float32 parameters: the streamed run converts them
    inputs = tuple(x.float() for x in case.inputs)
    want = verify.run(module, inputs, torch.float64)
    got = verify.run_float64(module, inputs)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_float64_error_confirms_a_mismatch_on_copies():
    """A wrong model is still reported wrong (the streamed verdict is confirmed on float64 copies)."""
    torch.manual_seed(2)
    a = nn.Conv2d(3, 4, 3).eval()
    b = nn.Conv2d(3, 4, 3).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b.weight[0, 0, 0, 0] += 1e-3
    x = (torch.randn(1, 3, 6, 6),)
    err, _ = verify.float64_error(a, b, x, 1e-9)
    assert err > 1e-6
    ok, _ = verify.float64_error(a, a, x, 1e-9)
    assert ok == 0.0
