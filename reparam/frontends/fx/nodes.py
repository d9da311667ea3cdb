"""What the FX front end reads off a torch.fx node: its shape and dtype (from tracing metadata), its scoped
name for reports, and the origin handle an unchanged IR node keeps."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx


@dataclass
class FxOrigin:
    """Where an unchanged IR node came from: the FX node, and which of its inputs the IR inputs are."""

    node: fx.Node
    inputs: list[fx.Node]


def scoped_name(n: fx.Node) -> str:
    """The node's name under the module path it was traced in (``stages.0.mixer.add_1``), for reports."""
    if n.op == "call_module":
        return str(n.target)
    stack = n.meta.get("nn_module_stack") or {}
    scope = next(reversed(stack.values()), None) if stack else None
    path = scope[0] if isinstance(scope, tuple) else None
    return f"{path}.{n.name}" if path else n.name


def fx_shape(n: fx.Node) -> tuple[int, ...] | None:
    val = n.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    tm = n.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tuple(int(s) for s in tm.shape)
    return None


def fx_dtype(n: fx.Node) -> torch.dtype | None:
    val = n.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dtype
    tm = n.meta.get("tensor_meta")
    return getattr(tm, "dtype", None)
