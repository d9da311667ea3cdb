"""ONNX shapes: the resolved input shapes, and shape inference that sees through folded constants.

A dimension is dynamic whatever its spelling: a ``dim_param``, no value, or a negative ``dim_value`` (Paddle
writes -1). Dynamic input dimensions are fixed (given ones, else batch → 1 and other dims → 64) on a copy of the
model; ``with_known`` lets inference see values torch computes from ``x.shape`` (Slice bounds of chunk).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from reparam.core.ops import pool_len
from reparam.errors import ReparamError

Shape = tuple  # of int (or None for a dynamic dimension)


def _dims(tp: onnx.TypeProto) -> Shape | None:
    if not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
                 for d in tp.tensor_type.shape.dim)  # a dim_param, no value, or a negative one (-1): dynamic


def value_infos(model: onnx.ModelProto) -> tuple[dict[str, Shape], dict[str, int]]:
    """Shapes (None entries for dynamic dims) and element types of every typed value of ``model``."""
    g = model.graph
    shapes, types = {}, {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        s = _dims(vi.type)
        if s is not None:
            shapes[vi.name] = s
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        shapes[init.name] = tuple(init.dims)
        types[init.name] = init.data_type
    return shapes, types


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # inference is best effort: unknown shapes only make rules refuse
        return model


def infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` shape-inferred, to read value shapes and types from (not to run or write: ceil-mode pools may be
    replaced by floor-mode pools of the same output size).

    ONNX shape inference sizes a ceil-mode pool as ⌈(n + pads − extent) / stride⌉ + 1, without the rule
    ONNX Runtime (like PyTorch) applies: a last window that would start in the right padding is dropped
    (:func:`reparam.core.ops.pool_len`). Every size after such a pool would be one too big where that rule
    bites. So each ceil-mode pool whose inferred size is wrong is replaced, in the copy inferred, by a floor-mode
    pool giving the right size, and inference runs again, until no pool is wrong (a pool after a corrected one is
    judged in the next round, on its corrected input)."""
    inferred = _infer(model)
    for _ in range(len(model.graph.node) + 1):
        corrected = _ceil_pools_corrected(inferred)
        if corrected is None:
            return inferred
        inferred = _infer(corrected)
    return inferred


_POOLS = ("MaxPool", "AveragePool", "LpPool")


def _ceil_pools_corrected(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy of inferred ``model`` without its value_info, each wrongly sized ceil-mode pool (explicit pads, input
    shape known, not after another one corrected now) replaced by a floor-mode twin of the right output size;
    None when no pool needs it."""
    shapes, _ = value_infos(model)
    twins: dict[int, onnx.NodeProto] = {}
    changed: set[str] = set()  # values downstream of a pool corrected in this round: their shapes are stale
    for k, node in enumerate(model.graph.node):
        stale = any(i in changed for i in node.input)
        if not stale and node.op_type in _POOLS and node.domain in ("", "ai.onnx"):
            twin = _floor_twin(node, shapes.get(node.input[0]), shapes.get(node.output[0]))
            if twin is not None:
                twins[k] = twin
                stale = True
        if stale:
            changed.update(o for o in node.output if o)
    if not twins:
        return None
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    for vi in out.graph.output:
        vi.type.tensor_type.ClearField("shape")
    for k, twin in twins.items():
        out.graph.node[k].CopyFrom(twin)
    return out


def _floor_twin(node: onnx.NodeProto, x: Shape | None, inferred: Shape | None) -> onnx.NodeProto | None:
    """A floor-mode pool of ``node``'s op type whose output has the size ONNX Runtime gives ``node`` (kernel
    n − out + 1, or 1 with the missing length padded at the end, stride 1), or None when ``node`` is no
    ceil-mode pool with explicit pads, its input shape is unknown, or inference already sized it right."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    auto = attrs.get("auto_pad", b"NOTSET")
    if not attrs.get("ceil_mode", 0) or (auto.decode() if isinstance(auto, bytes) else auto) not in ("NOTSET", "VALID"):
        return None
    ks = list(attrs.get("kernel_shape", []))
    nd = len(ks)
    if not nd or x is None or len(x) != nd + 2 or any(d is None for d in x[2:]):
        return None
    strides = list(attrs.get("strides", [1] * nd))
    dilations = list(attrs.get("dilations", [1] * nd))
    pads = [0] * (2 * nd) if (auto.decode() if isinstance(auto, bytes) else auto) == "VALID" else list(
        attrs.get("pads", [0] * (2 * nd)))
    want = [pool_len(n, pads[i], pads[i + nd], dilations[i] * (ks[i] - 1) + 1, strides[i], True)
            for i, n in enumerate(x[2:])]
    if inferred is not None and tuple(inferred[2:]) == tuple(want):
        return None
    kernel = [max(n - w + 1, 1) for n, w in zip(x[2:], want)]
    tail = [max(w - n, 0) for n, w in zip(x[2:], want)]
    keep = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute if a.name not in (
        "ceil_mode", "kernel_shape", "strides", "pads", "dilations", "auto_pad")}
    return onnx.helper.make_node(node.op_type, list(node.input), list(node.output), name=node.name,
                                 kernel_shape=kernel, strides=[1] * nd, pads=[0] * nd + tail, **keep)


def data_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def resolve_input_shapes(model: onnx.ModelProto, input_shapes=None) -> dict[str, tuple[int, ...]]:
    """A concrete shape per graph input: given ones (by name, or a list in input order), else the
    static dims with dynamic batch (dim 0) → 1 and other dynamic dims → 64."""
    inputs = data_inputs(model)
    given: dict[str, Any] = {}
    if isinstance(input_shapes, dict):
        given = dict(input_shapes)
        unknown = set(given) - {i.name for i in inputs}
        if unknown:
            raise ReparamError(f"input_shapes names unknown input(s) {sorted(unknown)}; the model's inputs are "
                               f"{[i.name for i in inputs]}")
    elif input_shapes is not None:
        seq = list(input_shapes)
        if seq and isinstance(seq[0], int):
            seq = [seq]
        if len(seq) > len(inputs):
            raise ReparamError(f"{len(seq)} input shapes given but the model has {len(inputs)} input(s)")
        given = {i.name: s for i, s in zip(inputs, seq)}
    out = {}
    for vi in inputs:
        dims = _dims(vi.type)
        if vi.name in given:
            shape = tuple(int(d) for d in given[vi.name])
            if dims is not None and (len(dims) != len(shape) or any(
                    d is not None and d != s for d, s in zip(dims, shape))):
                raise ReparamError(f"input '{vi.name}' has shape {list(dims)} (None = dynamic); "
                                   f"{list(shape)} does not fit it")
        elif dims is None:
            raise ReparamError(f"input '{vi.name}' has no known rank; pass its shape (input_shapes)")
        else:
            shape = tuple(d if d is not None else (1 if k == 0 else 64) for k, d in enumerate(dims))
        out[vi.name] = shape
    return out


def with_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of ``model`` with fixed input dims and no stale inferred shapes, shape-inferred."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    del fixed.graph.value_info[:]
    for vi in fixed.graph.input:
        if vi.name in shapes:
            shape = vi.type.tensor_type.shape
            del shape.dim[:]
            for d in shapes[vi.name]:
                shape.dim.add().dim_value = d
    for vi in fixed.graph.output:
        vi.type.tensor_type.ClearField("shape")
    return infer(fixed)


def with_known(model: onnx.ModelProto, known: dict[str, np.ndarray], limit: int = 4096) -> onnx.ModelProto:
    """A copy of ``model`` whose nodes read small folded values as initializers (so shape inference
    sees through shape arithmetic such as the Slice bounds torch computes from ``x.shape``)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    added: dict[str, str] = {}
    for node in out.graph.node:
        for j, name in enumerate(node.input):
            value = known.get(name)
            if value is None or np.size(value) > limit or node.op_type == "Constant":
                continue
            if name not in added:
                added[name] = f"__reparam_known_{len(added)}"
                out.graph.initializer.append(numpy_helper.from_array(np.asarray(value), added[name]))
            node.input[j] = added[name]
    return out
