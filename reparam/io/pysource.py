"""The ``.py`` deploy format: the fused computation as readable Python source (torch calls only) plus its
weights in a ``.safetensors`` file beside it. Loading it unpickles nothing and needs torch alone (the file
holds its own reader of the safetensors format; the ``safetensors`` package reads the weights too).

The source is the graph of the ``torch.export`` program of the fused model (ATen calls such as
``torch.ops.aten.conv2d.default``), written by ``torch.fx``'s code generator with every weight read as
``self.NAME``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.fx as fx

from reparam.errors import ReparamError

_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
# Names the generated code may use that torch.fx's code generator takes from its globals.
_HEADER_NAMES = {"torch", "inf", "nan", "NoneType", "device", "fx_pytree", "pytree"}

_READER = '''
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_safetensors(path):
    """The tensors of a .safetensors file (8-byte little-endian header size, JSON header, raw data)."""
    with open(path, "rb") as f:
        data = f.read()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    base = 8 + size
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        raw = bytearray(data[base + begin:base + end])
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(info["shape"])
    return tensors
'''


def write_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """Write ``tensors`` in the safetensors format (little-endian, header padded to 8 bytes)."""
    header: dict = {}
    blobs: list[bytes] = []
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _CODES:
            raise ReparamError(f"cannot write '{name}' ({t.dtype}) to .safetensors; write .pt2 or .pt instead")
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        header[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def _flat_name(target: str, taken: set[str]) -> str:
    base = re.sub(r"\W", "_", target).strip("_") or "w"
    base = base if base[0].isalpha() or base[0] == "_" else f"w_{base}"
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def python_source(ep: torch.export.ExportedProgram, title: str) -> tuple[str, dict[str, torch.Tensor]]:
    """The module source and the tensors it reads, for a program with positional tensor inputs and a tensor
    or a flat tuple of tensors as output (ReparamError otherwise, naming what does not fit)."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    args_spec = ep.call_spec.in_spec
    example = tree_unflatten([0] * args_spec.num_leaves, args_spec)
    if example[1] or any(not isinstance(a, int) for a in example[0]):
        raise ReparamError("the .py format needs a model called with positional tensors only; write .pt2 instead")
    out_spec = ep.call_spec.out_spec
    flat_out, _ = tree_flatten(tree_unflatten([0] * out_spec.num_leaves, out_spec))
    single = out_spec.is_leaf()
    if not single and tree_unflatten(list(range(len(flat_out))), out_spec) != tuple(range(len(flat_out))):
        raise ReparamError("the .py format writes a tensor or a tuple of tensors as output; this model returns a "
                           "nested structure: write .pt2 instead")
    unlifted = ep.module()
    params = {name for name, _ in unlifted.named_parameters()}
    graph, env, tensors, taken = fx.Graph(), {}, {}, set()
    names: dict[str, str] = {}
    for node in unlifted.graph.nodes:
        if node.op == "call_module":
            if node.target == "_guards_fn" and not node.users:
                continue  # torch.export's input-shape guard: no part of the computation
            raise ReparamError(f"the .py format cannot hold the submodule call '{node.target}'; write .pt2 instead")
        if node.op == "get_attr":
            value = unlifted
            for part in node.target.split("."):
                value = getattr(value, part)
            if not isinstance(value, torch.Tensor):
                raise ReparamError(f"the .py format cannot hold '{node.target}' ({type(value).__name__}); write "
                                   f".pt2 instead")
            if node.target not in names:
                names[node.target] = _flat_name(node.target, taken)
                tensors[names[node.target]] = value
            env[node] = graph.get_attr(names[node.target])
            continue
        if node.op == "output":
            outs = [env[a] for a in node.args[0]]
            graph.output(outs[0] if single else tuple(outs))
            continue
        env[node] = graph.node_copy(node, lambda a: env[a])
    code = graph.python_code("self")
    unknown = sorted(set(code.globals) - _HEADER_NAMES)
    if unknown:
        raise ReparamError(f"the .py format cannot express {', '.join(unknown)} used by the fused program; write "
                           f".pt2 instead")
    from reparam.io.pt2 import program_has_dynamic_batch

    dynamic_batch = program_has_dynamic_batch(ep)
    kinds = {n: ("parameter" if t in params else "buffer") for t, n in names.items()}
    forward = "\n".join("    " + ln if ln.strip() else "" for ln in code.src.strip().splitlines())
    source = f'''"""{title}

The fused computation as plain torch calls; its weights are in the .safetensors file of the same name.
Load it with torch alone, nothing is unpickled:

    import importlib.util
    spec = importlib.util.spec_from_file_location("deploy", "path/to/this_file.py")
    deploy = importlib.util.module_from_spec(spec); spec.loader.exec_module(deploy)
    model = deploy.load()          # or deploy.load("other.safetensors", map_location="cuda")

(or `from this_file import load` when its folder is on sys.path).
"""
import json
import math
from pathlib import Path

import torch
from torch import device  # noqa: F401 (the generated code may name devices)

inf, nan = math.inf, math.nan
NoneType = type(None)
{_READER}

DYNAMIC_BATCH = {dynamic_batch}  # the model runs at any batch size (else only at the example's shapes)
PARAMETERS = {tuple(n for n, k in kinds.items() if k == "parameter")!r}
BUFFERS = {tuple(n for n, k in kinds.items() if k == "buffer")!r}


class DeployModel(torch.nn.Module):
    """The fused model: parameters and buffers by flat name, forward as generated by torch.fx."""

    def __init__(self, tensors):
        super().__init__()
        for name in PARAMETERS:
            setattr(self, name, torch.nn.Parameter(tensors[name], requires_grad=False))
        for name in BUFFERS:
            self.register_buffer(name, tensors[name])

{forward}


def load(weights=None, map_location="cpu"):
    """The model in eval mode, its tensors read from ``weights`` (default: this file's .safetensors)."""
    path = Path(weights) if weights is not None else Path(__file__).with_suffix(".safetensors")
    tensors = {{name: t.to(map_location) for name, t in read_safetensors(path).items()}}
    return DeployModel(tensors).eval()
'''
    return source, tensors


def write_python(ep: torch.export.ExportedProgram, source_path: str, weights_path: str, title: str) -> None:
    source, tensors = python_source(ep, title)
    Path(source_path).write_text(source, encoding="utf-8")
    write_safetensors(tensors, weights_path, {"format": "pt", "producer": "reparam"})


def load_python(source_path: str, weights_path: str | None = None):
    """Import a written .py deploy file (by path) and ``load`` its model."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_reparam_deploy_{abs(hash(source_path))}", source_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load(weights_path)
