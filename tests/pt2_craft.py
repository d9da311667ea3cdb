"""A .pt2 archive whose pickled entries would run code when loaded (they create a marker file)."""
from __future__ import annotations

import json
import pathlib
import pickle
import zipfile


class Touch:
    """Unpickling it creates ``path`` (what a malicious pickle could do with any code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def craft(clean: pathlib.Path, out: pathlib.Path, marker: pathlib.Path, where: str = "sample_inputs") -> None:
    """Copy the archive ``clean`` to ``out`` with the sample inputs ('sample_inputs') or the first weight
    ('weight') replaced by a pickle that touches ``marker``."""
    payload = pickle.dumps(Touch(marker))
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if where == "sample_inputs" and "/data/sample_inputs/" in info.filename:
                data = payload
            if where == "weight" and info.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"].values()))
                first["use_pickle"] = True
                data = json.dumps(config).encode()
            if where == "weight" and info.filename.endswith("/data/weights/weight_0"):
                data = payload
            dst.writestr(info, data)
