"""The model's interface: initializers that are also graph inputs.

In ONNX (IR ≥ 4) an initializer listed among the graph inputs is an overridable default: a caller may feed
that input, and the model must then use what was fed. Folding it as a constant would return a model that
ignores the caller (a wrong model), so by default such tensors are inputs like any other: the rules see data,
not constants, and the written model keeps the input and its default. ``freeze=True`` (CLI
``--freeze-inputs``) says the caller never feeds them: they become constants and leave the inputs, which is
reported. Below IR version 4 every initializer must be listed as an input, so the listing says nothing: there
initializers are constants (as ONNX Runtime reads them: it refuses a feed for one) and stay listed.
"""
from __future__ import annotations

import onnx


def initializer_inputs(model: onnx.ModelProto) -> list[str]:
    """Names of the graph inputs that also have an initializer (in input order): overridable defaults from IR
    version 4 on; none below (where every initializer must be listed)."""
    if model.ir_version < 4:
        return []
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name in inits]


def split_interface(model: onnx.ModelProto, freeze: bool) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto],
                                                                   list[str]]:
    """(the model to import, the defaults set aside, notes). Without ``freeze`` the defaults are removed from
    the initializers of the copy (so they import as inputs) and must be put back with :func:`put_back`."""
    names = initializer_inputs(model)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    if not names:
        return work, {}, []
    shown = ", ".join(f"'{n}'" for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    if freeze:
        keep = [i for i in work.graph.input if i.name not in set(names)]
        del work.graph.input[:]
        work.graph.input.extend(keep)
        return work, {}, [f"froze {len(names)} initializer(s) listed as graph inputs ({shown}): they are constants "
                          f"now and no longer inputs of the written model"]
    defaults = {i.name: i for i in model.graph.initializer if i.name in set(names)}
    keep = [i for i in work.graph.initializer if i.name not in defaults]
    del work.graph.initializer[:]
    work.graph.initializer.extend(keep)
    note = (f"{len(names)} initializer(s) are also graph inputs ({shown}): overridable defaults, kept as inputs and "
            f"not folded; pass freeze_initializer_inputs=True (--freeze-inputs) if callers never feed them")
    return work, defaults, [note]


def put_back(fused: onnx.ModelProto, defaults: dict[str, onnx.TensorProto]) -> None:
    """The set-aside defaults as initializers of ``fused`` again (its inputs still list them)."""
    have = {i.name for i in fused.graph.initializer}
    fused.graph.initializer.extend(t for name, t in defaults.items() if name not in have)
