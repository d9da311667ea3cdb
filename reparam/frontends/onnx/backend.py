"""``reparam.fuse_onnx``: the same rules and engine on ONNX graphs (onnx-graphsurgeon view).

ONNX → IR (:mod:`reparam.frontends.onnx.importer`) → :class:`reparam.core.engine.Engine` with the built-in rules →
ONNX (:mod:`reparam.frontends.onnx.exporter`), then ``onnx.checker`` (full check) and an end-to-end comparison of
original and fused model in onnxruntime on random inputs of the resolved shapes. This module is the ONNX
adapter of the one fuse driver (:mod:`reparam.frontends.pipeline`).
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from reparam.core.report import Counts, Report
from reparam.core.rule import Rule
from reparam.errors import ReparamError
from reparam.frontends import verify as metric
from reparam.frontends.base import Outputs, Region
from reparam.frontends.onnx.evaluate import evaluate_f64
from reparam.frontends.onnx.exporter import export_onnx
from reparam.frontends.onnx.importer import import_onnx
from reparam.frontends.onnx.interface import put_back, split_interface
from reparam.frontends.onnx.validate import check_input, check_input_size
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
    """A private copy of the model: a ModelProto, a path, or serialized bytes (a file that is not ONNX, or an
    ONNX graph that could not run, is the user's error: :func:`check_input`)."""
    model = _read_model(model_or_path)
    where = f"'{model_or_path}'" if isinstance(model_or_path, (str, os.PathLike)) else "the model"
    check_input(model, where)
    return model


def _read_model(model_or_path) -> onnx.ModelProto:
    if isinstance(model_or_path, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model_or_path)
        return copy
    if isinstance(model_or_path, (bytes, bytearray)):
        return onnx.load_from_string(bytes(model_or_path))
    if isinstance(model_or_path, (str, os.PathLike)):
        if not os.path.isfile(model_or_path):
            raise ReparamError(f"ONNX file '{model_or_path}' does not exist")
        if os.path.getsize(model_or_path) == 0:
            raise ReparamError(f"'{model_or_path}' is empty (0 bytes): not an ONNX model")
        try:
            return onnx.load(os.fspath(model_or_path))
        except Exception as err:
            raise ReparamError(f"'{model_or_path}' is not a readable ONNX model: {err}") from err
    if hasattr(model_or_path, "read"):
        return onnx.load_from_string(model_or_path.read())
    raise ReparamError(f"fuse_onnx() needs an onnx.ModelProto, a path or bytes, got {type(model_or_path).__name__}")


def count_onnx(model: onnx.ModelProto) -> Counts:
    """Nodes of the main graph; convs (transposed ones included), BatchNorms, Gemm/MatMul; float initializer elements."""
    ops = Counter(n.op_type for n in model.graph.node)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
    params = sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.data_type in floats)
    return Counts(len(model.graph.node), ops["Conv"] + ops["ConvTranspose"], ops["BatchNormalization"], ops["Gemm"] + ops["MatMul"], params)


def random_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], seed: int = 1234,
                  values: dict | None = None) -> dict:
    """A feed per graph input: ``values[name]`` where given (broadcast to the input's shape, cast to its type),
    else standard-normal floats, else zeros (integers, booleans)."""
    rng = np.random.default_rng(seed)
    values = dict(values or {})
    names = {vi.name for vi in data_inputs(model)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ReparamError(f"input_values names unknown input(s) {unknown}; the model's inputs are {sorted(names)}")
    feeds = {}
    for vi in data_inputs(model):
        dtype = _NP.get(vi.type.tensor_type.elem_type)
        if dtype is None:
            raise ReparamError(f"input '{vi.name}' has an element type onnxruntime verification cannot feed; "
                               f"pass verify=False (--no-verify)")
        shape = shapes[vi.name]
        check_input_size(vi.name, shape, np.dtype(dtype).itemsize)
        if vi.name in values:
            given = np.asarray(values[vi.name])
            try:
                feeds[vi.name] = np.ascontiguousarray(np.broadcast_to(given, shape).astype(dtype))
            except ValueError as err:
                raise ReparamError(f"input_values['{vi.name}'] of shape {list(given.shape)} does not fit the input's "
                                   f"shape {list(shape)}") from err
        elif np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[vi.name] = np.zeros(shape, dtype=dtype)
    return feeds


@contextlib.contextmanager
def quiet_libraries():
    """stdout carries only reparam's output: onnx-graphsurgeon prints its warnings there, so they are muted
    (errors still shown) and anything else a library prints goes to stderr; onnxruntime logs errors only."""
    from onnx_graphsurgeon.logger import G_LOGGER

    severity = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.ERROR
    try:
        import onnxruntime as ort

        ort.set_default_logger_severity(4)
    except ImportError:
        pass
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        G_LOGGER.severity = severity


def run_original(model: onnx.ModelProto, feeds: dict, shapes: dict) -> list[np.ndarray]:
    """The original's outputs in onnxruntime; when it cannot run on what was given, one line saying so."""
    try:
        return run_ort(model, feeds)
    except MemoryError as err:
        raise ReparamError(f"onnxruntime ran out of memory running the original model on inputs {shapes}; "
                           f"pass smaller input shapes") from err
    except Exception as err:
        text = " ".join(str(err).split())
        if "NOT_IMPLEMENTED" in text or "is not a registered function/op" in text:
            raise ReparamError(f"the original model cannot run in onnxruntime, so it cannot be verified: {text[:300]}; "
                               f"verify=False (--no-verify) skips the verification") from err
        ints = [name for name, v in feeds.items() if not np.issubdtype(v.dtype, np.floating)]
        hint = (f"; non-float inputs {ints} are fed zeros unless given: pass values the model accepts "
                f"(input_values)" if ints else "")
        shown = {k: list(v) for k, v in shapes.items()}
        shown = str(shown) if len(str(shown)) < 200 else str(shown)[:200] + "…}"
        raise ReparamError(f"the original model cannot run in onnxruntime on the inputs given (shapes {shown}): "
                           f"{text[:300]}; pass input shapes it accepts (input_shapes / --input-shape){hint}") from err


def run_ort(model: onnx.ModelProto, feeds: dict, optimized: bool = False) -> list[np.ndarray]:
    """The model's outputs in onnxruntime (CPU, one thread), its graph optimizations off unless ``optimized``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else \
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1  # one small batch: a spinning thread pool only competes for the CPU
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4  # its errors come back as exceptions, said in one line
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


def _same_shapes(exact: list, native: list, rep: Report) -> bool:
    """Does the float64 reference of the original give the output shapes onnxruntime gives? Where it does not
    (onnx.reference and onnxruntime read some old-opset node differently), the float64 check is dropped, saying
    so, and the written model is judged in onnxruntime alone."""
    got = [tuple(np.shape(x)) for x in exact]
    want = [tuple(np.shape(x)) for x in native]
    if got == want:
        return True
    rep.notes.append(f"no float64 check (onnx.reference gives the original output shapes {got}, onnxruntime "
                     f"{want}); verified in onnxruntime only")
    return False


def check_written(fused: onnx.ModelProto) -> None:
    """The written model passes ``onnx.checker`` (full check), else an internal error."""
    try:
        onnx.checker.check_model(fused, full_check=True)
    except Exception as err:
        raise ReparamError(f"internal error: the fused model fails onnx.checker ({err}); please report it") from err


def prepare_inputs(model: onnx.ModelProto, input_shapes, input_values, freeze: bool):
    """(the model to import, the defaults set aside, shapes, values to feed, notes): initializers listed as inputs
    are inputs (fed their defaults unless ``input_values`` says otherwise) or, with ``freeze``, constants."""
    work, defaults, notes = split_interface(model, freeze)
    if isinstance(input_shapes, dict) or input_shapes is None:
        given = {name: tuple(t.dims) for name, t in defaults.items()}
        given.update(input_shapes or {})
    else:  # shapes in input order: for the inputs without a default
        plain = [vi.name for vi in data_inputs(work) if vi.name not in defaults]
        seq = list(input_shapes)
        if seq and isinstance(seq[0], int):
            seq = [seq]
        if len(seq) > len(plain):
            raise ReparamError(f"{len(seq)} input shapes given but the model has {len(plain)} input(s) "
                               f"without a default: {plain}")
        given = {name: tuple(t.dims) for name, t in defaults.items()}
        given.update(zip(plain, seq))
    shapes = resolve_input_shapes(work, given)
    values = {name: numpy_helper.to_array(t) for name, t in defaults.items()}
    values.update(input_values or {})
    return work, defaults, shapes, values, notes


class OnnxFrontEnd:
    """An ONNX model fused on its onnx-graphsurgeon view (see :func:`fuse_onnx`)."""

    subject = "ONNX model"

    def __init__(self, model_or_path, input_shapes, verify: bool, input_values=None, freeze: bool = False):
        self.original = load_model(model_or_path)
        self.model, self.defaults, self.shapes, values, self.notes = prepare_inputs(
            self.original, input_shapes, input_values, freeze)
        self.opset = next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.feeds = random_inputs(self.model, self.shapes, values=values) if verify else None
        self.report = Report()

    def prepare(self, report: Report) -> None:
        self.report = report
        report.notes.extend(self.notes)

    def import_graphs(self, report: Report) -> list[Region]:
        graph = import_onnx(self.model, with_input_shapes(self.model, self.shapes))
        return [Region("", graph, source=self.model)]

    def export(self, region: Region) -> onnx.ModelProto:
        fused = export_onnx(region.graph, self.model)
        put_back(fused, self.defaults)
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
        native = run_original(self.original, self.feeds, self.shapes)
        self.trusted = exact is None or _same_shapes(exact, native, self.report)
        exact = exact if self.trusted else None
        rounding = None
        if exact is None:  # onnxruntime's own graph optimizations round differently: the outputs' magnitude
            try:
                rounding = run_ort(self.original, self.feeds, optimized=True)
            except Exception:  # noqa: BLE001 - without it the magnitude is each output's own size
                rounding = None
        return Outputs(exact=exact, native=native, rounding=rounding)

    def exact(self, fused: onnx.ModelProto, regions: list[Region]) -> list | None:
        if not getattr(self, "trusted", True):
            return None
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
        return count_onnx(self.original if original else artifact)


def fuse_onnx(model_or_path, *, input_shapes=None, input_values=None, freeze_initializer_inputs: bool = False,
              rules: Sequence[Rule] | None = None,
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

    ``input_values``: values fed to named inputs for verification (integer inputs such as a sample rate; others
    get random floats, or zeros). Initializers that are also graph inputs are overridable defaults: kept as
    inputs unless ``freeze_initializer_inputs`` makes them constants (and removes them from the inputs). Errors
    in the input (not a valid model, a shape that does not fit, an original that cannot run) raise
    :class:`ReparamError` with one line.
    """
    chosen = select_rules(None if rules is None else list(rules), extra_rules, disable, only)
    with quiet_libraries():
        try:
            front = OnnxFrontEnd(model_or_path, input_shapes, verify, input_values, freeze_initializer_inputs)
            return fuse_with(front, Options(chosen, check=check, verify=verify, tolerance=tolerance, report=report,
                                            progress=progress))
        except MemoryError as err:
            raise ReparamError("out of memory while fusing this model: pass smaller input shapes "
                               "(input_shapes / --input-shape)") from err
