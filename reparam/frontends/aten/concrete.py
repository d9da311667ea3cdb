"""Concrete capture: what a module computes on its example inputs, recorded by ``torch.export`` (non-strict).

Symbolic torch.fx tracing runs ``forward`` on proxies, so Python that needs a real tensor or a real size stops
it (index writes, ``int(w.size(0) / g)``, ``reshape(*x.size())``), and in-place methods are recorded as calls
whose results nobody reads. ``torch.export.export(..., strict=False)`` runs ``forward`` as Python on fake
tensors with the example inputs' concrete shapes; ``run_decompositions({})`` then functionalizes it (every
in-place write becomes an out-of-place op whose result is used: ``y.mul_(2)`` → ``mul``, ``y[..., :p] = v`` →
``slice_scatter``) without decomposing anything else. The unlifted program (``ep.module()``) is made to read
like the model:

- its guard call is dropped, views are reshapes, and decomposed inference batch norms are written as ``aten.batch_norm``;
- an ATen conv / batch norm / linear that is exactly the forward of a plain ``nn.Conv*`` / ``nn.BatchNorm*`` /
  ``nn.Linear`` (its own tensors, its own configuration) becomes a call of that module again, so fused convs are
  named after the module they came from and unchanged layers stay modules;
- the calling convention is flat: positional tensors in, the model's tuples / lists / dicts of tensors out.

Shapes are those of the example inputs (every size query became an integer), so the deploy model is for
inputs of those shapes. Data-dependent control flow cannot be exported: the caller falls back to fusing
region by region.
"""
from __future__ import annotations

import contextlib
import io
import warnings

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import TreeSpec, tree_unflatten

from reparam.frontends.aten import recognize as aten_ops
from reparam.frontends.fx import capture as fx_capture
from reparam.frontends.module_copy import structure_copy
from reparam.frontends.fx.shapes import same_forward

aten = torch.ops.aten
_CONVS = {aten.conv1d.default: nn.Conv1d, aten.conv2d.default: nn.Conv2d, aten.conv3d.default: nn.Conv3d,
          aten.conv1d.padding: nn.Conv1d, aten.conv2d.padding: nn.Conv2d, aten.conv3d.padding: nn.Conv3d}
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONTAINERS = (tuple, list, dict)


class ConcreteCaptureError(Exception):
    """The module cannot be captured concretely (its first line says why)."""


def capture_concrete(module: nn.Module, inputs: tuple) -> fx.GraphModule:
    """A functional ATen GraphModule of ``module`` on ``inputs`` (positional tensors), with shapes on every
    node (``meta['val']``) and plain layers as module calls. Raises ConcreteCaptureError."""
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ConcreteCaptureError("concrete capture needs positional tensor inputs")
    copy = structure_copy(module)
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            ep = torch.export.export(copy, tuple(inputs), strict=False)
            ep = ep.run_decompositions({})  # functionalize only: in-place ops become out-of-place ones
            gm = ep.module()
    except Exception as err:  # noqa: BLE001 - any export failure: the caller falls back
        raise ConcreteCaptureError(fx_capture.first_line(err)) from err
    if ep.graph_signature.buffers_to_mutate or ep.graph_signature.user_inputs_to_mutate:
        raise ConcreteCaptureError("the forward writes into its buffers or inputs")
    _drop_guards(gm)
    _views_as_reshapes(gm)
    aten_ops.normalize(gm)
    _flatten_signature(gm)
    _restore_modules(gm, copy)
    gm.graph.eliminate_dead_code()
    return fx.GraphModule(gm, gm.graph, class_name=type(module).__name__)  # prints as the model's class


def _drop_guards(gm: fx.GraphModule) -> None:
    """Remove the input-shape guard call of the unlifted program (it computes nothing)."""
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and not n.users and type(gm.get_submodule(n.target)).__name__ == "GuardsFn":
            gm.graph.erase_node(n)
            gm.delete_submodule(n.target)


def _views_as_reshapes(gm: fx.GraphModule) -> None:
    """``aten.view`` → ``aten.reshape``: the same values in a functional graph, and it still runs when a rewrite
    changes the memory layout of its input (a fused layer's output is contiguous where a transpose was not)."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (aten.view.default, aten._unsafe_view.default):
            n.target = aten.reshape.default


def _flatten_signature(gm: fx.GraphModule) -> None:
    """Give ``gm`` a plain calling convention: its placeholders in order, its outputs in the model's own
    tuples, lists and dicts (other output types would be lost: refused)."""
    out_spec = getattr(gm, "_out_spec", None)
    in_spec = getattr(gm, "_in_spec", None)
    if in_spec is not None and not _flat_args(in_spec):
        raise ConcreteCaptureError("the forward takes nested or keyword inputs")
    output = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = list(output.args[0]) if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    if out_spec is not None:
        if not _plain_spec(out_spec):
            raise ConcreteCaptureError("the forward returns a type other than tensors, tuples, lists and dicts")
        structure = tree_unflatten(leaves, out_spec)
    else:
        structure = output.args[0]
    gm.graph.set_codegen(fx.graph.CodeGen())
    output.args = (structure,)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            delattr(gm, attr)


def _flat_args(spec: TreeSpec) -> bool:
    """((t0, t1, ...), {}): positional tensors only."""
    if spec.type is not tuple or spec.num_children != 2:
        return False
    args, kwargs = spec.children()
    return args.type is tuple and all(c.is_leaf() for c in args.children()) and kwargs.num_children == 0


def _plain_spec(spec: TreeSpec) -> bool:
    if spec.is_leaf():
        return True
    return spec.type in _CONTAINERS and all(_plain_spec(c) for c in spec.children())


def _owner(n: fx.Node) -> str | None:
    """The innermost module path the node was recorded in."""
    stack = n.meta.get("nn_module_stack") or {}
    scope = next(reversed(stack.values()), None) if stack else None
    return scope[0] if isinstance(scope, tuple) and scope[0] else None


def _attr_of(n, path: str, name: str) -> bool:
    return isinstance(n, fx.Node) and n.op == "get_attr" and n.target == f"{path}.{name}"


def _as_module_call(n: fx.Node, m: nn.Module, path: str) -> fx.Node | None:
    """The data input of ``n`` if ``n`` computes exactly ``m``'s own forward, else None."""
    if n.op != "call_function" or not aten_ops.is_aten(n.target):
        return None
    try:
        a = aten_ops.arguments(n.target, n.args, n.kwargs)
    except TypeError:
        return None

    def own(name, arg):
        value = getattr(m, name, None)
        return (value is None and a.get(arg) is None) or (value is not None and _attr_of(a.get(arg), path, name))

    def ints(v, nd):
        return tuple(v) * nd if len(tuple(v)) == 1 else tuple(v)

    if n.target in _CONVS and same_forward(m, _CONVS[n.target]) and m.padding_mode == "zeros":
        nd = m.weight.ndim - 2
        padding = a["padding"] if isinstance(a["padding"], str) else ints(a["padding"], nd)
        if own("weight", "weight") and own("bias", "bias") and ints(a["stride"], nd) == tuple(m.stride) \
                and padding == (m.padding if isinstance(m.padding, str) else tuple(m.padding)) \
                and ints(a["dilation"], nd) == tuple(m.dilation) and a["groups"] == m.groups:
            return a["input"]
    if n.target is aten.batch_norm.default and type(m) in _BATCH_NORMS and m.track_running_stats \
            and not m.training and a["training"] is False and a["eps"] == m.eps:
        if all(own(name, name) for name in ("weight", "bias", "running_mean", "running_var")):
            return a["input"]
    if n.target is aten.linear.default and same_forward(m, nn.Linear) and own("weight", "weight") \
            and own("bias", "bias"):
        return a["input"]
    return None


def _restore_modules(gm: fx.GraphModule, model: nn.Module) -> None:
    """Write each ATen call that is exactly a plain layer's forward as a call of that layer."""
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    found = []
    for n in gm.graph.nodes:
        path = _owner(n)
        m = modules.get(path) if path else None
        if m is None or any(True for _ in m.children()):
            continue
        x = _as_module_call(n, m, path)
        if x is not None:
            found.append((n, x, path, m))
            calls[path] = calls.get(path, 0) + 1
    for n, _, path, m in found:
        if calls[path] != 1:
            continue  # a layer called twice stays two ATen calls (one module per call site reads best)
        _set_module(gm, path, m)
        with gm.graph.inserting_before(n):
            new = gm.graph.call_module(path, (n.args[0],))  # the data input (it may have been replaced since)
        new.meta = dict(n.meta)
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)


def _set_module(gm: fx.GraphModule, path: str, m: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    old = getattr(parent, name, None)
    if isinstance(old, nn.Module) and old is not m:
        setattr(parent, name, m)  # the unlifted program's holder of m's tensors: m itself holds the same


def _capture(module: nn.Module, inputs: tuple | None):
    if inputs is None:
        raise ConcreteCaptureError("no example inputs")
    return capture_concrete(module, inputs)


fx_capture.CONCRETE_CAPTURES.append(_capture)
