"""Reading and writing torch.export programs (``.pt2``)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from reparam.errors import ReparamError
from reparam.io.quiet import quiet_torch
from reparam.io.saving import atomic_path


def load_pt2(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """Load a ``.pt2`` program (``torch.export.load``: no arbitrary code runs)."""
    path = Path(path)
    if not path.is_file():
        raise ReparamError(f"no such file: {path}")
    try:
        with quiet_torch():  # on a bad file torch logs a traceback before it raises
            return torch.export.load(str(path))
    except Exception as err:
        raise ReparamError(f"'{path}' is not a loadable torch.export program (.pt2): "
                           f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err


def save_pt2(ep: torch.export.ExportedProgram, path: str | os.PathLike) -> None:
    """Write ``ep`` to ``path`` atomically (a temporary file in the same folder, renamed into place)."""
    with atomic_path(path) as tmp:
        torch.export.save(ep, tmp)
