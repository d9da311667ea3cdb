"""Reading and writing torch.export programs (``.pt2``), safely: see :func:`load_pt2`."""
from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from reparam.errors import ReparamError
from reparam.io.atomic import atomic_path
from reparam.io.quiet import quiet_torch


def load_pt2(path: str | os.PathLike, *, trust: bool = False) -> torch.export.ExportedProgram:
    """Load a ``.pt2`` program. ``torch.export.load`` unpickles some entries with ``weights_only=False``
    (weights and constants saved with ``use_pickle``, the sample inputs, custom objects); unless ``trust``,
    each such entry must load with ``weights_only=True`` first, custom objects are refused, and the program is
    read from those same checked bytes, so no code from the file runs."""
    path = Path(path)
    if not path.is_file():
        raise ReparamError(f"no such file: {path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ReparamError(f"cannot read '{path}': {err.strerror or err}") from err
    if not trust:
        unsafe = pt2_unsafe_entry(data)
        if unsafe is not None:
            raise ReparamError(f"'{path}' holds a pickled entry that runs code when loaded ({unsafe}), so it is "
                               f"refused by default; if you trust its source, add --trust")
    try:
        with quiet_torch():  # on a bad file torch logs a traceback before it raises
            return torch.export.load(io.BytesIO(data))
    except Exception as err:
        raise ReparamError(f"'{path}' is not a loadable torch.export program (.pt2): "
                           f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err


def program_has_dynamic_batch(ep: torch.export.ExportedProgram) -> bool:
    """The program's first user input has a symbolic first dimension."""
    user = set(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in user:
            val = node.meta.get("val")
            return isinstance(val, torch.Tensor) and val.dim() >= 1 and isinstance(val.shape[0], torch.SymInt)
    return False


def pt2_unsafe_entry(data: bytes) -> str | None:
    """The first entry of a .pt2 archive that ``torch.export.load`` would unpickle with code able to run
    (described in words), or None. Not a zip, or not torch.export's format: None (the loader reports it)."""
    import json
    import pickle
    import zipfile

    from torch.export.pt2_archive import constants as pt2

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        return None
    names = archive.namelist()
    root = names[0].split("/", 1)[0] + "/" if names and "/" in names[0] else ""

    def safe(name: str) -> bool:
        try:
            torch.load(io.BytesIO(archive.read(name)), map_location="cpu", weights_only=True)
            return True
        except pickle.UnpicklingError:
            return False
        except Exception:
            return True  # not a pickle torch reads at all: torch.export.load fails on it, it runs nothing

    if f"{root}{pt2.ARCHIVE_FORMAT_PATH}" not in names:
        if any(n.endswith(".json") for n in names) and any(n.endswith((".pt", ".pkl")) for n in names):
            return "a .pt2 of an older torch.export format, whose loader unpickles its weights"
        return None
    for name in names:
        rel = name[len(root):]
        if rel.startswith(pt2.SAMPLE_INPUTS_DIR) and not safe(name):
            return f"the sample inputs '{rel}'"
        if rel.startswith((pt2.WEIGHTS_DIR, pt2.CONSTANTS_DIR)) and rel.endswith(".pt") and not safe(name):
            return f"'{rel}'"  # the legacy single-file weights
        if rel.startswith((pt2.WEIGHTS_DIR, pt2.CONSTANTS_DIR)) and rel.endswith(".json"):
            folder = pt2.WEIGHTS_DIR if rel.startswith(pt2.WEIGHTS_DIR) else pt2.CONSTANTS_DIR
            try:
                config = json.loads(archive.read(name)).get("config", {})
            except (ValueError, AttributeError):
                continue
            for fqn, meta in config.items():
                file = meta.get("path_name", "")
                if folder == pt2.CONSTANTS_DIR and file.startswith((pt2.CUSTOM_OBJ_FILENAME_PREFIX,
                                                                   pt2.OPAQUE_OBJ_FILENAME_PREFIX)):
                    return f"the custom object '{fqn}'"
                if meta.get("use_pickle") and not safe(f"{root}{folder}{file}"):
                    return f"the pickled tensor '{fqn}'"
    return None


def save_pt2(ep: torch.export.ExportedProgram, path: str | os.PathLike) -> None:
    """Write ``ep`` to ``path`` atomically (a temporary file in the same folder, renamed into place)."""
    with atomic_path(path) as tmp:
        torch.export.save(ep, tmp)
