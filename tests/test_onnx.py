"""The ONNX backend: the same rules through onnx-graphsurgeon, checked against onnxruntime.

Each block is exported from torch in its training structure (BatchNorms kept), fused with
``reparam.fuse_onnx`` and compared with the original in onnxruntime on fresh random inputs; the
structure reached is asserted exactly, and the rules each case needs must have fired.
"""
from __future__ import annotations

import io
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import reparam
from reparam.frontends.onnx.backend import relative_error, run_ort
from reparam.testing import onnx_of

warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
GEN = torch.Generator().manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Exports run the model; on a shared CPU (pytest -n 2) a torch thread pool only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bn(c, d=2):
    m = (nn.BatchNorm1d, nn.BatchNorm2d)[d - 1](c)
    with torch.no_grad():
        m.running_mean.copy_(torch.randn(c, generator=GEN) * 0.1)
        m.running_var.copy_(torch.rand(c, generator=GEN) + 0.5)
        m.weight.copy_(torch.rand(c, generator=GEN) + 0.5)
        m.bias.copy_(torch.randn(c, generator=GEN) * 0.1)
    return m


def export(module: nn.Module, shape, fold=False, **kw) -> onnx.ModelProto:
    return onnx_of(module.eval(), (torch.randn(shape),), fold=fold, **kw)


def ops(model) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def feeds_for(model, shapes, seed=7):
    rng = np.random.default_rng(seed)
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in zip(names, shapes)}


def fuse_and_compare(model, shapes, **kw):
    fused, rep = reparam.fuse_onnx(model, report=True, **kw)
    onnx.checker.check_model(fused, full_check=True)
    onnx.shape_inference.infer_shapes(fused, strict_mode=True)
    feeds = feeds_for(model, shapes)
    err = relative_error(run_ort(fused, feeds), run_ort(model, feeds))
    assert err < 1e-5, err
    assert [o.name for o in fused.graph.output] == [o.name for o in model.graph.output]
    assert [i.name for i in fused.graph.input] == [i.name for i in model.graph.input]
    assert fused.opset_import == model.opset_import and fused.ir_version == model.ir_version
    assert fused.producer_name == model.producer_name
    return fused, rep


# --- torch blocks ------------------------------------------------------------------------------
class RepVGG(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.c3, self.b3 = nn.Conv2d(c, c, 3, padding=1, bias=False), bn(c)
        self.c1, self.b1 = nn.Conv2d(c, c, 1, bias=False), bn(c)
        self.bi = bn(c)

    def forward(self, x):
        return F.relu(self.b3(self.c3(x)) + self.b1(self.c1(x)) + self.bi(x))


class ACNet(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.k33, self.b33 = nn.Conv2d(c, c, 3, padding=1, bias=False), bn(c)
        self.k13, self.b13 = nn.Conv2d(c, c, (1, 3), padding=(0, 1), bias=False), bn(c)
        self.k31, self.b31 = nn.Conv2d(c, c, (3, 1), padding=(1, 0), bias=False), bn(c)

    def forward(self, x):
        return self.b33(self.k33(x)) + self.b13(self.k13(x)) + self.b31(self.k31(x))


class Dilated(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.big, self.bb = nn.Conv2d(c, c, 5, padding=2, groups=c, bias=False), bn(c)
        self.dil, self.bd = nn.Conv2d(c, c, 3, padding=2, dilation=2, groups=c, bias=False), bn(c)

    def forward(self, x):
        return self.bb(self.big(x)) + self.bd(self.dil(x))


class AvgBranch(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv, self.bc = nn.Conv2d(c, c, 3, padding=1, bias=False), bn(c)
        self.pool, self.bp = nn.AvgPool2d(3, 1, 1), bn(c)

    def forward(self, x):
        return self.bc(self.conv(x)) + self.bp(self.pool(x))


class Residual(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, groups=2)

    def forward(self, x):
        return x + self.conv(x)


class GroupsMix(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.dw, self.dense = nn.Conv2d(c, c, 3, padding=1, groups=c), nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.dw(x) - self.dense(x)


class BNBefore1x1(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem, self.bn, self.conv = nn.Conv2d(3, c, 3), bn(c), nn.Conv2d(c, 16, 1)

    def forward(self, x):
        return self.conv(self.bn(F.relu(self.stem(x))))


class Heads(nn.Module):
    """RepNeXt-style: BN1d before two linear heads averaged, behind global pooling."""

    def __init__(self, c=8):
        super().__init__()
        self.stem, self.bn2d = nn.Conv2d(3, c, 3), bn(c)
        self.bn, self.h1, self.h2 = bn(c, 1), nn.Linear(c, 5), nn.Linear(c, 5)

    def forward(self, x):
        y = F.adaptive_avg_pool2d(self.bn2d(F.relu(self.stem(x))), 1).flatten(1)
        y = self.bn(y)
        return (self.h1(y) + self.h2(y)) / 2


class CatBN(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(c, 4, 3, padding=1), nn.Conv2d(c, 6, 1), bn(10)

    def forward(self, x):
        return self.bn(torch.cat([self.a(x), self.b(x)], 1))


class Serial(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.c1, self.c3 = nn.Conv2d(c, c, 1, bias=False), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.c3(self.c1(x))


class PadScale(nn.Module):
    """Explicit F.pad before a conv, a layer scale after it, BN then a scalar after that."""

    def __init__(self, c=8):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3), bn(c)
        self.gamma = nn.Parameter(torch.rand(1, c, 1, 1, generator=GEN) + 0.5)

    def forward(self, x):
        y = self.conv(F.pad(x, (1, 1, 1, 1)))
        return F.relu(self.bn(self.bn(y) * 0.5) * self.gamma)


class LayerScale(nn.Module):
    """A layer scale on a sum of convs of different inputs, then BN and a scalar after a ReLU."""

    def __init__(self, c=8):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1), bn(c)
        self.gamma = nn.Parameter(torch.rand(1, c, 1, 1, generator=GEN) + 0.5)

    def forward(self, x):
        y = (self.a(x) + self.b(F.relu(x))) * self.gamma
        return self.bn(F.relu(y)) * 0.5


class Nested(nn.Module):
    """(conv_a(x) + relu(x)) + conv_b(x): the inner sum must flatten before the convs can meet."""

    def __init__(self, c=8):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        return (self.a(x) + F.relu(x)) + self.b(x)


class FlattenBN(nn.Module):
    """A conv over the whole input ([N, C, 1, 1]), flattened, then BatchNorm1d: the BN folds into the conv."""

    def __init__(self, c=8):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, 6, 5), bn(6, 1)

    def forward(self, x):
        return self.bn(self.conv(x).flatten(1))


class Gelu(nn.Module):
    """ONNX Runtime fuses the erf GELU into one kernel: its ½ must not be folded into the next conv."""

    def __init__(self, c=8):
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(c, c, 3, padding=1), bn(c), nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.b(F.gelu(self.bn(self.a(x))))


BLOCKS = {
    "repvgg": (RepVGG, (1, 8, 12, 12), {"Conv": 1, "Relu": 1}, {"conv_bn_fold", "identity_to_conv",
                                                                 "parallel_sum_pad"}),
    "acnet": (ACNet, (1, 8, 12, 12), {"Conv": 1}, {"parallel_sum_pad"}),
    "dilated": (Dilated, (1, 8, 12, 12), {"Conv": 1}, {"dilated_to_dense", "parallel_sum_pad"}),
    "avgpool": (AvgBranch, (1, 8, 12, 12), {"Conv": 1}, {"avgpool_to_conv", "parallel_sum_pad"}),
    "residual": (Residual, (1, 8, 12, 12), {"Conv": 1}, {"identity_to_conv"}),
    "groups": (GroupsMix, (1, 8, 12, 12), {"Conv": 1}, {"groups_merge", "parallel_sum_pad"}),
    "bn_before_1x1": (BNBefore1x1, (1, 3, 12, 12), {"Conv": 2, "Relu": 1}, {"bn_prefold"}),
    "linear_heads": (Heads, (1, 3, 12, 12), {"Conv": 1, "Relu": 1, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1},
                     {"linear_sum", "affine_through_pool", "bn_prefold"}),
    "bn_after_concat": (CatBN, (1, 8, 12, 12), {"Conv": 2, "Concat": 1}, {"concat_affine_split", "conv_bn_fold"}),
    "flatten_bn": (FlattenBN, (1, 8, 5, 5), {"Conv": 1, "Flatten": 1}, {"affine_before_flatten", "conv_bn_fold"}),
    "gelu": (Gelu, (1, 8, 12, 12), {"Conv": 2, "Div": 1, "Erf": 1, "Add": 1, "Mul": 2},
             {"conv_bn_fold"}),
    "nested_sum": (Nested, (1, 8, 12, 12), {"Conv": 1, "Relu": 1, "Add": 1}, {"sum_flatten", "parallel_sum_pad"}),
    "serial_1x1_3x3": (Serial, (1, 8, 12, 12), {"Conv": 1}, {"serial_merge"}),
    "pad_scale": (PadScale, (1, 8, 12, 12), {"Conv": 1, "Relu": 1}, {"pad_fold", "conv_bn_fold"}),
    "layer_scale": (LayerScale, (1, 8, 12, 12), {"Conv": 2, "Relu": 2, "Add": 2, "Mul": 1},
                    {"scale_fold", "affine_merge", "conv_bn_fold"}),
}


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block(name):
    cls, shape, want, fires = BLOCKS[name]
    model = export(cls(), shape)
    fused, rep = fuse_and_compare(model, [shape])
    assert dict(ops(fused)) == want, (ops(model), ops(fused))
    assert fires <= set(rep.fired_counts()), rep.fired_counts()


def test_every_builtin_rule_has_an_onnx_case():
    covered = set().union(*(f for *_, f in BLOCKS.values())) | {"identity_elim"}  # test_identity_nodes
    covered |= {"conv_transpose_bn_fold", "parallel_conv_transpose"}  # tests/rules/test_conv_transpose_bn_fold.py, ...
    covered |= {"serial_into_sibling", "const_pad_commute", "crop_as_pad"}  # on ONNX in tests/rules/test_parity.py
    covered |= {"affine_through_layout"}  # on ONNX in tests/test_onnx_layout.py and tests/rules/test_parity.py
    covered |= {"conv_to_dense", "affine_through_reshape"}  # on ONNX in tests/rules/test_parity.py
    assert {r.name for r in reparam.builtin_rules()} <= covered


# --- hand-built graphs: attributes torch never emits ---------------------------------------------
def _init(name, a):
    return numpy_helper.from_array(np.asarray(a, dtype=np.float32), name)


def _model(nodes, inits, inputs, outputs, opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="handmade")
    m.ir_version = 8
    return m


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_auto_pad_and_asymmetric_pads_merge():
    """SAME_UPPER k=2 (pads 0,1) beside explicit asymmetric pads and a k=3 conv: one conv."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w2"], ["a"], auto_pad="SAME_UPPER", name="same2"),
             helper.make_node("Conv", ["x", "w3", "b3"], ["b"], pads=[1, 1, 1, 1], name="pad3"),
             helper.make_node("Conv", ["x", "w12"], ["c"], pads=[0, 0, 0, 1], name="asym"),
             helper.make_node("Add", ["a", "b"], ["ab"], name="add1"),
             helper.make_node("Sub", ["ab", "c"], ["y"], name="sub")]
    inits = [_init("w2", rng.standard_normal((4, 4, 2, 2))), _init("w3", rng.standard_normal((4, 4, 3, 3))),
             _init("b3", rng.standard_normal(4)), _init("w12", rng.standard_normal((4, 4, 1, 2)))]
    model = _model(nodes, inits, [_vi("x", ["N", 4, 10, 10])], [_vi("y", ["N", 4, 10, 10])])
    fused, rep = fuse_and_compare(model, [(3, 4, 10, 10)], input_shapes=[(2, 4, 10, 10)])
    assert dict(ops(fused)) == {"Conv": 1}
    assert fused.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"  # still dynamic


def test_gemm_alpha_beta_transb_and_matmul_add():
    """Gemm(alpha, beta, transB=0) → Gemm(transB=1) merge serially; MatMul+Add heads sum to one."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], alpha=0.5, beta=2.0, name="g1"),
             helper.make_node("Gemm", ["h", "w2", "b2"], ["y"], transB=1, name="g2"),
             helper.make_node("Unsqueeze", ["y", "axes"], ["y3"], name="unsq"),
             helper.make_node("MatMul", ["y3", "m1"], ["p"], name="mm1"),
             helper.make_node("Add", ["p", "c1"], ["pc"], name="add1"),
             helper.make_node("MatMul", ["y3", "m2"], ["q"], name="mm2"),
             helper.make_node("Add", ["pc", "q"], ["z"], name="sum")]
    inits = [_init("w1", rng.standard_normal((6, 5))), _init("b1", rng.standard_normal(5)),
             _init("w2", rng.standard_normal((7, 5))), _init("b2", rng.standard_normal((1, 7))),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
             _init("m1", rng.standard_normal((7, 3))), _init("c1", rng.standard_normal(3)),
             _init("m2", rng.standard_normal((7, 3)))]
    model = _model(nodes, inits, [_vi("x", [2, 6])], [_vi("z", [2, 1, 3])])
    fused, rep = fuse_and_compare(model, [(2, 6)])
    assert dict(ops(fused)) == {"Gemm": 1, "Unsqueeze": 1, "MatMul": 1, "Add": 1}, ops(fused)
    assert {"serial_merge", "linear_sum", "conv_bn_fold"} <= set(rep.fired_counts())


def test_identity_nodes_split_and_slice():
    """Identity/Dropout vanish; Split (sizes input) and Slice feed per-chunk convs, then BN after the cat."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Identity", ["x"], ["xi"], name="id"),
             helper.make_node("Split", ["xi", "sizes"], ["s0", "s1"], axis=1, name="split"),
             helper.make_node("Slice", ["xi", "st", "en", "ax"], ["s2"], name="slice"),
             helper.make_node("Conv", ["s0", "wa"], ["a"], pads=[1, 1, 1, 1], group=2, name="ca"),
             helper.make_node("Conv", ["s1", "wb"], ["b"], name="cb"),
             helper.make_node("Dropout", ["s2"], ["d"], name="drop"),
             helper.make_node("Conv", ["d", "wc"], ["c"], name="cc"),
             helper.make_node("Concat", ["a", "b", "c"], ["cat"], axis=1, name="cat"),
             helper.make_node("BatchNormalization", ["cat", "g", "be", "mu", "var"], ["y"], name="bn")]
    inits = [numpy_helper.from_array(np.array([2, 4], dtype=np.int64), "sizes"),
             numpy_helper.from_array(np.array([-3], dtype=np.int64), "st"),
             numpy_helper.from_array(np.array([2 ** 62], dtype=np.int64), "en"),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "ax"),
             _init("wa", rng.standard_normal((2, 1, 3, 3))), _init("wb", rng.standard_normal((4, 4, 1, 1))),
             _init("wc", rng.standard_normal((2, 3, 1, 1))), _init("g", rng.random(8) + 0.5),
             _init("be", rng.standard_normal(8)), _init("mu", rng.standard_normal(8)), _init("var", rng.random(8) + 0.5)]
    model = _model(nodes, inits, [_vi("x", [1, 6, 8, 8])], [_vi("y", [1, 8, 8, 8])])
    fused, rep = fuse_and_compare(model, [(1, 6, 8, 8)])
    assert dict(ops(fused)) == {"Split": 1, "Slice": 1, "Conv": 3, "Concat": 1}, ops(fused)
    assert {"identity_elim", "concat_affine_split", "conv_bn_fold"} <= set(rep.fired_counts())


def test_slice_bounds_computed_from_a_static_dim_of_a_dynamic_input():
    """torch's chunk export: Slice bounds from Shape(x)[1] / 2 fold (channels are static, batch is not)."""
    rng = np.random.default_rng(5)
    i64 = (lambda name, a: numpy_helper.from_array(np.asarray(a, dtype=np.int64), name))
    nodes = [helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "one"], ["c"], axis=0, name="gather"),
             helper.make_node("Div", ["c", "two"], ["half"], name="div"),
             helper.make_node("Unsqueeze", ["half", "zero1"], ["h1"], name="unsq"),
             helper.make_node("Slice", ["x", "zero1", "h1", "one1"], ["s0"], name="lo"),
             helper.make_node("Slice", ["x", "h1", "big", "one1"], ["s1"], name="hi"),
             helper.make_node("Conv", ["s0", "wa"], ["a"], pads=[1, 1, 1, 1], name="ca"),
             helper.make_node("Conv", ["s1", "wb"], ["b"], name="cb"),
             helper.make_node("Concat", ["a", "b"], ["cat"], axis=1, name="cat"),
             helper.make_node("BatchNormalization", ["cat", "g", "be", "mu", "var"], ["y"], name="bn")]
    inits = [i64("one", 1), i64("two", 2), i64("zero1", [0]), i64("one1", [1]), i64("big", [2 ** 62]),
             _init("wa", rng.standard_normal((3, 3, 3, 3))), _init("wb", rng.standard_normal((3, 3, 1, 1))),
             _init("g", rng.random(6) + 0.5), _init("be", rng.standard_normal(6)), _init("mu", rng.standard_normal(6)),
             _init("var", rng.random(6) + 0.5)]
    model = _model(nodes, inits, [_vi("x", ["N", 6, 8, 8])], [_vi("y", ["N", 6, 8, 8])])
    fused, rep = fuse_and_compare(model, [(2, 6, 8, 8)])
    assert ops(fused)["BatchNormalization"] == 0 and ops(fused)["Conv"] == 2
    assert {"concat_affine_split", "conv_bn_fold"} <= set(rep.fired_counts())


def test_shared_initializer_is_not_edited():
    """Two convs share one weight initializer; only one is followed by BN: the other stays as it was."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], pads=[1, 1, 1, 1], name="c1"),
             helper.make_node("BatchNormalization", ["a", "g", "be", "mu", "var"], ["y1"], name="bn"),
             helper.make_node("Conv", ["x", "w"], ["y2"], pads=[1, 1, 1, 1], name="c2")]
    inits = [_init("w", w), _init("g", rng.random(4) + 0.5), _init("be", rng.standard_normal(4)),
             _init("mu", rng.standard_normal(4)), _init("var", rng.random(4) + 0.5)]
    model = _model(nodes, inits, [_vi("x", [1, 4, 8, 8])], [_vi("y1", [1, 4, 8, 8]), _vi("y2", [1, 4, 8, 8])])
    onnx.helper.set_model_props(model, {"author": "someone", "license": "MIT"})
    fused, _ = fuse_and_compare(model, [(1, 4, 8, 8)])
    assert {p.key: p.value for p in fused.metadata_props} == {"author": "someone", "license": "MIT"}
    assert dict(ops(fused)) == {"Conv": 2}
    c2 = next(n for n in fused.graph.node if n.name == "c2")
    assert list(c2.input) == ["x", "w"]
    inits = {i.name: numpy_helper.to_array(i) for i in fused.graph.initializer}
    assert np.array_equal(inits["w"], w)
    c1 = next(n for n in fused.graph.node if n.output[0] == "y1")
    assert c1.input[1] != "w" and c1.input[1] in inits


def test_float16_model_gets_float16_initializers():
    rng = np.random.default_rng(4)

    def h(name, a):
        return numpy_helper.from_array(np.asarray(a, dtype=np.float16), name)

    nodes = [helper.make_node("Conv", ["x", "w3"], ["a"], pads=[1, 1, 1, 1], name="c3"),
             helper.make_node("BatchNormalization", ["a", "g", "be", "mu", "var"], ["an"], name="bn"),
             helper.make_node("Conv", ["x", "w1", "b1"], ["b"], name="c1"),
             helper.make_node("Add", ["an", "b"], ["y"], name="add")]
    inits = [h("w3", rng.standard_normal((4, 4, 3, 3)) * 0.3), h("g", rng.random(4) + 0.5),
             h("be", rng.standard_normal(4)), h("mu", rng.standard_normal(4) * 0.1), h("var", rng.random(4) + 0.5),
             h("w1", rng.standard_normal((4, 4, 1, 1)) * 0.3), h("b1", rng.standard_normal(4))]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT16, [1, 4, 8, 8]) for n in ("x", "y")]
    model = _model(nodes, inits, vi[:1], vi[1:])
    fused, rep = reparam.fuse_onnx(model, report=True, tolerance=1e-2)  # float16 rounding on both sides
    onnx.checker.check_model(fused, full_check=True)
    assert dict(ops(fused)) == {"Conv": 1}
    assert {i.data_type for i in fused.graph.initializer} == {TensorProto.FLOAT16}
    assert rep.verification.error_fp64 < 1e-12


@reparam.rule(reparam.P(reparam.ops.Sum, reparam.X("a"), reparam.X("b"), name="total"))
def halves(a, b, total):
    """a + b = 2·(½a − (−½b)): a user rule whose output needs scalar Mul, Sub and weighted sums in ONNX."""
    if total.op.coeffs != (1.0, 1.0):
        return None
    two = torch.tensor(2.0, dtype=torch.float64)
    minus_half = reparam.ops.Affine(-two / 4, None, None)(b)
    return reparam.ops.Affine(two, None, None)(reparam.ops.Sum((0.5, -1.0))(a, minus_half))


def test_user_rule_output_is_written_to_onnx():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("Sigmoid", ["x"], ["b"], name="sigmoid"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    model = _model(nodes, [], [_vi("x", [1, 4, 5, 5])], [_vi("y", [1, 4, 5, 5])])
    fused, rep = fuse_and_compare(model, [(1, 4, 5, 5)], rules=[], extra_rules=[halves])
    assert rep.fired_counts() == {"halves": 1}
    assert dict(ops(fused)) == {"Relu": 1, "Sigmoid": 1, "Mul": 3, "Sub": 1}, ops(fused)


# --- traps (transforms.md) stay two ops and exact -------------------------------------------------
class Sep1x11(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.a = nn.Conv2d(c, c, (1, 11), padding=(0, 5), groups=c)  # with bias
        self.b = nn.Conv2d(c, c, (11, 1), padding=(5, 0), groups=c)

    def forward(self, x):
        return self.b(self.a(x))


class BNBeforePadded(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.bn, self.conv = bn(c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(self.bn(x))


def test_traps_stay():
    fused, rep = fuse_and_compare(export(Sep1x11(), (1, 4, 16, 16)), [(1, 4, 16, 16)])
    assert dict(ops(fused)) == {"Conv": 2}
    assert any(r["rule"] == "serial_merge" for r in rep.refusals)
    fused, rep = fuse_and_compare(export(BNBeforePadded(), (1, 4, 16, 16)), [(1, 4, 16, 16)])
    assert dict(ops(fused)) == {"BatchNormalization": 1, "Conv": 1}
    assert any(r["rule"] == "bn_prefold" for r in rep.refusals)


def test_already_folded_export_still_gets_branch_fusion():
    """torch's exporter folds Conv+BN itself (eval, constant folding); the branches still merge."""
    model = export(RepVGG(), (1, 8, 12, 12), fold=True, training=torch.onnx.TrainingMode.EVAL)
    assert ops(model)["Conv"] == 2
    fused, _ = fuse_and_compare(model, [(1, 8, 12, 12)])
    assert dict(ops(fused)) == {"Conv": 1, "Relu": 1}


def test_dynamic_batch_stays_dynamic():
    model = export(ACNet(), (2, 8, 12, 12), input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    fused, _ = fuse_and_compare(model, [(2, 8, 12, 12)])
    feeds = feeds_for(model, [(5, 8, 12, 12)])
    assert relative_error(run_ort(fused, feeds), run_ort(model, feeds)) < 1e-5


def test_a_wrong_written_model_is_blamed_on_the_export_not_a_rule(monkeypatch):
    """The rewritten graph is right in float64 but the file written from it is not: the export's fault."""
    from reparam.frontends.onnx import backend

    real_export = backend.export_onnx

    def broken_export(graph, original):
        fused = real_export(graph, original)
        init = max(fused.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.01, init.name))
        return fused

    monkeypatch.setattr(backend, "export_onnx", broken_export)
    model = export(RepVGG(), (1, 8, 12, 12))
    with pytest.raises(reparam.VerificationError, match="only the written model differs") as info:
        reparam.fuse_onnx(model)
    assert info.value.rewrite is None


def test_a_wrong_rule_fails_onnx_verification_and_points_at_the_rules():
    from reparam.core.ops import Conv
    from reparam.core.pattern import P, X

    made = set()

    @reparam.rule(P(Conv, X("x"), name="conv"), name="off_by_a_bit")
    def off_by_a_bit(x, conv):
        """conv → 1.01·conv, once per conv (deliberately wrong)."""
        if id(conv.op.weight) in made:
            return None
        weight = conv.op.weight * 1.01
        made.add(id(weight))
        return conv.op.with_(weight=weight)(x)

    model = export(RepVGG(), (1, 8, 12, 12))
    with pytest.raises(reparam.VerificationError, match="first wrong rewrite: rule 'off_by_a_bit'") as info:
        reparam.fuse_onnx(model, extra_rules=[off_by_a_bit], check=False)
    assert info.value.rewrite.startswith("rule 'off_by_a_bit'")


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(reparam.ReparamError, match="does not exist"):
        reparam.fuse_onnx(tmp_path / "missing.onnx")
    model = export(RepVGG(), (1, 8, 12, 12))
    with pytest.raises(reparam.ReparamError, match="does not fit"):
        reparam.fuse_onnx(model, input_shapes=[(1, 3, 12, 12)])


# --- control flow: subgraphs read outer tensors by name --------------------------------------------
_S = [1, 4, 8, 8]


def _branch(name, op, reads, out):
    return helper.make_graph([helper.make_node(op, reads, [out])], name, [], [_vi(out, _S)])


def _loop_body(reads):
    """A Loop body adding the outer tensor ``reads`` to its carried state."""
    return helper.make_graph([helper.make_node("Identity", ["c_in"], ["c_out"]),
                              helper.make_node("Add", ["s_in", reads], ["s_out"])], "body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("c_in", TensorProto.BOOL, []), _vi("s_in", _S)],
                             [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), _vi("s_out", _S)])


def _conv_bn_then(control, seed=0):
    """x → Conv(a) → BatchNorm(y) → ``control`` (a node reading y as "s" and cond), whose subgraphs read
    outer tensors by name; outputs z."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["a", "g", "b", "m", "v"], ["y"], name="bn"), *control]
    inits = [_init("w", rng.standard_normal((4, 4, 3, 3))), _init("g", rng.random(4) + .5),
             _init("b", rng.standard_normal(4)), _init("m", rng.standard_normal(4)), _init("v", rng.random(4) + .5),
             numpy_helper.from_array(np.array(3, np.int64), "trip")]
    model = _model(nodes, inits, [_vi("x", _S), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                   [_vi("z", _S)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _fuse_control_flow(model):
    """Fuse; the subgraphs are written back byte for byte and both branches agree in onnxruntime."""
    fused, rep = reparam.fuse_onnx(model, report=True)
    onnx.checker.check_model(fused, full_check=True)
    kept = [n for n in model.graph.node if n.op_type in ("If", "Loop", "Scan")]
    written = [n for n in fused.graph.node if n.op_type in ("If", "Loop", "Scan")]
    assert [[a.SerializeToString() for a in n.attribute] for n in written] == [
        [a.SerializeToString() for a in n.attribute] for n in kept]
    rng = np.random.default_rng(3)
    for cond in (True, False):
        feeds = {"x": rng.standard_normal(_S).astype(np.float32), "cond": np.array(cond)}
        err = relative_error(run_ort(fused, feeds), run_ort(model, feeds))
        assert err < 1e-5, (cond, err)
    assert rep.verification.passed and rep.verification.error_fp64 is not None  # the float64 check ran too
    return fused, rep


def _nested_if_in_loop(reads):
    """A Loop whose body holds an If whose branches read the outer ``reads`` (two scopes up)."""
    inner = helper.make_node("If", ["c_in"], ["s_out"], then_branch=helper.make_graph(
        [helper.make_node("Add", ["s_in", reads], ["t"])], "then", [], [_vi("t", _S)]),
        else_branch=helper.make_graph([helper.make_node("Sub", ["s_in", reads], ["e"])], "else", [], [_vi("e", _S)]))
    body = helper.make_graph([helper.make_node("Identity", ["c_in"], ["c_out"]), inner], "body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("c_in", TensorProto.BOOL, []), _vi("s_in", _S)],
                             [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), _vi("s_out", _S)])
    return helper.make_node("Loop", ["trip", "cond", "y"], ["z"], body=body, name="loop")


@pytest.mark.parametrize("control", ["if", "nested"])
def test_subgraph_reading_a_conv_output_keeps_it(control):
    """The branches read the conv's output a, which Conv+BN folding would absorb: it is a consumer like any
    other, so the fold refuses, Conv and BatchNorm stay, and the If still finds a before it."""
    if control == "if":
        node = helper.make_node("If", ["cond"], ["z"], name="if", then_branch=_branch("then", "Relu", ["a"], "t"),
                                else_branch=_branch("else", "Add", ["a", "y"], "e"))
    else:
        node = _nested_if_in_loop("a")
    fused, rep = _fuse_control_flow(_conv_bn_then([node]))
    assert dict(ops(fused)) == {"Conv": 1, "BatchNormalization": 1, node.op_type: 1}
    assert "conv_bn_fold" not in rep.fired_counts()
    order = [o for n in fused.graph.node for o in n.output]
    assert order.index("a") < order.index("z")


@pytest.mark.parametrize("control", ["if", "loop"])
def test_control_flow_reading_only_the_input_lets_the_rest_fuse(control):
    """The subgraph reads only the graph input x (and the Loop carries y explicitly): Conv+BN fold as usual."""
    if control == "if":
        node = helper.make_node("If", ["cond"], ["z"], name="if", then_branch=_branch("then", "Relu", ["x"], "t"),
                                else_branch=_branch("else", "Neg", ["x"], "e"))
        node = [node, helper.make_node("Add", ["z0", "y"], ["z"])]
        node[0].output[0] = "z0"
    else:
        node = [helper.make_node("Loop", ["trip", "cond", "y"], ["z"], body=_loop_body("x"), name="loop")]
    fused, rep = _fuse_control_flow(_conv_bn_then(node))
    assert "BatchNormalization" not in ops(fused) and ops(fused)["Conv"] == 1
    assert rep.fired_counts().get("conv_bn_fold") == 1


def test_subgraph_reading_a_fused_value_reads_it_under_its_name():
    """The branches read y (the BN output) and y2 = Identity(y): Conv+BN fold, and the new conv writes y under
    that name (y2 through an Identity, identity_elim having bypassed the original), before the If."""
    extra = helper.make_node("Identity", ["y"], ["y2"], name="id")
    node = helper.make_node("If", ["cond"], ["z"], name="if", then_branch=_branch("then", "Relu", ["y"], "t"),
                            else_branch=_branch("else", "Add", ["y", "y2"], "e"))
    fused, rep = _fuse_control_flow(_conv_bn_then([extra, node]))
    assert rep.fired_counts().get("conv_bn_fold") == 1
    assert "BatchNormalization" not in ops(fused)
    order = [o for n in fused.graph.node for o in n.output]
    assert order.index("y") < order.index("z") and order.index("y2") < order.index("z")


def test_new_names_avoid_names_inside_subgraphs():
    """A name the exporter would give a new tensor is already used inside a branch: it picks another."""
    body_names = ["conv_Conv_output", "conv.weight", "conv.bias"]
    then = helper.make_graph([helper.make_node("Relu", ["x"], [body_names[0]]),
                              helper.make_node("Add", [body_names[0], "x"], [body_names[1]]),
                              helper.make_node("Neg", [body_names[1]], [body_names[2]])], "then", [],
                             [_vi(body_names[2], _S)])
    nodes = [helper.make_node("If", ["cond"], ["z0"], name="if", then_branch=then,
                              else_branch=_branch("else", "Neg", ["x"], "e")),
             helper.make_node("Relu", ["y"], ["r"], name="relu"), helper.make_node("Add", ["z0", "r"], ["z"])]
    fused, _ = _fuse_control_flow(_conv_bn_then(nodes))
    outer = {o for n in fused.graph.node for o in n.output} | {i.name for i in fused.graph.initializer}
    assert not outer & set(body_names) and "BatchNormalization" not in ops(fused)


# --- RepNeXt end to end, both exporters ----------------------------------------------------------
@pytest.fixture(scope="module")
def repnext_m0():
    from examples.repnext.model import repnext_m0
    from examples.repnext.utils import randomize_bn_stats

    return randomize_bn_stats(repnext_m0(), torch.Generator().manual_seed(0)).eval()


@pytest.mark.parametrize("dynamo", [False, True])
def test_repnext_m0(repnext_m0, dynamo):
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            model = torch.onnx.export(repnext_m0, (x,), dynamo=True, opset_version=18, verbose=False).model_proto
        else:
            f = io.BytesIO()
            torch.onnx.export(repnext_m0, (x,), f, dynamo=False, opset_version=17, do_constant_folding=False)
            model = onnx.load_from_string(f.getvalue())
    assert ops(model)["BatchNormalization"] > 0
    fused, rep = fuse_and_compare(model, [tuple(x.shape)])
    assert ops(fused)["Conv"] == 98
    assert ops(fused)["BatchNormalization"] == 0
    assert ops(fused)["Gemm"] + ops(fused)["MatMul"] == 1
