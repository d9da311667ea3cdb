"""Helpers shared by the per-rule tests: building and fusing drawn models (property tests, float64,
relative error ≤ 1e-9) and fusing traps (relative error ≤ 1e-12, refusals read by rule name)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import torch
import torch.nn as nn
from hypothesis import strategies as st

import reparam
from reparam.frontends.onnx.backend import relative_error, run_ort
from reparam.testing import ConvSpec, assert_equivalent, conv_specs, count_ops, onnx_of, randomize_params


RTOL = 1e-9


LIMIT = {1: 12, 2: 12, 3: 6}  # the largest spatial size drawn per dimensionality


def geometry(nd: int) -> dict:
    """Kernel sizes and dilations drawn per dimensionality (3d stays small)."""
    if nd == 3:
        return dict(kernel_sizes=(1, 2, 3), dilations=(1, 2))
    return dict(kernel_sizes=(1, 2, 3, 4, 5, 6, 7), dilations=(1, 2, 3))


def specs(nd: int, **kw):
    """conv_specs whose smallest valid input fits in LIMIT."""
    kw = {**geometry(nd), **kw}
    return conv_specs(nd, **kw).filter(lambda s: s.min_size() <= LIMIT[nd] - 2)


dims = st.sampled_from([1, 2, 2, 3])


def example(draw, nd: int, channels: int, at_least: int = 1, batch: int = 1) -> torch.Tensor:
    size = draw(st.integers(max(at_least, 3), LIMIT[nd]))
    seed = draw(st.integers(0, 2 ** 16))
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, channels) + (size,) * nd, generator=gen, dtype=torch.float64)


def build(module: nn.Module, draw) -> nn.Module:
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    return randomize_params(module, gen).double().eval()


def fuse_fired(rule: str, model: nn.Module, x, times: int | None = None):
    """Fuse in float64, check equivalence, and that ``rule`` fired (exactly ``times`` if given)."""
    fused, report = assert_equivalent(model, (x,), rtol=RTOL)
    got = report.fired_counts().get(rule, 0)
    assert got >= 1 if times is None else got == times, f"{rule} fired {got}×\n{report.summary()}\n{report.refusals}"
    return fused, report, count_ops(fused)


def pad_ops(spec: ConvSpec) -> int:
    """Ops a fused conv takes: an asymmetric padding is exported as F.pad before the conv."""
    return 1 + (not spec.symmetric)


TRAP_RTOL = 1e-12


class Fn(nn.Module):
    """forward = ``fn(self, x)``, with the given submodules and constant buffers."""

    def __init__(self, fn, buffers=None, **modules):
        super().__init__()
        self.fn = fn
        for name, module in modules.items():
            setattr(self, name, module)
        for name, value in (buffers or {}).items():
            self.register_buffer(name, value)

    def forward(self, x):
        return self.fn(self, x)


def outputs_of(model, x):
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, tuple) else (out,)


def fuse64(model: nn.Module, shape, *, seed: int = 0, randomize: bool = True):
    """Fuse a float64 eval copy of ``model`` (random weights and BN statistics unless ``randomize`` is off) on
    a random input of ``shape``; check the fused model equals it on that input and two fresh ones.
    Returns (model, fused, report)."""
    gen = torch.Generator().manual_seed(seed)
    model = (randomize_params(model, gen) if randomize else model).double().eval()
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    fused, report = reparam.fuse(model, x, report=True)
    for probe in [x] + [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2)]:
        for got, want in zip(outputs_of(fused, probe), outputs_of(model, probe), strict=True):
            assert got.dtype == torch.float64 and got.shape == want.shape
            err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))
            assert err <= TRAP_RTOL, f"the fused model differs: relative error {err:.3g}\n{report.summary()}"
    return model, fused, report


def refused(report, rule: str, *words: str) -> dict:
    """The refusal of ``rule`` whose reason contains every word (case-insensitive); ``rule`` never fired there."""
    mine = [r for r in report.refusals if r["rule"] == rule]
    for r in mine:
        if all(w.lower() in r["detail"].lower() for w in words):
            assert r["detail"].strip() and r["where"], r
            assert (rule, r["where"]) not in {(e["rule"], e["where"]) for e in report.rules_fired}
            return r
    raise AssertionError(f"no refusal of {rule} mentioning {words}; its refusals: {[r['detail'] for r in mine]}\n"
                         f"all: {report.refusals}\n{report.summary()}")


def not_fired(report, rule: str) -> None:
    assert rule not in report.fired_counts(), f"{rule} fired: {report.rules_fired}\n{report.summary()}"


def unchanged(report) -> None:
    """Nothing was rewritten: the same ops, convs, BatchNorms, Linears and parameters as before."""
    assert report.after == report.before, f"{report.before} → {report.after}\n{report.rules_fired}"


def bn(c: int, nd: int = 2):
    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[nd - 1](c)


def params(module: nn.Module) -> int:
    return count_ops(module)["params"]


def convs(fused: nn.Module, kind=nn.Conv2d) -> list[nn.Module]:
    return [m for m in fused.modules() if isinstance(m, kind)]


def _two(s, x):
    return s.a(x) + s.b(x)


def _three(s, x):
    return s.a(x) + s.b(x) + s.c(x)


CONVT = (None, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


BN_ND = (None, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def randomized_bn(m: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.5)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.weight.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.num_features, generator=g) * 0.5)
    return m.eval()


class ConvTBN(nn.Module):
    def __init__(self, nd, cin, cout, k, s, p, op, d, g, bias=True):
        super().__init__()
        self.conv = CONVT[nd](cin, cout, k, stride=s, padding=p, output_padding=op, dilation=d, groups=g, bias=bias)
        self.bn = BN_ND[nd](cout)

    def forward(self, x):
        return self.bn(self.conv(x))


def kinds(model) -> Counter:
    return Counter(type(m).__name__ for m in model.modules())


def export(module: nn.Module, shape) -> onnx.ModelProto:
    return onnx_of(module.eval(), (torch.randn(shape),))


def fuse_onnx_checked(model, shape):
    fused, rep = reparam.fuse_onnx(model, report=True)
    onnx.checker.check_model(fused, full_check=True)
    rng = np.random.default_rng(3)
    feeds = {model.graph.input[0].name: rng.standard_normal(shape).astype(np.float32)}
    assert relative_error(run_ort(fused, feeds), run_ort(model, feeds)) <= 1e-5
    assert rep.verification.error_fp64 is not None and rep.verification.error_fp64 <= 1e-10
    return fused, rep
