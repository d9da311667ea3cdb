"""Writing the fused model, in the format the output's extension names, atomically, checked after writing.

Every writer writes a temporary file in the output's folder (``.NAME.PID.XXXX.partial.EXT``), the written
file is loaded back and run against the fused model (:func:`check_written`), and only then renamed into
place (``os.replace``); :func:`atomic_paths` does it for several files at once (the model, its weights, the
report). Temporary files left by a killed run (their process is gone) are removed by the next write.

- ``.pt`` / ``.pth``: the module itself, ``torch.save(model)``; load it with
  ``torch.load(path, weights_only=False)`` (it is a pickle: the fused GraphModule's code is in it);
- ``.pt2``: a ``torch.export`` program, ``torch.export.load(path)``;
- ``.onnx``: an ONNX model (opset 17, TorchScript-based exporter for a module), runs in onnxruntime;
- ``.py``: readable Python source plus ``.safetensors`` weights beside it (:mod:`reparam.pysource`): loads
  with torch alone, without unpickling.

``.pt2`` / ``.onnx`` / ``.py`` outputs of a PyTorch model get a dynamic batch dimension (``dynamic='batch'``;
'spatial' also frees the dimensions after the channels, 'none' keeps the example's shapes) when the model
runs at another batch size; otherwise they keep the example's and say so.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from reparam.errors import ReparamError
from reparam.io.atomic import (atomic_path, atomic_paths, check_writable, clean_stale,  # noqa: F401 (re-exported)
                               is_write_failure)
from reparam.io.formats import OUTPUT_SUFFIXES, companion_paths, output_format  # noqa: F401 (re-exported)
from reparam.io.quiet import quiet_torch

ONNX_OPSET = 17
DYNAMIC_CHOICES = ("batch", "spatial", "none")


def json_text(data: Any) -> str:
    return json.dumps(data, indent=2, default=str) + "\n"


def write_json(data: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json_text(data))


def _as_module(obj: Any) -> nn.Module:
    """``obj`` itself, or for an ExportedProgram a plain (picklable, exportable) GraphModule of ``ep.module()``.

    The unlifted module's input guard (``_guards_fn``, a check torch.export adds) holds closures that
    cannot be pickled; it is dropped, the computation is unchanged."""
    if not isinstance(obj, torch.export.ExportedProgram):
        return obj
    import torch.fx as fx

    unlifted = obj.module()
    graph = fx.Graph()
    graph.output(graph.graph_copy(unlifted.graph, {}))
    # a fresh Graph (its tracer class must be the default, or the pickle cannot be loaded) given the unlifted
    # graph's code generator (its pytree in/out spec): torch.fx has a public setter but no getter for it
    graph.set_codegen(unlifted.graph._codegen)
    plain = fx.GraphModule(unlifted, graph)
    for node in list(plain.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            plain.graph.erase_node(node)
    plain.delete_all_unused_submodules()
    plain.recompile()
    return plain.eval()


def save_model(obj: Any, path: str | os.PathLike, example_inputs: tuple | None, dynamic: str = "batch") -> list[str]:
    """Write ``obj`` (an nn.Module, an ExportedProgram or an onnx ModelProto) to ``path`` by its extension,
    checked after writing; returns notes (e.g. that the batch size stayed fixed)."""
    fmt = output_format(path)
    with atomic_paths(path, *companion_paths(path, fmt)) as temps:
        notes = write_model(obj, temps, fmt, example_inputs, dynamic)
        check_written(obj, temps, fmt, example_inputs)
    return notes


# ---------------------------------------------------------------------------------------------- writers

def write_model(obj: Any, tmp: str | list[str], fmt: str, example_inputs: tuple | None,
                dynamic: str = "batch") -> list[str]:
    """Write ``obj`` to ``tmp`` as ``fmt`` ('pt', 'pt2', 'onnx' or 'py'; for 'py' ``tmp`` is [source, weights]),
    not atomically (see :func:`atomic_paths`). Returns notes about the written file."""
    temps = [tmp] if isinstance(tmp, str) else list(tmp)
    is_onnx_model = type(obj).__name__ == "ModelProto"
    if is_onnx_model and fmt != "onnx":
        raise ReparamError(f"an ONNX model can only be written as .onnx, not .{fmt}")
    if dynamic not in DYNAMIC_CHOICES:
        raise ReparamError(f"bad --dynamic '{dynamic}': choose one of {', '.join(DYNAMIC_CHOICES)}")
    if is_onnx_model:
        import onnx

        onnx.save(obj, temps[0])
        return []
    if fmt == "pt":
        torch.save(_as_module(obj), temps[0])
        return []
    if fmt == "onnx":
        return _save_onnx(_as_module(obj), temps[0], example_inputs, dynamic)
    ep, notes = _program(obj, example_inputs, dynamic)
    if fmt == "pt2":
        torch.export.save(ep, temps[0])
    else:
        from reparam.io.pysource import write_python

        write_python(ep, temps[0], temps[1], f"Deploy model written by reparam (torch {torch.__version__}).")
    return notes


def _dims(inputs: tuple, dynamic: str) -> list[dict[int, str]]:
    """The dimensions of each input to free: 0 (the batch), and with 'spatial' those after the channels."""
    out = []
    for t in inputs:
        dims = {}
        if isinstance(t, torch.Tensor) and t.dim() >= 1 and dynamic != "none":
            dims[0] = "batch"
            if dynamic == "spatial":
                dims.update({d: f"dim{d}" for d in range(2, t.dim())})
        out.append(dims)
    return out


def _other_batch(inputs: tuple, dynamic: str) -> tuple | None:
    """Random inputs with another batch size (4, or 2 if the example's is 4), and with 'spatial' other
    sizes after the channels too; None when nothing is dynamic."""
    if dynamic == "none" or not inputs or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in inputs):
        return None
    gen = torch.Generator().manual_seed(5)

    def resized(t):
        shape = list(t.shape)
        shape[0] = 2 if shape[0] == 4 else 4
        if dynamic == "spatial":
            shape[2:] = [s + 1 for s in shape[2:]]
        if t.is_floating_point():
            return torch.randn(shape, generator=gen, dtype=torch.float64).to(t.dtype)
        return t.new_zeros(shape)

    return tuple(resized(t) for t in inputs)


def _runs(model, inputs) -> bool:
    try:
        with torch.no_grad():
            model(*inputs)
        return True
    except Exception:
        return False


def _program(obj: Any, example_inputs: tuple | None, dynamic: str) -> tuple[torch.export.ExportedProgram, list[str]]:
    """The torch.export program to write: ``obj`` itself, or ``obj`` exported with dynamic dimensions when
    it runs at another batch size (exported on inputs of that size, since a size-1 dimension would
    specialize), else with the example's shapes."""
    if isinstance(obj, torch.export.ExportedProgram):
        return obj, []
    if example_inputs is None:
        raise ReparamError("writing .pt2 or .py needs example inputs: pass --input-shape")
    inputs = tuple(example_inputs)
    other = _other_batch(inputs, dynamic)
    notes: list[str] = []
    if other is not None and _runs(obj, other):
        from torch.export import Dim

        shapes = tuple({d: Dim.AUTO for d in dims} or None for dims in _dims(inputs, dynamic))
        try:
            with torch.no_grad(), quiet_torch():
                return torch.export.export(obj, other, dynamic_shapes=shapes), notes
        except Exception as err:
            notes.append(f"the input shapes are fixed in the written program (a dynamic export failed: "
                         f"{type(err).__name__}: {_first(err)})")
    elif other is not None:
        notes.append("the input shapes are fixed in the written program: the fused model does not run at "
                     "another batch size")
    try:
        with torch.no_grad(), quiet_torch():  # a failing export logs and prints its partial graph
            return torch.export.export(obj, inputs), notes
    except Exception as err:
        raise ReparamError(f"torch.export could not export the fused model (write .pt instead): "
                           f"{type(err).__name__}: {_first(err)}") from err


def _output_count(model: nn.Module, inputs: tuple) -> int:
    from torch.utils._pytree import tree_leaves

    with torch.no_grad():
        return len([t for t in tree_leaves(model(*inputs)) if isinstance(t, torch.Tensor)])


def _save_onnx(model: nn.Module, tmp: str, example_inputs: tuple | None, dynamic: str) -> list[str]:
    if example_inputs is None:
        raise ReparamError("writing .onnx needs example inputs: pass --input-shape")
    inputs = tuple(example_inputs)
    names = [f"input{i}" if i else "input" for i in range(len(inputs))]
    outputs = [f"output{i}" if i else "output" for i in range(_output_count(model, inputs))]
    other = _other_batch(inputs, dynamic)
    notes: list[str] = []
    axes = None
    if other is not None and _runs(model, other):
        axes = {n: d for n, d in zip(names, _dims(inputs, dynamic)) if d}
        axes.update({n: {0: "batch"} for n in outputs})
        _export_onnx(model, inputs, tmp, names, outputs, axes)
        if _ort_runs(tmp, other):
            return notes
        notes.append("the input shapes are fixed in the written ONNX model: it does not run at another batch "
                     "size in ONNX Runtime")
    elif other is not None:
        notes.append("the input shapes are fixed in the written ONNX model: the fused model does not run at "
                     "another batch size")
    _export_onnx(model, inputs, tmp, names, outputs, None)
    return notes


def _export_onnx(model, inputs, tmp, names, outputs, axes) -> None:
    try:
        with torch.no_grad(), warnings.catch_warnings(), quiet_torch():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, inputs, tmp, dynamo=False, opset_version=ONNX_OPSET, input_names=names,
                              output_names=outputs, dynamic_axes=axes, do_constant_folding=True)
    except Exception as err:
        if is_write_failure(err) and not isinstance(err, RuntimeError):
            raise
        raise ReparamError(f"the fused model could not be exported to ONNX: {type(err).__name__}: "
                           f"{_first(err)}") from err


def _ort_session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _ort_run(path: str, inputs: tuple) -> list[torch.Tensor]:
    sess = _ort_session(path)
    feed = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in sess.run(None, feed)]


def _ort_runs(path: str, inputs: tuple) -> bool:
    try:
        _ort_run(path, inputs)
        return True
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------- check

def written_tolerance(dtype: torch.dtype, fmt: str) -> float:
    """Relative error accepted between the written file and the fused model: a few hundred roundings of the
    model's dtype (ONNX Runtime orders sums differently: ten times that)."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return max(eps * (2000 if fmt == "onnx" else 200), 1e-12)


def check_written(obj: Any, tmp: str | list[str], fmt: str, example_inputs: tuple | None,
                  progress=None) -> list[str]:
    """Load the written file back and run it against the fused model ``obj`` on fresh random inputs of the
    example's shapes (and another batch size, where the file claims a dynamic one); ReparamError if it does
    not load or differs. Returns what was checked, for the report. ``progress(done, total)`` counts the runs."""
    from reparam.frontends import verify as verify_mod

    temps = [tmp] if isinstance(tmp, str) else list(tmp)
    if type(obj).__name__ == "ModelProto":
        import onnx

        try:
            onnx.checker.check_model(onnx.load(temps[0]))
        except Exception as err:
            raise ReparamError(f"the written ONNX model does not load back: {_first(err)}") from err
        return ["the written ONNX model loads back and passes onnx.checker"]
    if isinstance(obj, torch.export.ExportedProgram):
        reference, inputs = _as_module(obj), _program_inputs(obj)
    else:
        reference, inputs = obj, tuple(example_inputs) if example_inputs is not None else None
    if inputs is None:
        loaded = torch.load(temps[0], weights_only=False)
        return ["the written file loads back (no example inputs to run it on)"] if loaded is not None else []
    run_written = _runner(temps, fmt)
    probes = [verify_mod.random_like(inputs, seed=99)]
    other = _other_batch(inputs, "batch")
    if fmt in ("onnx", "pt2", "py") and other is not None and _claims_dynamic(temps, fmt) and _runs(reference, other):
        probes.append(other)
    checked = []
    dtype = next((t.dtype for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()), torch.float32)
    tol = written_tolerance(dtype, fmt)
    for k, probe in enumerate(probes):
        if progress is not None:
            progress(k, len(probes))
        with torch.no_grad():
            want = verify_mod.run(reference, probe)
            try:
                got = run_written(probe)
            except Exception as err:
                raise ReparamError(f"the written .{fmt} file does not run on inputs of shape "
                                   f"{[list(t.shape) for t in probe]}: {type(err).__name__}: {_first(err)}") from err
        err = verify_mod.relative_error(got, want)
        shapes = [list(t.shape) for t in probe if isinstance(t, torch.Tensor)]
        if not err <= tol:
            raise ReparamError(f"the written .{fmt} file computes something else than the fused model on inputs "
                               f"of shape {shapes} (relative error {err:.3g} > {tol:.1g}); nothing was written")
        checked.append(f"the written .{fmt} file matches the fused model on {shapes} (relative error {err:.2e})")
    return checked


def _program_inputs(ep) -> tuple:
    from reparam.frontends.aten.backend import example_inputs

    args, kwargs = example_inputs(ep)
    return tuple(args) if not kwargs else None


def _claims_dynamic(temps: list[str], fmt: str) -> bool:
    if fmt == "onnx":
        import onnx

        graph = onnx.load(temps[0], load_external_data=False).graph
        return any(d.dim_param for i in graph.input for d in i.type.tensor_type.shape.dim[:1])
    if fmt == "pt2":
        from reparam.io.pt2 import load_pt2, program_has_dynamic_batch

        return program_has_dynamic_batch(load_pt2(temps[0]))
    return "\nDYNAMIC_BATCH = True\n" in Path(temps[0]).read_text(encoding="utf-8")



def _runner(temps: list[str], fmt: str):
    from torch.utils._pytree import tree_leaves

    if fmt == "onnx":
        return lambda probe: _ort_run(temps[0], probe)
    if fmt == "pt":
        model = torch.load(temps[0], weights_only=False)
        if isinstance(model, dict):  # a checkpoint container written back (Loaded.packed): its model
            from reparam.io.loading import module_key

            model = model[module_key(model)]
    elif fmt == "pt2":
        from reparam.io.pt2 import load_pt2

        model = load_pt2(temps[0]).module()  # the safe load: a file reparam wrote has no unsafe pickle
    else:
        from reparam.io.pysource import load_python

        model = load_python(temps[0], temps[1])

    def run(probe):
        with torch.no_grad():
            return [t for t in tree_leaves(model(*probe)) if isinstance(t, torch.Tensor)]

    return run


def _first(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ""
