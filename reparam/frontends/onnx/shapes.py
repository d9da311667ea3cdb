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


def infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # inference is best effort: unknown shapes only make rules refuse
        return model


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
