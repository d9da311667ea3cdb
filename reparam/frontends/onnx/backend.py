"""``reparam.fuse_onnx``: the same rules and engine on ONNX graphs (onnx-graphsurgeon view).

ONNX → IR (:mod:`reparam.frontends.onnx.importer`) → :class:`reparam.core.engine.Engine` with the built-in rules →
ONNX (:mod:`reparam.frontends.onnx.exporter`), then ``onnx.checker`` (full check) and an end-to-end comparison of
original and fused model in onnxruntime on random inputs of the resolved shapes. This module is the ONNX
adapter of the one fuse driver (:mod:`reparam.frontends.pipeline`).
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Callable, Sequence

import numpy as np
import onnx

from reparam.core.report import Counts, Report
from reparam.core.rule import Rule
from reparam.errors import ReparamError
from reparam.frontends import verify as metric
from reparam.frontends.base import Outputs, Region
from reparam.frontends.onnx.evaluate import evaluate_f64
from reparam.frontends.onnx.exporter import export_onnx
from reparam.frontends.onnx.importer import import_onnx
from reparam.frontends.onnx.shapes import data_inputs, resolve_input_shapes, with_input_shapes
from reparam.frontends.pipeline import Options, fuse_with
from reparam.frontends.rulesets import select_rules

# the float64 check of an ONNX graph is float64 only for vocabulary ops: other nodes run in onnx.reference at the
# types the graph declares (a Cast to float32 rounds), so correct rewrites can differ there by float32 rounding
DEFAULT_TOLERANCE = 1e-4

_NP = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
       onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32,
       onnx.TensorProto.BOOL: np.bool_, onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT8: np.int8}


def load_model(model_or_path) -> onnx.ModelProto:
    """A private copy of the model: a ModelProto, a path, or serialized bytes."""
    if isinstance(model_or_path, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model_or_path)
        return copy
    if isinstance(model_or_path, (bytes, bytearray)):
        return onnx.load_from_string(bytes(model_or_path))
    if isinstance(model_or_path, (str, os.PathLike)):
        if not os.path.isfile(model_or_path):
            raise ReparamError(f"ONNX file '{model_or_path}' does not exist")
        try:
            return onnx.load(os.fspath(model_or_path))
        except Exception as err:
            raise ReparamError(f"'{model_or_path}' is not a readable ONNX model: {err}") from err
    if hasattr(model_or_path, "read"):
        return onnx.load_from_string(model_or_path.read())
    raise ReparamError(f"fuse_onnx() needs an onnx.ModelProto, a path or bytes, got {type(model_or_path).__name__}")


def count_onnx(model: onnx.ModelProto) -> Counts:
    """Nodes of the main graph; convs, BatchNorms, Gemm/MatMul; float initializer elements."""
    ops = Counter(n.op_type for n in model.graph.node)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
    params = sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.data_type in floats)
    return Counts(len(model.graph.node), ops["Conv"], ops["BatchNormalization"], ops["Gemm"] + ops["MatMul"], params)


def random_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], seed: int = 1234) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in data_inputs(model):
        dtype = _NP.get(vi.type.tensor_type.elem_type)
        if dtype is None:
            raise ReparamError(f"input '{vi.name}' has an element type onnxruntime verification cannot feed; "
                               f"pass verify=False")
        shape = shapes[vi.name]
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[vi.name] = np.zeros(shape, dtype=dtype)
    return feeds


def run_ort(model: onnx.ModelProto, feeds: dict, optimized: bool = False) -> list[np.ndarray]:
    """The model's outputs in onnxruntime (CPU, one thread), its graph optimizations off unless ``optimized``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else \
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1  # one small batch: a spinning thread pool only competes for the CPU
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def relative_error(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """The verification metric (:func:`reparam.frontends.verify.relative_error`) on arrays."""
    return metric.relative_error(got, want)


def _reference(graph, feeds, opset: int, rep: Report):
    """The IR's float64 outputs (None, with a note, when some node has no float64 reference)."""
    try:
        return evaluate_f64(graph, feeds, opset)
    except Exception as err:
        note = f"no float64 check ({type(err).__name__}: {err}); verified in onnxruntime only"
        if note not in rep.notes:
            rep.notes.append(note)
        return None


def check_written(fused: onnx.ModelProto) -> None:
    """The written model passes ``onnx.checker`` (full check), else an internal error."""
    try:
        onnx.checker.check_model(fused, full_check=True)
    except Exception as err:
        raise ReparamError(f"internal error: the fused model fails onnx.checker ({err}); please report it") from err


class OnnxFrontEnd:
    """An ONNX model fused on its onnx-graphsurgeon view (see :func:`fuse_onnx`)."""

    subject = "ONNX model"

    def __init__(self, model_or_path, input_shapes, verify: bool):
        self.model = load_model(model_or_path)
        self.shapes = resolve_input_shapes(self.model, input_shapes)
        self.opset = next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.feeds = random_inputs(self.model, self.shapes) if verify else None
        self.report = Report()

    def prepare(self, report: Report) -> None:
        self.report = report

    def import_graphs(self, report: Report) -> list[Region]:
        graph = import_onnx(self.model, with_input_shapes(self.model, self.shapes))
        return [Region("", graph, source=self.model)]

    def export(self, region: Region) -> onnx.ModelProto:
        fused = export_onnx(region.graph, self.model)
        check_written(fused)
        return fused

    def assemble(self, regions: list[Region], report: Report) -> onnx.ModelProto:
        return regions[0].fused

    def opaque_kind(self, node) -> str:
        return node.op.what

    def cannot_verify(self) -> str | None:
        return None

    def input_shapes(self) -> list[list[int]]:
        return [list(s) for s in self.shapes.values()]

    def reference(self, regions: list[Region]) -> Outputs:
        exact = _reference(regions[0].graph, self.feeds, self.opset, self.report)
        try:
            native = run_ort(self.model, self.feeds)
        except Exception as err:
            raise ReparamError(f"onnxruntime cannot run the original model on inputs {self.shapes}: {err}") from err
        rounding = None
        if exact is None:  # onnxruntime's own graph optimizations round differently: the outputs' magnitude
            try:
                rounding = run_ort(self.model, self.feeds, optimized=True)
            except Exception:  # noqa: BLE001 - without it the magnitude is each output's own size
                rounding = None
        return Outputs(exact=exact, native=native, rounding=rounding)

    def exact(self, fused: onnx.ModelProto, regions: list[Region]) -> list | None:
        return _reference(regions[0].graph, self.feeds, self.opset, self.report)

    def native(self, fused: onnx.ModelProto) -> list:
        return run_ort(fused, self.feeds)

    def misread(self) -> list[str]:
        return []

    def finish(self, fused: onnx.ModelProto, report: Report) -> onnx.ModelProto:
        if report.verification.error_native is not None:
            report.notes.append(f"onnxruntime error of the written model: {report.verification.error_native:.2e}")
        return fused

    def count(self, artifact, original: bool) -> Counts:
        return count_onnx(self.model if original else artifact)


def fuse_onnx(model_or_path, *, input_shapes=None, rules: Sequence[Rule] | None = None,
              extra_rules: Sequence[Rule] = (), disable: Sequence[str] = (), only: Sequence[str] | None = None,
              verify: bool = True, check: bool = True, tolerance: float = DEFAULT_TOLERANCE, report: bool = False,
              progress: Callable[..., None] | None = None):
    """Fuse an ONNX model's reparameterizable structure; return the fused ``onnx.ModelProto``
    (and a :class:`Report` with ``report=True``).

    ``input_shapes`` fixes dynamic input dims for shape inference and verification (a dict by input
    name, or shapes in input order; default: dynamic batch → 1, other dynamic dims → 64). With
    ``verify`` the rewritten graph is compared with the original in float64 (vocabulary ops by their reference
    semantics, other nodes by ``onnx.reference``) when every node has a float64 reference, at ``tolerance``, and
    the written model with the original in onnxruntime at its dtype's precision (never below ``tolerance``); a
    mismatch raises :class:`VerificationError` naming the first wrong rewrite, or the export (nothing is returned
    or written). ``check`` is the engine's local check of every rewrite and ``progress`` the phase callback, as
    in :func:`reparam.fuse`.
    """
    chosen = select_rules(None if rules is None else list(rules), extra_rules, disable, only)
    front = OnnxFrontEnd(model_or_path, input_shapes, verify)
    return fuse_with(front, Options(chosen, check=check, verify=verify, tolerance=tolerance, report=report,
                                    progress=progress))
