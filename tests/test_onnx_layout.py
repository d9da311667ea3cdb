"""ONNX Transpose as the core Permute: affine_through_layout on hand-built ONNX graphs (ConvNeXt's
``MatMul → Add → Transpose → BatchNormalization → Mul``, or a Conv before the Transpose), checked against
onnxruntime; a Transpose the rule cannot move past stays, and the result is still exact."""
from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import onnx
from hypothesis import given, strategies as st
from onnx import TensorProto, helper, numpy_helper

import reparam
from reparam.frontends.onnx.backend import relative_error, run_ort


def _init(name, a):
    return numpy_helper.from_array(np.asarray(a, dtype=np.float32), name)


def _model(nodes, inits, x_shape):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="handmade")
    m.ir_version = 8
    return onnx.shape_inference.infer_shapes(m)  # the output's shape (onnx.checker wants one)


def _layer(producer, sizes, out, rng):
    """x → the layer (MatMul + Add over [N, H, W, C], or a 3×3 Conv over [N, C, H, W]) → 'y'."""
    if producer == "linear":
        nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["y"])]
        inits = [_init("w", rng.standard_normal((sizes[3], out))), _init("b", rng.standard_normal(out))]
        return nodes, inits, list(sizes), sizes[:3] + [out]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])]
    inits = [_init("w", rng.standard_normal((out, sizes[3], 3, 3))), _init("b", rng.standard_normal(out))]
    return nodes, inits, [sizes[0], sizes[3], sizes[1], sizes[2]], [sizes[0], out, sizes[1], sizes[2]]


def _fuse(model, x_shape):
    fused, rep = reparam.fuse_onnx(model, report=True)
    onnx.checker.check_model(fused, full_check=True)
    x = np.random.default_rng(3).standard_normal(x_shape).astype(np.float32)
    assert relative_error(run_ort(fused, {"x": x}), run_ort(model, {"x": x})) < 1e-5
    return fused, rep, Counter(n.op_type for n in fused.graph.node)


@given(st.data(), st.sampled_from(["linear", "conv"]), st.booleans())
def test_affine_after_a_transpose_folds_into_the_layer(data, producer, with_perm):
    """BatchNormalization (as Mul + Add when it is not on axis 1) and a layer scale on the axis the layer's
    channels moved to: both move before the Transpose and fold into the layer; one Transpose is left."""
    rng = np.random.default_rng(data.draw(st.integers(0, 99)))
    sizes = [2, data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)), data.draw(st.integers(1, 5))]
    out = data.draw(st.integers(1, 6))
    nodes, inits, x_shape, y_shape = _layer(producer, sizes, out, rng)
    perm = data.draw(st.sampled_from(list(itertools.permutations(range(4))))) if with_perm else (3, 2, 1, 0)
    attrs = dict(perm=list(perm)) if with_perm else {}
    nodes.append(helper.make_node("Transpose", ["y"], ["t"], **attrs))
    axis = list(perm).index(3 if producer == "linear" else 1)  # where the channels went
    c = y_shape[perm[axis]]
    shape = [1] * 4
    shape[axis] = c
    if axis == 1:
        nodes.append(helper.make_node("BatchNormalization", ["t", "g", "beta", "mu", "var"], ["a"]))
        inits += [_init("g", rng.random(c) + 0.5), _init("beta", rng.standard_normal(c)),
                  _init("mu", rng.standard_normal(c)), _init("var", rng.random(c) + 0.5)]
    else:
        nodes += [helper.make_node("Mul", ["t", "s"], ["ts"]), helper.make_node("Add", ["ts", "sh"], ["a"])]
        inits += [_init("s", (rng.random(c) + 0.5).reshape(shape)), _init("sh", rng.standard_normal(c).reshape(shape))]
    nodes.append(helper.make_node("Mul", ["a", "gamma"], ["z"]))
    inits.append(_init("gamma", (rng.random(c) + 0.5).reshape(shape)))
    fused, rep, kinds = _fuse(_model(nodes, inits, x_shape), x_shape)
    assert rep.fired_counts().get("affine_through_layout", 0) >= 1, rep.summary()
    assert kinds["Transpose"] == 1 and kinds["BatchNormalization"] == 0, kinds
    transpose = next(n for n in fused.graph.node if n.op_type == "Transpose")  # a new one: the Permute emitter's
    assert [list(a.ints) for a in transpose.attribute if a.name == "perm"] == [list(perm)]
    layer = {"MatMul": 1, "Add": 1} if producer == "linear" else {"Conv": 1}
    assert {k: v for k, v in kinds.items() if k != "Transpose"} == layer, kinds


def test_an_affine_off_the_channel_axis_stays_after_the_transpose():
    """Linear over [N, H, W, C] → Transpose(0, 3, 1, 2) → an affine on axis 2 (H, not the channels): the
    Linear cannot absorb it, the rule refuses with the reason, and the graph is still exact."""
    rng = np.random.default_rng(0)
    nodes, inits, x_shape, _ = _layer("linear", [2, 3, 4, 5], 6, rng)
    nodes += [helper.make_node("Transpose", ["y"], ["t"], perm=[0, 3, 1, 2]), helper.make_node("Mul", ["t", "s"], ["z"])]
    inits.append(_init("s", (rng.random(3) + 0.5).reshape(1, 1, 3, 1)))
    fused, rep, kinds = _fuse(_model(nodes, inits, x_shape), x_shape)
    assert rep.fired_counts().get("affine_through_layout", 0) == 0
    assert any(r["rule"] == "affine_through_layout" and "channel axis" in r["detail"] for r in rep.refusals)
    assert kinds["Transpose"] == 1 and kinds["Mul"] == 1, kinds



def _head(target, x_shape=("n", 3, 4, 4)):
    """x → Conv → Relu → BatchNormalization → Reshape(target) → Gemm: the BatchNorm moves through the
    flatten into the Gemm (affine_through_pool, bn_prefold) only if the Reshape is seen as a flatten."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("BatchNormalization", ["r", "g", "beta", "mu", "var"], ["b"]),
             helper.make_node("Reshape", ["b", "shape"], ["f"]),
             helper.make_node("Gemm", ["f", "W", "B"], ["z"], transB=1)]
    inits = [_init("w", rng.standard_normal((3, 3, 3, 3))), _init("g", rng.random(3) + 0.5),
             _init("beta", rng.standard_normal(3)), _init("mu", rng.standard_normal(3)), _init("var", rng.random(3) + 0.5),
             numpy_helper.from_array(np.asarray(target, dtype=np.int64), "shape"),
             _init("W", rng.standard_normal((5, 48))), _init("B", rng.standard_normal(5))]
    return _model(nodes, inits, list(x_shape))


def test_a_reshape_that_flattens_is_a_flatten():
    """Reshape(x, [0, -1]) on a dynamic batch (what a `view(n, -1)` or Paddle's flatten becomes) is Flatten(1, -1):
    the BatchNorm before it ends in the Gemm, and the written model still takes any batch."""
    model = _head([0, -1])
    fused, rep, kinds = _fuse(model, (1, 3, 4, 4))
    assert kinds["BatchNormalization"] == 0 and rep.fired_counts().get("bn_prefold") == 1, rep.fired_counts()
    x = np.random.default_rng(1).standard_normal((3, 3, 4, 4)).astype(np.float32)
    assert relative_error(run_ort(fused, {"x": x}), run_ort(model, {"x": x})) < 1e-5


@pytest.mark.parametrize("target", [[1, 48], [-1, 48]], ids=["batch-literal", "batch-inferred"])
def test_a_reshape_that_is_a_flatten_only_at_one_size_stays(target):
    """With a dynamic batch, Reshape(x, [1, 48]) is a flatten only for batch 1: it stays opaque (so does
    [-1, 48], which a stricter reading leaves alone), the BatchNorm stays before it, and the result is exact."""
    fused, rep, kinds = _fuse(_head(target), (1, 3, 4, 4))
    assert kinds["Reshape"] == 1 and kinds["BatchNormalization"] + kinds["Mul"] >= 1, kinds


@pytest.mark.parametrize("x_shape, target, want", [
    (("n", 3, 4, 4), [0, -1], (1, 3)), (("n", 3, 4, 4), [0, 3, -1], (2, 3)), (("n", 3, 4, 4), [0, 0, 16], (2, 3)),
    (("n", 3, 4, 4), [0, 12, 4], (1, 2)), ((2, 3, 4, 4), [2, 48], (1, 3)), (("n", 3, 4, 4), [0, 16, 3], "reshape"),
    (("n", 3, 4, 4), [1, 16, 3], None),
    (("n", 3, 4, 4), [1, 48], None), (("n", 3, "h", 4), [0, -1], None), (("n", 3, 4, 4), [0, 3, 4, 4], "identity")])
def test_which_reshapes_are_flattens(x_shape, target, want):
    """Flatten(s, e) exactly when the Reshape merges one run of static axes and keeps the others for every
    input size (0 copies an axis in place; a literal must be the axis's static size); any other reshape of the
    batch's samples to fixed sizes is the op kind Reshape (rules/reshape.py); a literal batch stays opaque."""
    from reparam.core.ops import Flatten, Identity, Opaque
    from reparam.frontends.onnx.importer import import_onnx
    from reparam.frontends.onnx.shapes import resolve_input_shapes, with_input_shapes

    g = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["z"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.asarray(target, dtype=np.int64), "shape")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    op = import_onnx(model, with_input_shapes(model, resolve_input_shapes(model))).outputs[0].op
    if want is None:
        assert isinstance(op, Opaque), op
    elif want == "identity":
        assert isinstance(op, Identity), op
    elif want == "reshape":
        from reparam.rules.reshape import Reshape

        assert isinstance(op, Reshape) and op.rest == (16, 3), op
    else:
        assert isinstance(op, Flatten) and (op.start_dim, op.end_dim) == want, op
