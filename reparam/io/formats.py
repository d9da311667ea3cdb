"""Model formats by spelling alone (torch-free, so ``reparam --help`` stays fast).

Inputs: ``pkg.module:factory``, ``timm:NAME``, a pickle (``.pt``, ``.pth``, …), a ``torch.export`` program
(``.pt2``), an ONNX model. Outputs: ``.pt`` / ``.pth`` (pickle), ``.pt2``, ``.onnx``, ``.py`` (readable
Python source plus ``.safetensors`` weights beside it: loads without unpickling).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from reparam.errors import ReparamError

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".ckpt", ".bin", ".tar")
OUTPUT_SUFFIXES = (".pt", ".pth", ".pt2", ".onnx", ".py")
_FACTORY = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_TIMM = re.compile(r"^timm:[\w.\-]+$")


def is_timm_spec(spec: str) -> bool:
    return bool(_TIMM.match(spec)) and not Path(spec).exists()


def is_factory_spec(spec: str) -> bool:
    return (bool(_FACTORY.match(spec)) or is_timm_spec(spec)) and not Path(spec).exists()


def input_kind(spec: str) -> str:
    """'factory', 'pickle', 'exported' or 'onnx' from the spelling alone (the file is not read)."""
    if is_factory_spec(spec):
        return "factory"
    suffix = Path(spec).suffix.lower()
    if suffix == ".pt2":
        return "exported"
    if suffix == ".onnx":
        return "onnx"
    if suffix in PICKLE_SUFFIXES:
        return "pickle"
    raise ReparamError(f"unknown model format '{suffix or spec}': give a .pt/.pth file (torch.save), a .pt2 "
                       f"program (torch.export), an .onnx model, or a factory as pkg.module:function or timm:NAME")


def output_format(path: str | os.PathLike) -> str:
    """'pt', 'pt2', 'onnx' or 'py' from the extension (ReparamError for anything else)."""
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise ReparamError(f"unknown output format '{suffix or Path(path).name}': the output must end in .pt "
                           f"(torch.save), .pt2 (torch.export), .onnx or .py (Python source + .safetensors)")
    return {".pth": "pt"}.get(suffix, suffix[1:])


def companion_paths(path: str | os.PathLike, fmt: str) -> list[Path]:
    """The files written besides ``path`` itself: a .py output's weights (``NAME.safetensors``)."""
    return [Path(path).with_suffix(".safetensors")] if fmt == "py" else []
