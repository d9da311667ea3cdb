"""``reparam.fuse_onnx``: the same rules and engine on ONNX graphs (onnx-graphsurgeon view).

ONNX → IR (:mod:`reparam.frontends.onnx.importer`) → :class:`reparam.core.engine.Engine` with the built-in rules →
ONNX (:mod:`reparam.frontends.onnx.exporter`), then ``onnx.checker`` (full check) and an end-to-end comparison of
original and fused model in onnxruntime on random inputs of the resolved shapes.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import Counter
from typing import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from reparam.frontends.pipeline import gc_paused
from reparam.core.engine import Engine
from reparam.errors import ReparamError, VerificationError
from reparam.frontends.onnx.exporter import export_onnx
from reparam.frontends.onnx.importer import import_onnx
from reparam.frontends.onnx.interface import put_back, split_interface
from reparam.frontends.onnx.validate import check_input, check_input_size
from reparam.frontends.onnx.shapes import data_inputs, resolve_input_shapes, with_input_shapes
from reparam.frontends.onnx.evaluate import evaluate_f64
from reparam.core.ops import Opaque
from reparam.frontends.rulesets import select_rules
from reparam.core.report import Counts, Report, Verification
from reparam.core.rule import Rule

DEFAULT_TOLERANCE = 1e-4  # float32 onnxruntime on both sides

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
    """Nodes of the main graph; convs, BatchNorms, Gemm/MatMul; float initializer elements."""
    ops = Counter(n.op_type for n in model.graph.node)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
    params = sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.data_type in floats)
    return Counts(len(model.graph.node), ops["Conv"], ops["BatchNormalization"], ops["Gemm"] + ops["MatMul"], params)


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


def run_ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1  # one small batch: a spinning thread pool only competes for the CPU
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4  # its errors come back as exceptions, said in one line
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def relative_error(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """max |got − want| / max |want| over all outputs."""
    if len(got) != len(want):
        return float("inf")
    diff = scale = 0.0
    for g, w in zip(got, want):
        g, w = np.asarray(g, dtype=np.float64), np.asarray(w, dtype=np.float64)
        if g.shape != w.shape:
            return float("inf")
        if w.size:
            same = (g == w) | (np.isnan(g) & np.isnan(w))  # a NaN or ±inf the original itself gives is no error
            g, w = np.where(same, 0.0, g), np.where(same, 0.0, w)
            d = float(np.abs(g - w).max())
            if d != d:
                return float("inf")
            diff, scale = max(diff, d), max(scale, float(np.abs(w).max()))
    return diff / max(scale, 1e-30)


def _reference(graph, feeds, opset: int, rep: Report):
    """The IR's float64 outputs (None, with a note, when some node has no float64 reference)."""
    try:
        return evaluate_f64(graph, feeds, opset)
    except Exception as err:
        rep.notes.append(f"no float64 check ({type(err).__name__}: {err}); verified in onnxruntime only")
        return None


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


def fuse_onnx(model_or_path, *, input_shapes=None, input_values=None, freeze_initializer_inputs: bool = False,
              **options):
    """Fuse an ONNX model's reparameterizable structure; return the fused ``onnx.ModelProto``
    (and a :class:`Report` with ``report=True``).

    ``input_shapes``: a dict by input name, or shapes in input order (see :func:`resolve_input_shapes`);
    ``input_values``: values fed to named inputs for verification (integer inputs such as a sample rate; others
    get random floats, or zeros). Initializers that are also graph inputs are overridable defaults: kept as
    inputs unless ``freeze_initializer_inputs`` makes them constants (and removes them from the inputs). Errors
    in the input (not a valid model, a shape that does not fit, an original that cannot run) raise
    :class:`ReparamError` with one line. The other options are :func:`_fuse_onnx`'s.
    """
    with quiet_libraries():
        try:
            return _fuse_onnx(model_or_path, input_shapes=input_shapes, input_values=input_values,
                              freeze=freeze_initializer_inputs, **options)
        except MemoryError as err:
            raise ReparamError("out of memory while fusing this model: pass smaller input shapes "
                               "(input_shapes / --input-shape)") from err


@gc_paused
def _fuse_onnx(model_or_path, *, input_shapes=None, input_values=None, freeze: bool = False,
               rules: Sequence[Rule] | None = None,
               extra_rules: Sequence[Rule] = (), disable: Sequence[str] = (), only: Sequence[str] | None = None,
               verify: bool = True, check: bool = True, tolerance: float = DEFAULT_TOLERANCE, report: bool = False):
    """Fuse an ONNX model's reparameterizable structure; return the fused ``onnx.ModelProto``
    (and a :class:`Report` with ``report=True``).

    ``input_shapes`` fixes dynamic input dims for shape inference and verification (a dict by input
    name, or shapes in input order; default: dynamic batch → 1, other dynamic dims → 64). With
    ``verify`` both models run in onnxruntime on the same random inputs and a relative error above
    ``tolerance`` raises :class:`VerificationError` (nothing is returned or written); the rewritten
    graph is also compared with the original in float64 (vocabulary ops by their reference semantics,
    other nodes by ``onnx.reference``) when every node has a float64 reference. ``check`` is the engine's
    local check of every rewrite, as in :func:`reparam.fuse`.
    """
    started = time.perf_counter()
    rep = Report()
    chosen = select_rules(None if rules is None else list(rules), extra_rules, disable, only)
    original = load_model(model_or_path)
    model, defaults, shapes, values, notes = prepare_inputs(original, input_shapes, input_values, freeze)
    rep.notes.extend(notes)
    t0 = time.perf_counter()
    graph = import_onnx(model, with_input_shapes(model, shapes))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    feeds = random_inputs(model, shapes, values=values) if verify else None
    want64 = _reference(graph, feeds, opset, rep) if verify else None
    rep.seconds["import"] = time.perf_counter() - t0
    kept = Counter(n.op.what for n in graph.nodes if isinstance(n.op, Opaque) and n.op.value is None)
    if kept:
        rep.notes.append("nodes opaque to the rules, written back as they were: " + ", ".join(
            f"{op}×{k}" for op, k in sorted(kept.items(), key=lambda kv: (-kv[1], kv[0]))))
    engine = Engine(chosen, check=check)
    log = engine.run(graph)
    rep.rules_fired = [dict(rule=e.rule, where=e.where, detail=e.detail) for e in log.fired_events()]
    rep.refusals = [dict(rule=e.rule, where=e.where, detail=e.detail) for e in log.refusals()]
    fused = export_onnx(graph, model)
    put_back(fused, defaults)
    rep.seconds["rewrite"] = time.perf_counter() - t0
    try:
        onnx.checker.check_model(fused, full_check=True)
    except Exception as err:
        raise ReparamError(f"internal error: the fused model fails onnx.checker ({err}); please report it") from err
    if verify:
        t0 = time.perf_counter()
        err64 = None
        if want64 is not None:
            got64 = _reference(graph, feeds, opset, rep)
            err64 = None if got64 is None else relative_error(got64, want64)
        want = run_original(original, feeds, shapes)
        err = relative_error(run_ort(fused, feeds), want)
        passed = err <= tolerance and (err64 is None or err64 <= tolerance)
        rep.verification = Verification(input_shapes=[list(s) for s in shapes.values()], error_fp64=err64,
                                        error_native=err, tolerance=tolerance, passed=passed)
        rep.notes.append(f"onnxruntime (float32) relative error of the written model: {err:.2e}")
        rep.seconds["verify"] = time.perf_counter() - t0
        if not passed:
            worst = err if err64 is None else max(err, err64)
            culprit = ("the rewritten graph matches in float64, so only the written model differs: below float32 "
                       "rounding (about 1e-6) raise the tolerance, else this is a bug in reparam's ONNX export; "
                       "please report it" if err64 is not None and err64 <= tolerance
                       else "disable the rule responsible (see report.rules_fired) and report it")
            raise VerificationError(f"the fused ONNX model differs from the original (relative error {worst:.3g} > "
                                    f"{tolerance:g}; float64: {err64 if err64 is None else f'{err64:.3g}'}, "
                                    f"onnxruntime float32: {err:.3g}); nothing was written; {culprit}.", error=worst)
    else:
        rep.verification.skipped = "disabled by the caller"
    rep.seconds["total"] = time.perf_counter() - started
    if report:
        rep.before, rep.after = count_onnx(original), count_onnx(fused)
        return fused, rep
    return fused
