"""Writing the fused model, in the format the output's extension names, atomically.

Every writer writes a temporary file in the output's folder and renames it into place
(``os.replace``), so an interrupted or failed run never leaves a half-written file behind;
:func:`atomic_paths` does it for several files at once (the model and its report).

- ``.pt`` / ``.pth``: the module itself, ``torch.save(model)``; load it with
  ``torch.load(path, weights_only=False)`` (it is a pickle: the fused GraphModule's code is in it);
- ``.pt2``: a ``torch.export`` program (exported on the example inputs), ``torch.export.load(path)``;
- ``.onnx``: an ONNX model (opset 17, TorchScript-based exporter for a module), runs in onnxruntime.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from reparam.errors import ReparamError
from reparam.io.quiet import quiet_torch

OUTPUT_SUFFIXES = (".pt", ".pth", ".pt2", ".onnx")
ONNX_OPSET = 17


def output_format(path: str | os.PathLike) -> str:
    """'pt', 'pt2' or 'onnx' from the extension (ReparamError for anything else)."""
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise ReparamError(f"unknown output format '{suffix or Path(path).name}': the output must end in .pt "
                           f"(torch.save), .pt2 (torch.export) or .onnx")
    return {".pth": "pt"}.get(suffix, suffix[1:])


def check_writable(path: str | os.PathLike, what: str = "output") -> None:
    """Fail now, before any work, if ``path`` cannot be written: its folder is missing or it is a directory."""
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise ReparamError(f"the {what} '{path}' is a directory; give a file path")
    if not folder.is_dir():
        raise ReparamError(f"cannot write the {what} '{path}': folder '{folder}' does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ReparamError(f"cannot write the {what} '{path}': folder '{folder}' is not writable")


@contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[list[str]]:
    """A temporary path beside each of ``paths``; all renamed into place if the block succeeds, all removed
    otherwise (so a failure leaves every previous file as it was)."""
    temps: list[str] = []
    try:
        for path in map(Path, paths):
            folder = path.parent
            if not folder.is_dir():
                raise ReparamError(f"cannot write '{path}': folder '{folder}' does not exist")
            fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=folder)
            os.close(fd)
            temps.append(tmp)
        yield list(temps)
        umask = os.umask(0)
        os.umask(umask)
        for tmp, path in zip(temps, paths):
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
            os.replace(tmp, path)
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside ``path``; renamed onto ``path`` if the block succeeds, removed otherwise."""
    with atomic_paths(path) as (tmp,):
        yield tmp


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
    graph._codegen = unlifted.graph._codegen
    plain = fx.GraphModule(unlifted, graph)
    for node in list(plain.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            plain.graph.erase_node(node)
    plain.delete_all_unused_submodules()
    plain.recompile()
    return plain.eval()


def save_model(obj: Any, path: str | os.PathLike, example_inputs: tuple | None) -> None:
    """Write ``obj`` (an nn.Module, an ExportedProgram or an onnx ModelProto) to ``path`` by its extension."""
    with atomic_path(path) as tmp:
        write_model(obj, tmp, output_format(path), example_inputs)


def write_model(obj: Any, tmp: str, fmt: str, example_inputs: tuple | None) -> None:
    """Write ``obj`` to ``tmp`` as ``fmt`` ('pt', 'pt2' or 'onnx'), not atomically (see :func:`atomic_paths`)."""
    is_onnx_model = type(obj).__name__ == "ModelProto"
    if is_onnx_model and fmt != "onnx":
        raise ReparamError(f"an ONNX model can only be written as .onnx, not .{fmt}")
    if is_onnx_model:
        import onnx

        onnx.save(obj, tmp)
    elif fmt == "pt":
        torch.save(_as_module(obj), tmp)
    elif fmt == "pt2":
        _save_pt2(obj, tmp, example_inputs)
    else:
        _save_onnx(_as_module(obj), tmp, example_inputs)


def _save_pt2(obj: Any, tmp: str, example_inputs: tuple | None) -> None:
    if isinstance(obj, torch.export.ExportedProgram):
        ep = obj
    else:
        if example_inputs is None:
            raise ReparamError("writing .pt2 needs example inputs: pass --input-shape")
        try:
            with torch.no_grad(), quiet_torch():  # a failing export logs and prints its partial graph
                ep = torch.export.export(obj, tuple(example_inputs))
        except Exception as err:
            raise ReparamError(f"torch.export could not export the fused model (write .pt instead): "
                               f"{type(err).__name__}: {_first(err)}") from err
    torch.export.save(ep, tmp)


def _save_onnx(model: nn.Module, tmp: str, example_inputs: tuple | None) -> None:
    if example_inputs is None:
        raise ReparamError("writing .onnx needs example inputs: pass --input-shape")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, tuple(example_inputs), tmp, dynamo=False, opset_version=ONNX_OPSET,
                              input_names=[f"input{i}" if i else "input" for i in range(len(example_inputs))],
                              do_constant_folding=True)
    except Exception as err:
        raise ReparamError(f"the fused model could not be exported to ONNX: {type(err).__name__}: "
                           f"{_first(err)}") from err


def _first(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ""
