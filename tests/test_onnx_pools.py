"""Ceil-mode pools (issue 12): sized and evaluated as PyTorch and ONNX Runtime do, on FX and ONNX.

In ceil mode a pool's last window is kept only if it starts inside the input or its left padding
(``reparam.core.ops.pool_len``). ONNX shape inference (onnx 1.23) leaves that rule out, so every size after such
a pool was one too big where it bites, and a correct rewrite that reads a size (a BatchNorm moved through a
Flatten into the Gemm) failed its local check with ``RewriteMismatch``. ``onnx.reference`` averages the wrong
windows of a ceil-mode AveragePool, so the float64 check evaluates ONNX pools itself. Each property below
compares reparam with torch and with ONNX Runtime over kernel sizes, strides, pads, dilations and ceil_mode."""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, strategies as st
from onnx import TensorProto, helper, numpy_helper

import reparam
from reparam.core.ops import AvgPool, pool_len
from reparam.frontends.onnx import evaluate, shapes
from reparam.frontends.onnx.backend import relative_error
from reparam.testing import randomize_params



def _session(model: onnx.ModelProto):
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@st.composite
def windows(draw, nd=None, dilated=True, symmetric=False, max_n=9):
    """One pool's geometry: (sizes, kernel, strides, pads lo + hi, dilations, ceil_mode), each pad smaller than
    the kernel (ONNX Runtime's condition; PyTorch wants pad ≤ kernel / 2, drawn with ``symmetric``)."""
    nd = nd or draw(st.integers(1, 2))
    ks = [draw(st.integers(1, 4)) for _ in range(nd)]
    ds = [draw(st.integers(1, 3)) if dilated else 1 for _ in range(nd)]
    ext = [d * (k - 1) + 1 for d, k in zip(ds, ks)]
    if symmetric:
        lo = [draw(st.integers(0, k // 2)) for k in ks]
        hi = lo
    else:
        lo = [draw(st.integers(0, k - 1)) for k in ks]
        hi = [draw(st.integers(0, k - 1)) for k in ks]
    sizes = [draw(st.integers(max(1, e - a - b), max(1, e - a - b) + max_n)) for e, a, b in zip(ext, lo, hi)]
    strides = [draw(st.integers(1, 4)) for _ in range(nd)]
    return sizes, ks, strides, lo + hi, ds, draw(st.booleans())


def _pool_node(op, ks, strides, pads, ds, ceil, x="x", y="y", cip=0):
    attrs = dict(kernel_shape=ks, strides=strides, pads=pads, ceil_mode=int(ceil))
    if op in ("MaxPool", "LpPool"):
        attrs["dilations"] = ds
    else:
        attrs["count_include_pad"] = cip
    return helper.make_node(op, [x], [y], **attrs)


def _model(nodes, x_shape, outputs=("y",), inits=(), opset=17):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


# --- sizing -----------------------------------------------------------------------------------------------
@given(windows(symmetric=True), st.sampled_from(["max", "avg"]))
def test_pool_len_is_torchs(w, kind):
    sizes, ks, strides, pads, ds, ceil = w
    nd = len(ks)
    x = torch.zeros(1, 1, *sizes)
    if kind == "max":
        y = (F.max_pool1d, F.max_pool2d)[nd - 1](x, ks, strides, pads[:nd], ds, ceil)
    else:
        ds = [1] * nd
        y = (F.avg_pool1d, F.avg_pool2d)[nd - 1](x, ks, strides, pads[:nd], ceil)
        assert AvgPool(tuple(ks), tuple(strides), tuple(pads[:nd]), ceil).output_shape([x.shape]) == tuple(y.shape)
    want = [pool_len(n, p, p, d * (k - 1) + 1, s, ceil) for n, p, k, s, d in zip(sizes, pads, ks, strides, ds)]
    assert list(y.shape[2:]) == want


@given(windows(), st.sampled_from(["MaxPool", "AveragePool", "LpPool"]))
def test_pool_len_and_corrected_inference_are_onnxruntimes(w, op):
    """pool_len with asymmetric pads and dilations is the size ONNX Runtime computes, and so is the size
    reparam's shape inference gives the pool's output and the conv after it."""
    sizes, ks, strides, pads, ds, ceil = w
    nd = len(ks)
    ds = ds if op == "MaxPool" else [1] * nd
    w1 = numpy_helper.from_array(np.ones((1, 1, *[1] * nd), np.float32), "w")
    nodes = [_pool_node(op, ks, strides, pads, ds, ceil), helper.make_node("Conv", ["y", "w"], ["z"])]
    model = _model(nodes, [1, 1, *sizes], ("y", "z"), [w1], opset=18 if op == "LpPool" else 17)
    got = _session(model).run(None, {"x": np.zeros((1, 1, *sizes), np.float32)})
    want = [pool_len(n, pads[i], pads[i + nd], ds[i] * (ks[i] - 1) + 1, strides[i], ceil) for i, n in enumerate(sizes)]
    assert list(got[0].shape[2:]) == want
    inferred, _ = shapes.value_infos(shapes.infer(model))
    assert inferred["y"] == got[0].shape and inferred["z"] == got[1].shape


def test_inference_corrects_pools_in_a_chain():
    """Two ceil-mode pools in a row, each wrongly sized by ONNX shape inference: the second is judged on the
    corrected output of the first."""
    nodes = [_pool_node("MaxPool", [2, 2], [2, 2], [1, 1, 1, 1], [1, 1], True, y="p"),
             _pool_node("AveragePool", [1, 1], [2, 2], [0, 0, 0, 0], [1, 1], True, x="p", y="y")]
    model = _model(nodes, [1, 2, 7, 7], ("p", "y"))
    raw, _ = shapes.value_infos(onnx.shape_inference.infer_shapes(model))
    fixed, _ = shapes.value_infos(shapes.infer(model))
    got = _session(model).run(None, {"x": np.zeros((1, 2, 7, 7), np.float32)})
    assert raw["p"] != got[0].shape  # what onnx itself says (if onnx fixes this, the correction is idle)
    assert (fixed["p"], fixed["y"]) == (got[0].shape, got[1].shape) == ((1, 2, 4, 4), (1, 2, 2, 2))


# --- evaluation ---------------------------------------------------------------------------------------------
@given(windows(), st.sampled_from(["MaxPool", "AveragePool"]), st.booleans(), st.integers(0, 2 ** 16))
def test_float64_pools_are_onnxruntimes(w, op, cip, seed):
    """The float64 check's own pools (ceil_mode, count_include_pad, asymmetric pads, dilations) against ONNX
    Runtime's values."""
    sizes, ks, strides, pads, ds, ceil = w
    nd = len(ks)
    ds = ds if op == "MaxPool" else [1] * nd
    model = _model([_pool_node(op, ks, strides, pads, ds, ceil, cip=int(cip))], [1, 2, *sizes])
    x = np.random.default_rng(seed).standard_normal((1, 2, *sizes))
    want = _session(model).run(None, {"x": x.astype(np.float32)})[0]
    import onnx_graphsurgeon as gs

    node = gs.import_onnx(model).nodes[0]
    got = evaluate._pool(node, x)
    if got is None:  # left to onnx.reference: only a dilated max window that sees padding alone
        assert op == "MaxPool" and bool((want <= np.finfo(np.float32).min).any())
        return
    assert tuple(got.shape) == want.shape
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


@given(windows(symmetric=True, dilated=False), st.booleans(), st.integers(0, 2 ** 16))
def test_torch_ceil_mode_avg_pool_is_onnxruntimes(w, cip, seed):
    """AvgPool's own semantics (torch) equal ONNX Runtime's AveragePool in ceil mode, divisors included."""
    sizes, ks, strides, pads, _, ceil = w
    nd = len(ks)
    model = _model([_pool_node("AveragePool", ks, strides, pads, [1] * nd, ceil, cip=int(cip))], [1, 2, *sizes])
    x = torch.randn(1, 2, *sizes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    want = _session(model).run(None, {"x": x.float().numpy()})[0]
    got = AvgPool(tuple(ks), tuple(strides), tuple(pads[:nd]), ceil, cip).evaluate(x)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


# --- end to end: FX and ONNX ------------------------------------------------------------------------------
class _Head(nn.Module):
    """conv → ceil-mode pool → conv → BN → flatten → BN1d → Linear: bn_prefold folds the BN1d into the Linear
    with the flattened size the pool's ceil mode decides (48 here, 75 with the naive formula)."""

    def __init__(self, pool):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), pool, nn.Conv2d(3, 3, 3, padding=1),
                                 nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(48), nn.Linear(48, 5))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2, 2, 1, ceil_mode=True), nn.AvgPool2d(2, 2, 1, ceil_mode=True)],
                         ids=["max", "avg"])
def test_a_ceil_mode_pool_before_a_flatten_fuses_on_fx_and_onnx(pool):
    model = randomize_params(_Head(pool), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(1, 3, 7, 7)
    fused, rep = reparam.fuse(model, x, report=True)
    assert rep.verification.passed and rep.fired_counts().get("bn_prefold") == 1
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamic H, W: a static export does not even load in ONNX Runtime,
        torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=17, input_names=["x"],  # whose own
                          dynamic_axes={"x": {2: "h", 3: "w"}})  # inference sizes the pool with the naive formula
    proto = onnx.load_from_string(buffer.getvalue())
    out, rep = reparam.fuse_onnx(proto, input_shapes={"x": (1, 3, 7, 7)}, report=True)
    assert rep.verification.passed and rep.verification.error_fp64 is not None, rep.verification
    assert rep.fired_counts().get("bn_prefold") == 1 and not any(n.op_type == "BatchNormalization" for n in out.graph.node)
    feeds = {"x": x.numpy()}
    assert relative_error(_session(out).run(None, feeds), _session(proto).run(None, feeds)) < 1e-5


@given(windows(dilated=False), st.sampled_from(["MaxPool", "AveragePool"]),
       st.sampled_from(["SAME_UPPER", "SAME_LOWER", "VALID"]))
def test_auto_padded_pools_are_sized_as_onnxruntime_does(w, op, auto_pad):
    """auto_pad SAME_UPPER / SAME_LOWER / VALID with and without ceil_mode: the inferred size is ONNX Runtime's."""
    sizes, ks, strides, _, _, ceil = w
    nd = len(ks)
    node = helper.make_node(op, ["x"], ["y"], kernel_shape=ks, strides=strides, ceil_mode=int(ceil), auto_pad=auto_pad)
    model = _model([node], [1, 1, *sizes])
    try:
        got = _session(model).run(None, {"x": np.zeros((1, 1, *sizes), np.float32)})[0]
    except Exception:  # ONNX Runtime refuses this geometry (a kernel larger than the input, say)
        return
    inferred, _ = shapes.value_infos(shapes.infer(model))
    assert inferred["y"] == got.shape, (nd, inferred["y"], got.shape)


@given(windows(dilated=False), st.booleans(), st.integers(0, 2 ** 16))
def test_imported_average_pools_are_onnxruntimes(w, cip, seed):
    """An AveragePool (ceil_mode too) is the core AvgPool when its pads are symmetric and at most half the kernel
    (torch's domain), and then AvgPool.evaluate is what onnxruntime computes; otherwise it stays opaque."""
    from reparam.core.ops import Opaque
    from reparam.frontends.onnx.importer import import_onnx

    sizes, ks, strides, pads, _, ceil = w
    nd = len(ks)
    model = _model([_pool_node("AveragePool", ks, strides, pads, [1] * nd, ceil, cip=int(cip))], [1, 2, *sizes])
    op = import_onnx(model, shapes.with_input_shapes(model, shapes.resolve_input_shapes(model))).outputs[0].op
    torch_like = pads[:nd] == pads[nd:] and all(2 * p <= k for p, k in zip(pads, ks))
    if not torch_like:
        assert isinstance(op, Opaque)
        return
    assert isinstance(op, AvgPool) and op.ceil_mode == ceil and op.count_include_pad == cip
    x = torch.randn(1, 2, *sizes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    want = _session(model).run(None, {"x": x.float().numpy()})[0]
    np.testing.assert_allclose(op.evaluate(x).numpy(), want, rtol=1e-5, atol=1e-6)


def test_a_new_ceil_mode_avg_pool_is_written_with_ceil_mode():
    """A rule that writes a new ceil-mode AvgPool (a scalar moved before the pool) gets an AveragePool with
    ceil_mode=1, checked by the exporter against AvgPool's own semantics, and the model stays exact."""
    from reparam.core.ops import Affine
    from reparam.core.pattern import P, X
    from reparam.core.rule import rule

    @rule(P(Affine, P(AvgPool, X("x"), name="pool"), name="a", where=lambda op: op.is_scalar and op.shift is None))
    def scalar_before_pool(x, pool, a):
        """s·pool(x) = pool(s·x): a scalar scale commutes with averaging (any windows)."""
        return pool.op(a.op(x))

    scale = numpy_helper.from_array(np.float32(0.5), "s")
    nodes = [_pool_node("AveragePool", [3, 3], [2, 2], [1, 1, 1, 1], [1, 1], True, y="p", cip=1),
             helper.make_node("Mul", ["p", "s"], ["y"])]
    model = _model(nodes, [1, 2, 8, 8], inits=[scale])
    model = onnx.shape_inference.infer_shapes(model)
    fused, rep = reparam.fuse_onnx(model, rules=[scalar_before_pool], report=True)
    assert rep.fired_counts() == {"scalar_before_pool": 1} and rep.verification.passed
    pool = next(n for n in fused.graph.node if n.op_type == "AveragePool")
    assert {a.name: a.i for a in pool.attribute if a.name in ("ceil_mode", "count_include_pad")} == {
        "ceil_mode": 1, "count_include_pad": 1}
    x = np.random.default_rng(0).standard_normal((1, 2, 8, 8)).astype(np.float32)
    assert relative_error(_session(fused).run(None, {"x": x}), _session(model).run(None, {"x": x})) < 1e-6
