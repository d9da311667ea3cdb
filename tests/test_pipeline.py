"""The one fuse driver and its verification metric, the same for torch.fx, torch.export and ONNX: each property
of the metric (scale-aware per output, non-finite values the original produces, each dtype at its precision),
bisection and progress on every front end, and the caller's process state restored on every path."""
from __future__ import annotations

import gc
import io
import math
import warnings
import weakref

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

import reparam
from reparam.core.ops import Conv
from reparam.core.pattern import P, X
from reparam.frontends import verify
from reparam.frontends.pipeline import process_state_kept

GEN = torch.Generator().manual_seed(0)


def bn(c):
    m = nn.BatchNorm2d(c)
    with torch.no_grad():
        m.running_mean.copy_(torch.randn(c, generator=GEN) * 0.1)
        m.running_var.copy_(torch.rand(c, generator=GEN) + 0.5)
        m.weight.copy_(torch.rand(c, generator=GEN) + 0.5)
        m.bias.copy_(torch.randn(c, generator=GEN) * 0.1)
    return m


def to_onnx(module: nn.Module, shape) -> onnx.ModelProto:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn(shape),), f, dynamo=False, opset_version=17,
                          do_constant_folding=False)
    return onnx.load_from_string(f.getvalue())


def old_metric(got, want) -> float:
    """What verification used before: max |Δ| / max |y| over all outputs at once, NaN as an infinite error."""
    with np.errstate(invalid="ignore"):
        diff = max(float(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)).max()) for g, w in zip(got, want))
    scale = max(float(np.abs(np.asarray(w, np.float64)).max()) for w in want)
    return math.inf if diff != diff else diff / scale


# --- the metric, property by property ----------------------------------------------------------------------

def test_near_zero_output_is_judged_at_the_size_of_its_computation():
    """Values ~1e-6 computed from values ~1: float32 lands 1.2e-7 off; that is rounding, not an error."""
    rng = np.random.default_rng(0)
    exact = rng.standard_normal(256) * 1e-6
    baseline = (exact + rng.uniform(-1.2e-7, 1.2e-7, 256)).astype(np.float32)  # the original in float32
    fused = (exact + rng.uniform(-1.2e-7, 1.2e-7, 256)).astype(np.float32)  # a correct rewrite in float32
    scales = verify.magnitudes([exact], [baseline])
    assert scales[0] >= 0.5  # the computation's size, read from the original's own rounding
    assert verify.relative_error([fused], [exact], scales) <= 1e-4
    assert verify.relative_error([fused], [exact]) > 1e-2  # max|Δ| / max|y| would refuse it
    # a real error on the same output is still caught at that scale
    assert verify.relative_error([exact + 1e-3], [exact], scales) > 1e-4


def test_a_large_error_is_not_hidden_by_one_large_output():
    rng = np.random.default_rng(1)
    big, small = rng.standard_normal(64) * 1e4, rng.standard_normal(64)
    wrong_small = small * 1.1  # 10% wrong
    assert old_metric([big, wrong_small], [big, small]) < 1e-4  # the old metric passed it
    errors = verify.output_errors([big, wrong_small], [big, small])
    assert errors[0] == 0.0 and errors[1] > 0.05


def test_non_finite_values_the_original_produces_are_equal():
    want = np.array([1.0, np.nan, np.inf, -np.inf, 2.0])
    assert verify.relative_error([want.copy()], [want]) == 0.0
    assert old_metric([want.copy()], [want]) == math.inf
    # a non-finite value the original does not produce, or a different one, is an infinite error
    for bad in ([1.0, 0.0, np.inf, -np.inf, 2.0], [1.0, np.nan, -np.inf, -np.inf, 2.0],
                [1.0, np.nan, np.inf, -np.inf, np.nan]):
        assert verify.relative_error([np.array(bad)], [want]) == math.inf
    # where the original overflows in its own dtype, the deployed model may overflow the same way
    exact = np.array([1.0, 7e4])
    baseline = np.array([1.0, np.inf], dtype=np.float16)
    deployed = np.array([1.0, np.inf], dtype=np.float16)
    assert verify.relative_error([deployed], [exact], baseline=[baseline]) == 0.0
    assert verify.relative_error([np.array([1.0, -np.inf], np.float16)], [exact], baseline=[baseline]) == math.inf


def test_each_dtype_is_judged_at_its_own_precision():
    assert verify.native_tolerance(1e-9, [torch.float32]) == verify.NATIVE_ULPS * torch.finfo(torch.float32).eps
    assert verify.native_tolerance(1e-9, [np.float16]) == verify.NATIVE_ULPS * float(np.finfo(np.float16).eps)
    assert verify.native_tolerance(1e-9, [torch.float64, torch.int64]) == 1e-9  # float64: the tolerance itself
    assert verify.native_tolerance(1e-2, [torch.float32]) == 1e-2  # never stricter than the caller's tolerance


def test_shapes_and_output_counts_must_agree():
    assert verify.relative_error([np.zeros(3)], [np.zeros(4)]) == math.inf
    assert verify.relative_error([np.zeros(3)], [np.zeros(3), np.zeros(3)]) == math.inf


# --- the same properties end to end ----------------------------------------------------------------------

class Cancelling(nn.Module):
    """conv_a(x) − conv_b(x) with nearly equal weights: outputs ~1e-5 computed from values ~1."""

    def __init__(self, c=8):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.Conv2d(c, c, 3, padding=1, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(self.a.weight.shape, generator=GEN))
            self.b.weight.copy_(self.a.weight + 1e-6 * torch.randn(self.a.weight.shape, generator=GEN))

    def forward(self, x):
        return self.a(x) - self.b(x)


def test_near_zero_outputs_are_not_refused_on_onnx():
    model = to_onnx(Cancelling(), (1, 8, 16, 16))
    fused, rep = reparam.fuse_onnx(model, report=True)
    assert rep.after.convs == 1 and rep.verification.passed, rep.summary()
    # what the written models show by the old metric (two float32 runs in onnxruntime): a false refusal
    from reparam.frontends.onnx.backend import random_inputs, run_ort
    feeds = random_inputs(model, {model.graph.input[0].name: (1, 8, 16, 16)})
    assert old_metric(run_ort(fused, feeds), run_ort(model, feeds)) > 1e-4


def test_near_zero_outputs_are_not_refused_on_fx():
    fused, rep = reparam.fuse(Cancelling(), torch.randn(1, 8, 16, 16), report=True)
    assert rep.after.convs == 1 and rep.verification.passed
    assert rep.verification.error_native <= verify.native_tolerance(0, [torch.float32])


class LogOfBn(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), bn(c)

    def forward(self, x):
        return torch.log(self.bn(self.conv(x)))  # NaN wherever the BN output is negative


@pytest.mark.filterwarnings("ignore:invalid value encountered in log")
def test_nan_the_original_produces_is_not_a_difference_on_fx_and_onnx():
    model = LogOfBn().eval()
    fused, rep = reparam.fuse(model, torch.randn(1, 4, 8, 8), report=True)
    assert rep.after.bns == 0 and rep.verification.passed and rep.verification.error_fp64 <= 1e-12
    fused, rep = reparam.fuse_onnx(to_onnx(model, (1, 4, 8, 8)), report=True)
    assert rep.after.bns == 0 and rep.verification.passed and rep.verification.error_fp64 <= 1e-12


def test_float16_onnx_graph_is_judged_at_float16_precision():
    rng = np.random.default_rng(0)

    def h(name, a):
        return numpy_helper.from_array(np.asarray(a, dtype=np.float16), name)

    nodes = [helper.make_node("Conv", ["x", "w3"], ["a"], pads=[1, 1, 1, 1], name="c3"),
             helper.make_node("BatchNormalization", ["a", "g", "be", "mu", "var"], ["an"], name="bn"),
             helper.make_node("Conv", ["x", "w1", "b1"], ["b"], name="c1"),
             helper.make_node("Add", ["an", "b"], ["y"], name="add")]
    inits = [h("w3", rng.standard_normal((8, 8, 3, 3)) * 0.3), h("g", rng.random(8) + 0.5),
             h("be", rng.standard_normal(8)), h("mu", rng.standard_normal(8) * 0.1), h("var", rng.random(8) + 0.5),
             h("w1", rng.standard_normal((8, 8, 1, 1)) * 0.3), h("b1", rng.standard_normal(8))]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT16, [1, 8, 16, 16]) for n in ("x", "y")]
    graph = helper.make_graph(nodes, "g", vi[:1], vi[1:], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    fused, rep = reparam.fuse_onnx(model, report=True)  # the default tolerance, no float32 precision asked of it
    assert rep.verification.passed and rep.after.convs == 1
    assert rep.verification.error_native > 1e-4  # float16 rounding: over float32's tolerance, within its own


class TwoHeads(nn.Module):
    """A large output (×1e4) and a small one: an error in the small one must not hide behind the large one."""

    def __init__(self, c=4):
        super().__init__()
        self.big, self.small = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.big(x) * 1e4, self.small(x)


_made: dict[int, weakref.ref] = {}  # weights the rule made (by id, alive: a re-run's fresh weights are not)


def _made_here(t: torch.Tensor) -> bool:
    ref = _made.get(id(t))
    return ref is not None and ref() is t


@reparam.rule(P(Conv, X("x"), name="conv"), name="nudge_1x1")
def nudge_1x1(x, conv):
    """A 1×1 conv's weight × (1 + 1e-6), once per conv (deliberately wrong)."""
    if conv.op.weight.shape[-1] != 1 or _made_here(conv.op.weight):
        return None
    weight = conv.op.weight * (1 + 1e-6)
    _made[id(weight)] = weakref.ref(weight)
    return conv.op.with_(weight=weight)(x)


def test_a_small_wrong_output_beside_a_large_one_is_refused_and_bisected():
    with pytest.raises(reparam.VerificationError, match="first wrong rewrite: rule 'nudge_1x1'"):
        reparam.fuse(TwoHeads(), torch.randn(1, 4, 8, 8), extra_rules=[nudge_1x1], check=False)


# --- the driver: bisection, progress, process state, notes on every front end ------------------------------

class RepBlock(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.c3, self.b3, self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), bn(c), \
            nn.Conv2d(c, c, 1, bias=False), bn(c)

    def forward(self, x):
        return torch.relu(self.b3(self.c3(x)) + self.b1(self.c1(x)))


SHAPE = (1, 4, 8, 8)


def front_ends(model: nn.Module):
    """The same model as each front end's input, with the fuse function that takes it."""
    x = torch.randn(SHAPE)
    return {"fx": lambda **kw: reparam.fuse(model, x, **kw),
            "aten": lambda **kw: reparam.fuse_exported(torch.export.export(model, (x,)), **kw),
            "onnx": lambda **kw: reparam.fuse_onnx(to_onnx(model, SHAPE), **kw)}


@pytest.mark.parametrize("front", ["fx", "aten", "onnx"])
def test_every_front_end_reports_progress_and_opaque_ops_the_same_way(front):
    phases, counted = [], []
    fuse = front_ends(RepBlock().eval())[front]
    fused, rep = fuse(report=True, progress=phases.append)
    assert phases[:2] == ["rewrite", "verify"] and len(phases) == len(set(phases))
    assert rep.verification.passed and rep.after.convs == 1 and rep.after.bns == 0
    note = [n for n in rep.notes if n.startswith("operations opaque to the rules")]
    assert len(note) == 1 and "×1" in note[0], rep.notes

    def with_counts(phase, done=None, total=None):
        counted.append((phase, done, total))

    with pytest.raises(reparam.VerificationError, match="first wrong rewrite: rule 'nudge_1x1'") as info:
        fuse(extra_rules=[nudge_1x1], check=False, progress=with_counts, tolerance=1e-9)
    assert info.value.rewrite.startswith("rule 'nudge_1x1'")
    steps = [(d, t) for p, d, t in counted if p == "bisect"]
    assert steps and all(t >= 1 and 0 <= d <= t for d, t in steps)


@reparam.rule(P(Conv, X("x"), name="conv"), name="crash")
def crash(x, conv):
    """Always crashes (a rule bug)."""
    raise ValueError("boom")


@pytest.mark.parametrize("front", ["fx", "onnx"])
def test_gc_and_thread_count_are_restored_on_error(front):
    fuse = front_ends(RepBlock().eval())[front]
    threads = torch.get_num_threads()
    assert gc.isenabled()
    with pytest.raises(reparam.RuleError, match="crash"):
        fuse(extra_rules=[crash])
    assert gc.isenabled() and torch.get_num_threads() == threads
    gc.disable()  # a caller that runs with the collector off keeps it off
    try:
        fuse()
        assert not gc.isenabled()
    finally:
        gc.enable()
    assert torch.get_num_threads() == threads


def test_process_state_kept_restores_threads_changed_inside():
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with process_state_kept():
            assert not gc.isenabled()
            torch.set_num_threads(1 if threads > 1 else 2)
            raise RuntimeError("interrupted")
    assert gc.isenabled() and torch.get_num_threads() == threads


def test_without_a_float64_result_two_onnxruntime_runs_show_the_magnitude(monkeypatch):
    """No float64 reference for the graph: the written model is judged against the original in onnxruntime,
    each output over the size its computation shows (onnxruntime's optimized graph rounds differently)."""
    from reparam.frontends.onnx import backend

    def no_reference(*args, **kwargs):
        raise RuntimeError("no float64 reference")

    monkeypatch.setattr(backend, "evaluate_f64", no_reference)
    fused, rep = reparam.fuse_onnx(to_onnx(Cancelling(), (1, 8, 16, 16)), report=True)
    assert rep.verification.passed and rep.verification.error_fp64 is None
    assert any("no float64 check" in n for n in rep.notes)
