"""Loading the model a user names on the command line, safely by default.

Four kinds of input:

- ``pkg.module:factory`` — an import path to a function (or class) returning an ``nn.Module`` (put in eval
  mode: a freshly built model is in training mode by construction), called with the ``--arg NAME=VALUE``
  keyword arguments; ``timm:NAME`` is ``timm.create_model(NAME, **args)``; optionally with a weights file read by
  ``torch.load(weights_only=True)`` (a state_dict, or a checkpoint dict holding one under 'state_dict' /
  'model' / 'model_state_dict');
- a pickled module (``torch.save(model)``: .pt, .pth, .pkl, .ckpt, .bin, .tar) — unpickling runs code from
  the file, so it is loaded only when the caller trusts it (a TorchScript archive is refused: it has no
  Python module structure to fuse);
- a ``torch.export`` program (``.pt2``); without trust every pickled entry in it (weights saved with
  ``use_pickle``, the sample inputs) must load with ``weights_only=True`` and custom objects are refused, so
  loading one runs no code;
- an ONNX model (``.onnx``).

Every failure raises :class:`~reparam.errors.ReparamError` with one line saying what to do.
"""
from __future__ import annotations

import ast
import importlib
import os
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from reparam.errors import ReparamError
from reparam.io.formats import PICKLE_SUFFIXES, input_kind, is_factory_spec, is_timm_spec  # noqa: F401
from reparam.io.pt2 import load_pt2
from reparam.io.quiet import quiet_torch  # noqa: F401 (re-exported)

_STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")


@dataclass
class Loaded:
    """``kind`` is 'module', 'exported' or 'onnx'; ``obj`` the nn.Module, ExportedProgram or onnx ModelProto."""

    kind: str
    obj: Any
    source: str
    path: Path | None = None  # the file read (None for a factory without weights)
    container: Any = None  # a checkpoint dict the module was found in ({'model': module, 'epoch': ...})
    key: Any = None  # the module's key in ``container``

    def packed(self, fused: Any) -> Any:
        """What to write for the deploy model ``fused``: the checkpoint container it came in (a shallow copy,
        ``fused`` in the module's place), else ``fused`` itself."""
        if self.container is None:
            return fused
        return {**self.container, self.key: fused}


def _first_line(err: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()  # torch colours some messages
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


def _cwd_on_path() -> None:
    """Put the working directory on sys.path, as ``python -m`` would (a console script does not)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def parse_args(items: list[str] | None) -> dict[str, Any]:
    """``--arg NAME=VALUE`` pairs as keyword arguments: VALUE is a Python literal (10, 0.5, True, None, 'x',
    (1, 2)) or else the plain string."""
    out: dict[str, Any] = {}
    for item in items or []:
        name, eq, text = item.partition("=")
        name = name.strip()
        if not eq or not name.isidentifier():
            raise ReparamError(f"bad --arg '{item}': expected NAME=VALUE, like num_classes=10")
        try:
            out[name] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            out[name] = text
    return out


def check_request(spec: str, weights=None, args: dict | None = None) -> str:
    """The input's kind, after checking that ``weights`` and factory ``args`` apply to it (nothing is read)."""
    kind = input_kind(spec)
    if weights is not None and kind in ("exported", "onnx"):
        what = "a torch.export program (.pt2)" if kind == "exported" else "an ONNX model"
        raise ReparamError(f"--weights applies to PyTorch modules; {what} carries its own weights")
    if args and kind != "factory":
        raise ReparamError("--arg passes keyword arguments to a factory (pkg.module:factory or timm:NAME); "
                           f"'{spec}' is a file")
    return kind


def load_model(spec: str, *, trust: bool = False, weights: str | os.PathLike | None = None,
               args: dict[str, Any] | None = None) -> Loaded:
    """Load what ``spec`` names (see the module docstring); ``weights`` go into a PyTorch module, ``args`` are
    the factory's keyword arguments."""
    kind = check_request(spec, weights, args)
    if kind == "factory":
        loaded = Loaded("module", _from_factory(spec, args or {}), spec)
    else:
        path = Path(spec)
        if not path.exists():
            raise ReparamError(f"no such file: {path}")
        if not path.is_file():
            raise ReparamError(f"'{path}' is not a file")
        if kind == "pickle":
            obj = _unpickle_module(path, trust)
            key = module_key(obj)
            loaded = (Loaded("module", obj, spec, path) if key is None else
                      Loaded("module", obj[key], spec, path, container=obj, key=key))
        elif kind == "exported":
            loaded = Loaded("exported", load_pt2(path, trust=trust), spec, path)
        else:
            loaded = Loaded("onnx", _load_onnx(path), spec, path)
    if weights is not None:
        load_weights(loaded.obj, weights)
    return loaded


def _call_text(spec: str, args: dict[str, Any]) -> str:
    return f"{spec}({', '.join(f'{k}={v!r}' for k, v in args.items())})"


def _from_timm(spec: str, args: dict[str, Any]) -> nn.Module:
    name = spec.split(":", 1)[1]
    try:
        import timm
    except ImportError as err:
        raise ReparamError(f"'{spec}' needs timm: pip install timm (or pip install 'reparam[zoo]')") from err
    if name not in timm.list_models():
        close = timm.list_models(f"*{name}*")[:3]
        raise ReparamError(f"timm has no model '{name}'" + (f"; did you mean {', '.join(close)}?" if close else
                                                            "; `timm.list_models()` lists them"))
    try:
        model = timm.create_model(name, **args)
    except Exception as err:
        raise ReparamError(f"timm.create_model('{name}'{''.join(f', {k}={v!r}' for k, v in args.items())}) "
                           f"failed: {_first_line(err)}") from err
    return model.eval()


def _from_factory(spec: str, args: dict[str, Any] | None = None) -> nn.Module:
    args = args or {}
    if is_timm_spec(spec):
        return _from_timm(spec, args)
    module_name, _, attr = spec.partition(":")
    _cwd_on_path()
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as err:
        raise ReparamError(f"cannot import '{module_name}' (from '{spec}'): {_first_line(err)}; run from the "
                           f"directory that holds it or add it to PYTHONPATH") from err
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ReparamError(f"'{module_name}' has no attribute '{attr}'")
        target = getattr(target, part)
    if not callable(target):
        raise ReparamError(f"'{spec}' is not callable: it must be a function or class returning an nn.Module")
    try:
        model = target(**args)
    except TypeError as err:
        raise ReparamError(f"calling '{_call_text(spec, args)}' failed: {_first_line(err)} (check the --arg "
                           f"names)") from err
    except Exception as err:
        raise ReparamError(f"calling '{_call_text(spec, args)}' failed: {_first_line(err)}") from err
    if not isinstance(model, nn.Module):
        raise ReparamError(f"'{_call_text(spec, args)}' returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _file_kind(path: Path) -> str | None:
    """'torchscript' (torch.jit.save), 'torch' (torch.save: a zip holding data.pkl, or a legacy pickle) or None,
    from the file's structure alone: nothing is unpickled."""
    try:
        with open(path, "rb") as f:
            if f.read(1) == b"\x80":  # the opcode a pickle starts with: torch.save's legacy format
                return "torch"
        with zipfile.ZipFile(path) as archive:
            names = {name.split("/", 1)[-1] for name in archive.namelist()}
    except zipfile.BadZipFile:
        return None
    except OSError as err:
        raise ReparamError(f"cannot read '{path}': {err.strerror or err}") from err
    return "torchscript" if "constants.pkl" in names else "torch" if "data.pkl" in names else None


_NOT_TORCH = ("is not a readable PyTorch checkpoint: neither a torch.save archive nor a pickle (damaged, or "
              "another format)")


def _unpickle_module(path: Path, trust: bool) -> Any:
    """The module in ``path``, or the checkpoint dict holding it (see :func:`module_key`)."""
    kind = _file_kind(path)
    if kind == "torchscript":
        raise ReparamError(f"'{path}' is a TorchScript model (torch.jit): TorchScript models cannot be fused, they "
                           f"have no Python module structure; pass the original module (torch.save(model)) or "
                           f"its factory with weights: pkg.module:factory --weights FILE")
    if kind is None:
        raise ReparamError(f"'{path}' {_NOT_TORCH}")
    if not trust:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if "weights_only" in str(err) or "Weights only" in str(err):
                raise ReparamError(f"'{path}' is a pickled model: loading it runs code from the file, so it is "
                                   f"refused by default. If you trust its source, add --trust; otherwise pass the "
                                   f"model's factory with its weights: pkg.module:factory --weights FILE") from err
            raise ReparamError(f"'{path}' could not be read as a PyTorch file: {_first_line(err)}") from err
        except Exception as err:
            raise ReparamError(f"'{path}' could not be read as a PyTorch file: {_first_line(err)}") from err
    else:
        _cwd_on_path()  # the model's classes are imported by name, usually from the project directory
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except (ModuleNotFoundError, AttributeError) as err:
            if "__main__" in str(err):
                raise ReparamError(f"'{path}' could not be unpickled ({_first_line(err)}): the model's class was "
                                   f"defined in a script run as __main__, so only that script can unpickle it. "
                                   f"Move the class into a module (e.g. models.py), or save the weights with "
                                   f"torch.save(model.state_dict(), FILE) and pass the factory: "
                                   f"reparam fuse models:Net --weights FILE -o OUT") from err
            raise ReparamError(f"'{path}' could not be unpickled ({_first_line(err)}): the model's classes must "
                               f"be importable; run from the project directory or set PYTHONPATH") from err
        except Exception as err:
            raise ReparamError(f"'{path}' could not be read as a PyTorch file: {_first_line(err)}") from err
    if isinstance(obj, nn.Module) or module_key(obj) is not None:
        return obj
    if state_dict_of(obj) is not None:
        raise ReparamError(f"'{path}' holds weights only (a state_dict), not a model: pass the model's factory "
                           f"with it: reparam fuse pkg.module:factory --weights {path} -o OUT")
    raise ReparamError(f"'{path}' holds a {type(obj).__name__}, not a torch.nn.Module")


def module_key(obj: Any) -> Any:
    """The key of the model in a checkpoint dict (as YOLO frameworks save it: {'model': module, 'epoch': ...}):
    the one value that is an nn.Module, or 'model' when several are (None if ``obj`` is not such a dict)."""
    if not isinstance(obj, dict):
        return None
    keys = [k for k, v in obj.items() if isinstance(v, nn.Module)]
    if len(keys) > 1 and isinstance(obj.get("model"), nn.Module):
        return "model"
    return keys[0] if len(keys) == 1 else None


def state_dict_of(obj: Any) -> dict[str, torch.Tensor] | None:
    """The state_dict in ``obj``: ``obj`` itself or a value under a usual checkpoint key (None if none)."""
    def tensors_only(d):
        return isinstance(d, dict) and d and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in d.items())

    if tensors_only(obj):
        return obj
    if isinstance(obj, dict):
        for key in _STATE_DICT_KEYS:
            if tensors_only(obj.get(key)):
                return obj[key]
    return None


def load_weights(model: nn.Module, weights: str | os.PathLike) -> None:
    """Read ``weights`` with ``torch.load(weights_only=True)`` and load them strictly into ``model``."""
    path = Path(weights)
    if not path.is_file():
        raise ReparamError(f"no such weights file: {path}")
    kind = _file_kind(path)
    if kind == "torchscript":
        raise ReparamError(f"weights file '{path}' is a TorchScript model (torch.jit), not weights: give a "
                           f"state_dict saved with torch.save(model.state_dict(), FILE)")
    if kind is None:
        raise ReparamError(f"weights file '{path}' {_NOT_TORCH}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ReparamError(f"weights file '{path}' holds more than tensors (a pickled model?), so it cannot be "
                           f"loaded safely; save model.state_dict() instead, or pass the model itself as IN "
                           f"with --trust") from err
    except Exception as err:
        raise ReparamError(f"weights file '{path}' could not be loaded safely (weights_only=True): "
                           f"{_first_line(err)}") from err
    state = state_dict_of(obj)
    if state is None:
        raise ReparamError(f"weights file '{path}' holds no state_dict (expected a dict of tensors, or one under "
                           f"{', '.join(repr(k) for k in _STATE_DICT_KEYS)})")
    expected = model.state_dict()
    if not set(state) & set(expected) and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}  # saved from DataParallel/DDP
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("with a different shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. '{keys[0]}')")
        raise ReparamError(f"weights file '{path}' does not fit the model: {', '.join(parts)} key(s)")
    model.load_state_dict(state, strict=True)


def _load_onnx(path: Path):
    try:
        import onnx
    except ImportError as err:
        raise ReparamError("ONNX input needs the onnx package: pip install 'reparam[onnx]'") from err
    if path.is_file() and path.stat().st_size == 0:
        raise ReparamError(f"'{path}' is empty (0 bytes): not an ONNX model")
    try:
        return onnx.load(str(path))
    except Exception as err:
        raise ReparamError(f"'{path}' is not a loadable ONNX model: {_first_line(err)}") from err


def first_non_finite(loaded: Loaded) -> tuple[str, str] | None:
    """The first parameter, buffer or initializer holding NaN or ±inf: (name, 'NaN' | 'inf'), or None."""
    if loaded.kind == "module":
        named = list(loaded.obj.named_parameters()) + list(loaded.obj.named_buffers())
    elif loaded.kind == "exported":
        named = list(loaded.obj.state_dict.items()) + list(getattr(loaded.obj, "constants", {}).items())
    else:
        from onnx import numpy_helper

        named = []
        for init in loaded.obj.graph.initializer:
            try:
                named.append((init.name, torch.from_numpy(numpy_helper.to_array(init).copy())))
            except Exception:  # a type torch cannot hold: not checked
                continue
    for name, t in named:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            return name, "NaN" if bool(torch.isnan(t).any()) else "inf"
    return None


def check_finite(loaded: Loaded) -> None:
    """Refuse weights holding NaN or ±inf: no fused model can be checked against them."""
    bad = first_non_finite(loaded)
    if bad is not None:
        name, what = bad
        raise ReparamError(f"'{loaded.source}' has non-finite weights: '{name}' holds {what}; fusion needs finite "
                           f"weights (was the checkpoint saved after training diverged?)")
