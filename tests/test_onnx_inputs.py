"""ONNX files as others write them: one test per bug measured on real-world files (issue: "ONNX on real-world
files"), each built from its description with onnx.helper. The written model must never be wrong, and errors
in the input are the user's: one line, exit 2 on the command line.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import AttributeProto, TensorProto, helper, numpy_helper

import reparam
from reparam.errors import ReparamError
from reparam.frontends.onnx.backend import relative_error, run_ort
from reparam.frontends.onnx.validate import dataflow

RNG = np.random.default_rng(0)


def init(name, a):
    return numpy_helper.from_array(np.asarray(a, dtype=np.float32), name)


def vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def model_of(nodes, inits, inputs, outputs, opset=17, ir=8):
    """A model; outputs given without a shape get the inferred one (onnx.checker wants one)."""
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # the broken models of the error tests
        return model
    known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for out in model.graph.output:
        if not out.type.tensor_type.HasField("shape") and out.name in known:
            out.type.CopyFrom(known[out.name].type)
    return model


def conv_bn(c=4, x="x", y="y", prefix=""):
    """Conv(3×3, bias) → BatchNormalization: the smallest thing the rules fold."""
    p = prefix
    nodes = [helper.make_node("Conv", [x, p + "W", p + "B"], [p + "c"], pads=[1, 1, 1, 1], name=p + "conv"),
             helper.make_node("BatchNormalization", [p + "c", p + "s", p + "t", p + "m", p + "v"], [y],
                              name=p + "bn")]
    inits = [init(p + "W", RNG.standard_normal((c, c, 3, 3)) * 0.3), init(p + "B", RNG.standard_normal(c)),
             init(p + "s", RNG.random(c) + 0.5), init(p + "t", RNG.standard_normal(c)),
             init(p + "m", RNG.standard_normal(c) * 0.1), init(p + "v", RNG.random(c) + 0.5)]
    return nodes, inits


def ops(model) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def ort(model, **feeds):
    return run_ort(model, {k: np.asarray(v) for k, v in feeds.items()})


def x_of(shape=(1, 4, 6, 6)):
    return RNG.standard_normal(shape).astype(np.float32)


# --- initializers that are also graph inputs -----------------------------------------------------------
def _defaults_model():
    nodes, inits = conv_bn()
    inputs = [vi("x", [1, 4, 6, 6])] + [vi(i.name, list(i.dims)) for i in inits]  # keep_initializers_as_inputs
    return model_of(nodes, inits, inputs, [vi("y", None)])


def test_initializer_inputs_stay_inputs_and_what_a_caller_feeds_is_used():
    model = _defaults_model()
    fused, rep = reparam.fuse_onnx(model, report=True)
    assert [i.name for i in fused.graph.input] == [i.name for i in model.graph.input]
    assert any("overridable defaults" in n for n in rep.notes), rep.notes
    x, w = x_of(), (RNG.standard_normal((4, 4, 3, 3)) * 0.3).astype(np.float32)
    assert relative_error(ort(fused, x=x), ort(model, x=x)) < 1e-5  # the defaults are still there
    assert relative_error(ort(fused, x=x, W=w), ort(model, x=x, W=w)) < 1e-5  # and a fed value wins


def test_freeze_initializer_inputs_folds_them_and_removes_them_from_the_inputs():
    model = _defaults_model()
    fused, rep = reparam.fuse_onnx(model, freeze_initializer_inputs=True, report=True)
    assert [i.name for i in fused.graph.input] == ["x"]
    assert ops(fused) == {"Conv": 1}
    assert any("froze 6 initializer(s)" in n for n in rep.notes), rep.notes
    x = x_of()
    assert relative_error(ort(fused, x=x), ort(model, x=x)) < 1e-5


def test_freeze_inputs_on_the_command_line(tmp_path):
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(_defaults_model(), src)
    r = _cli("fuse", str(src), "-o", str(out), "--freeze-inputs", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert any("froze" in n for n in doc["report"]["notes"])
    assert [i.name for i in onnx.load(out).graph.input] == ["x"]


def test_below_ir_4_initializers_are_constants_and_new_ones_are_constant_nodes():
    nodes, inits = conv_bn()
    inputs = [vi("x", [1, 4, 6, 6])] + [vi(i.name, list(i.dims)) for i in inits]  # IR 3: every one listed
    model = model_of(nodes, inits, inputs, [vi("y", None)], opset=8, ir=3)
    fused = reparam.fuse_onnx(model)
    onnx.checker.check_model(fused, full_check=True)
    assert fused.ir_version == 3 and "BatchNormalization" not in ops(fused)
    listed = {i.name for i in fused.graph.input}
    assert all(i.name in listed for i in fused.graph.initializer)
    x = x_of()
    assert relative_error(ort(fused, x=x), ort(model, x=x)) < 1e-5


# --- dynamic dims whatever their spelling --------------------------------------------------------------
def test_dim_value_minus_one_is_dynamic():
    nodes, inits = conv_bn()
    model = model_of(nodes, inits, [vi("x", [-1, 4, "h", -1])], [vi("y", None)])  # Paddle writes -1
    fused, rep = reparam.fuse_onnx(model, report=True)
    assert ops(fused) == {"Conv": 1} and rep.verification.passed
    dims = fused.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == -1 and dims[2].dim_param == "h"  # the interface is the original's
    fused2 = reparam.fuse_onnx(model, input_shapes={"x": (2, 4, 5, 7)})
    x = x_of((2, 4, 5, 7))
    assert relative_error(ort(fused2, x=x), ort(model, x=x)) < 1e-5


# --- multi-output nodes --------------------------------------------------------------------------------
def _lstm(outputs_are_graph_outputs: bool):
    h, t, d = 3, 5, 2
    lstm = helper.make_node("LSTM", ["x", "W", "R", ""], ["Y", "Y_h", "Y_c"], hidden_size=h, name="lstm")
    inits = [init("W", RNG.standard_normal((1, 4 * h, d))), init("R", RNG.standard_normal((1, 4 * h, h)))]
    nodes = [lstm]
    if outputs_are_graph_outputs:
        outs = [vi("Y", None), vi("Y_h", None), vi("Y_c", None)]
    else:
        nodes += [helper.make_node("Relu", ["Y_h"], ["a"]), helper.make_node("Relu", ["Y_c"], ["b"]),
                  helper.make_node("Add", ["a", "b"], ["out"])]
        outs = [vi("Y", None), vi("out", None)]
    return model_of(nodes, inits, [vi("x", [t, 1, d])], outs)


@pytest.mark.parametrize("graph_outputs", [True, False])
def test_a_multi_output_node_with_an_omitted_input_is_written_once(graph_outputs):
    model = _lstm(graph_outputs)
    fused = reparam.fuse_onnx(model)
    onnx.checker.check_model(fused, full_check=True)
    assert ops(fused)["LSTM"] == 1, ops(fused)


# --- untouched nodes are copied ------------------------------------------------------------------------
def test_untouched_nodes_are_copied_with_their_attributes():
    nodes, inits = conv_bn()
    axes = AttributeProto(name="axes", type=AttributeProto.INTS)  # axes=[]: onnx.helper cannot even write it
    rmax = helper.make_node("ReduceMax", ["y"], ["z"], name="rmax", keepdims=1)
    rmax.attribute.append(axes)
    model = model_of(nodes + [rmax], inits, [vi("x", [1, 4, 6, 6])], [vi("z", None)], opset=13)
    fused = reparam.fuse_onnx(model)
    kept = next(n for n in fused.graph.node if n.name == "rmax")
    assert list(kept.attribute) == list(rmax.attribute) and kept.op_type == rmax.op_type  # inputs re-pointed only
    x = x_of()
    assert relative_error(ort(fused, x=x), ort(model, x=x)) < 1e-5


def test_ceil_mode_pool_in_a_fused_chain_is_verified():
    nodes, inits = conv_bn(x="p")
    pool = helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                            ceil_mode=1)
    mpool = helper.make_node("MaxPool", ["y"], ["z"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
    model = model_of([pool] + nodes + [mpool], inits, [vi("x", [1, 4, 7, 7])], [vi("z", None)])
    fused, rep = reparam.fuse_onnx(model, report=True)  # the engine checks every rewrite locally
    assert "BatchNormalization" not in ops(fused) and rep.verification.passed
    x = x_of((1, 4, 7, 7))
    assert relative_error(ort(fused, x=x), ort(model, x=x)) < 1e-5


# --- Constant nodes ------------------------------------------------------------------------------------
def test_constant_nodes_become_initializers():
    nodes, inits = conv_bn()
    k = helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.float32([0.5]), "kv"))
    shape = helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.int64([1, -1]), "sv"))
    nodes += [k, shape, helper.make_node("Mul", ["y", "k"], ["h"]), helper.make_node("HardSigmoid", ["h"], ["hs"]),
              helper.make_node("Reshape", ["hs", "shape"], ["z"])]
    model = model_of(nodes, inits, [vi("x", [1, 4, 6, 6])], [vi("z", None)])
    fused = reparam.fuse_onnx(model)
    assert "Constant" not in ops(fused), ops(fused)
    assert len(fused.graph.node) <= 3
    x = x_of()
    assert relative_error(ort(fused, x=x), ort(model, x=x)) < 1e-5


# --- inputs: shapes by name, integer values, an original that cannot run ------------------------------
def _reshape_by_input():
    nodes, inits = conv_bn()
    nodes.append(helper.make_node("Reshape", ["y", "shape"], ["z"]))
    return model_of(nodes, inits, [vi("x", [1, 4, 6, 6]), vi("shape", [2], TensorProto.INT64)], [vi("z", None)])


def test_an_original_that_cannot_run_is_one_clear_line_and_integer_values_can_be_given():
    model = _reshape_by_input()
    with pytest.raises(ReparamError) as err:
        reparam.fuse_onnx(model)  # 'shape' fed zeros: Reshape cannot run
    text = str(err.value)
    assert "\n" not in text and "cannot run" in text and "input_values" in text and "'shape'" in text
    fused, rep = reparam.fuse_onnx(model, input_values={"shape": [1, -1]}, report=True)
    assert rep.verification.passed
    x = x_of()
    assert relative_error(ort(fused, x=x, shape=np.int64([4, -1])), ort(model, x=x, shape=np.int64([4, -1]))) < 1e-5
    with pytest.raises(ReparamError, match="unknown input"):
        reparam.fuse_onnx(model, input_values={"nope": 1})


def test_input_shapes_by_name():
    nodes, inits = conv_bn(prefix="a_", x="x1", y="y1")
    more, inits2 = conv_bn(prefix="b_", x="x2", y="y2")
    model = model_of(nodes + more, inits + inits2, [vi("x1", [1, 4, "h", "w"]), vi("x2", [1, 4, "h2", "w2"])],
                     [vi("y1", None), vi("y2", None)])
    fused, rep = reparam.fuse_onnx(model, input_shapes={"x2": (1, 4, 3, 9)}, report=True)
    assert rep.verification.input_shapes == [[1, 4, 64, 64], [1, 4, 3, 9]]
    with pytest.raises(ReparamError, match="does not fit"):
        reparam.fuse_onnx(model, input_shapes={"x1": (1, 5, 3, 3)})


# --- errors in the input are the user's ---------------------------------------------------------------
def _cli(*args):
    script = Path(sys.executable).parent / "reparam"  # the installed console script
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=300)


def _dangling():
    return model_of([helper.make_node("Relu", ["nowhere"], ["y"], name="r")], [], [vi("x", [1])], [vi("y", None)])


def _cycle():
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="first"), helper.make_node("Relu", ["a"], ["b"],
                                                                                         name="second")]
    return model_of(nodes, [], [vi("x", [1])], [vi("b", None)])


def _checker_fails():
    return model_of([helper.make_node("Relu", ["x"], ["y"], alpha=1.0)], [], [vi("x", [1])], [vi("y", None)])


def _huge():
    nodes, inits = conv_bn()
    return model_of(nodes, inits, [vi("x", [4096, 4, 4096, 4096])], [vi("y", None)])


BAD = {"dangling": (_dangling, "reads 'nowhere'"), "cycle": (_cycle, "cycle"),
       "checker": (_checker_fails, "onnx.checker"), "huge": (_huge, "GiB")}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_input_is_one_line_exit_2(case, tmp_path):
    make, words = BAD[case]
    with pytest.raises(ReparamError, match=words):
        reparam.fuse_onnx(make())
    src = tmp_path / "bad.onnx"
    onnx.save(make(), src)
    r = _cli("fuse", str(src), "-o", str(tmp_path / "out.onnx"), "-q")
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and words in r.stderr and "internal" not in r.stderr, r.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_an_empty_file_is_the_users_error(tmp_path):
    src = tmp_path / "empty.onnx"
    src.write_bytes(b"")
    with pytest.raises(ReparamError, match="empty"):
        reparam.fuse_onnx(str(src))
    r = _cli("fuse", str(src), "-o", str(tmp_path / "out.onnx"), "-q")
    assert r.returncode == 2 and "empty" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    with pytest.raises(ReparamError, match="no graph"):
        reparam.fuse_onnx(b"")


def test_dataflow_is_a_networkx_graph():
    g, dangling = dataflow(_cycle().graph)
    assert sorted(g.edges) == [(0, 1), (1, 0)] and dangling == []


# --- stdout carries only reparam's output --------------------------------------------------------------
def test_library_messages_stay_off_stdout(capfd, monkeypatch):
    from onnx_graphsurgeon.logger import G_LOGGER
    import reparam.frontends.onnx.importer as importer

    real = importer.gs.import_onnx

    def noisy(model):
        G_LOGGER.warning("a warning onnx-graphsurgeon would print")
        print("something a library prints")
        return real(model)

    monkeypatch.setattr(importer.gs, "import_onnx", noisy)
    nodes, inits = conv_bn()
    reparam.fuse_onnx(model_of(nodes, inits, [vi("x", [1, 4, 6, 6])], [vi("y", None)]))
    out, err = capfd.readouterr()
    assert out == "" and "a warning" not in err and "something a library prints" in err


def test_the_float64_check_says_when_it_cannot_run(monkeypatch):
    import reparam.frontends.onnx.backend as backend

    def fails(*a, **k):
        raise RuntimeError("no reference for this node")

    monkeypatch.setattr(backend, "evaluate_f64", fails)
    nodes, inits = conv_bn()
    _, rep = reparam.fuse_onnx(model_of(nodes, inits, [vi("x", [1, 4, 6, 6])], [vi("y", None)]), report=True)
    assert rep.verification.error_fp64 is None and rep.verification.passed
    assert any("no float64 check" in n and "no reference for this node" in n for n in rep.notes), rep.notes


# --- old opsets: onnx.reference runs each node at the model's opset ---------------------------------------
def test_folding_and_the_float64_check_run_each_node_at_the_models_opset():
    """Squeeze took ``axes`` as an attribute before opset 13; run as a bare node, onnx.reference would use the
    newest Squeeze, ignore the attribute and drop every unit dim: a wrong fold, a float64 check that cannot run."""
    nodes, inits = conv_bn()
    k = numpy_helper.from_array(RNG.standard_normal((1, 1, 3)).astype(np.float32), "k13")
    nodes += [helper.make_node("Squeeze", ["k13"], ["sq"], axes=[0]),  # (1, 3): folded on import
              helper.make_node("Squeeze", ["y"], ["z"], axes=[0]),  # (4, 1, 4): run in float64
              helper.make_node("Transpose", ["z"], ["zt"], perm=[0, 2, 1]),  # (4, 4, 1)
              helper.make_node("MatMul", ["zt", "sq"], ["out"])]  # (4, 4, 3)
    model = model_of(nodes, inits + [k], [vi("x", [1, 4, 1, 4])], [vi("out", [4, 4, 3])], opset=11)
    fused, rep = reparam.fuse_onnx(model, report=True)
    assert rep.verification.error_fp64 is not None, rep.notes
    x = x_of((1, 4, 1, 4))
    got, want = ort(fused, x=x), ort(model, x=x)
    assert got[0].shape == want[0].shape == (4, 4, 3)
    assert relative_error(got, want) < 1e-5
