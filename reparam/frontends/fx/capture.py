"""Capture: trace a module with torch.fx and attach shapes to every node.

Symbolic tracing is used where it sees everything the model computes. Where it fails, or its graph mutates
a tensor that something else reads or reads a tensor's shape besides its value (so the tensor looks used
twice), the registered concrete captures (``CONCRETE_CAPTURES``: torch.export on the example inputs, see
``reparam.frontends.aten.concrete``) record the model instead. A model that neither can capture as a whole
is split: its largest capturable submodules become regions (fused on their own), the rest stays as it was
and is reported as opaque.
"""
from __future__ import annotations

import contextlib
import importlib
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils import parametrize

from reparam.errors import CaptureError
from reparam.frontends.fx.prune import SHAPE_CHECKS
from reparam.frontends.fx.shapes import attach_shapes
from reparam.frontends.module_copy import structure_copy


@dataclass
class Region:
    """A traced part of the model: ``path`` ('' for the whole model) and its example inputs."""

    path: str
    gm: fx.GraphModule
    inputs: tuple | None


@dataclass
class Capture:
    regions: list[Region] = field(default_factory=list)
    opaque: dict[str, str] = field(default_factory=dict)  # module path -> why it was not traced
    shaped: bool = False  # shapes were attached to the whole-model graph
    notes: list[str] = field(default_factory=list)  # how a region was captured, when not symbolically


def first_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()
    return text[0][:200] if text else type(err).__name__


_first_line = first_line

# Captures that record a module on its example inputs: callables (module, inputs) -> GraphModule with shapes on
# its nodes, raising on failure, or the name "module:function" of one, imported the first time a capture is needed
# (torch.export's, reparam.frontends.aten.concrete, is registered by name: importing it costs a quarter second).
CONCRETE_CAPTURES: list[Callable[[nn.Module, tuple | None], fx.GraphModule] | str] = []


def concrete_captures() -> list[Callable[[nn.Module, tuple | None], fx.GraphModule]]:
    """The registered concrete captures, those registered by name imported now (each once)."""
    for k, c in enumerate(CONCRETE_CAPTURES):
        if isinstance(c, str):
            module, name = c.split(":")
            CONCRETE_CAPTURES[k] = getattr(importlib.import_module(module), name)
    return list(dict.fromkeys(CONCRETE_CAPTURES))

CONCRETE = "reparam_captured_on_inputs"  # meta key of a graph recorded on the example inputs (not traced)

_SHAPE_QUERIES = {"size", "dim", "numel", "nelement"}
_SHAPE_ATTRS = {"shape", "ndim"}
_LIKE = {"reshape_as", "view_as", "expand_as"}
_IN_PLACE_FUNCS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


def _shape_only_use(u: fx.Node, n: fx.Node) -> bool:
    """``u`` reads only the shape of ``n``."""
    if u.op == "call_method":
        return (u.target in _SHAPE_QUERIES and u.args[0] is n) or \
            (u.target in _LIKE and len(u.args) > 1 and u.args[1] is n and u.args[0] is not n)
    return u.op == "call_function" and u.target is getattr and u.args[0] is n and u.args[1] in _SHAPE_ATTRS


def _mutated(n: fx.Node) -> fx.Node | None:
    """The tensor ``n`` writes into in place, if any."""
    first = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    if n.op == "call_method" and str(n.target).endswith("_") and not str(n.target).startswith("_"):
        return first
    if n.op == "call_function" and (n.target in _IN_PLACE_FUNCS or n.kwargs.get("inplace") is True or
                                    getattr(n.target, "__name__", "_").endswith("_")
                                    and not getattr(n.target, "__name__", "_").startswith("_")):
        return first
    if n.op == "call_module" and n.graph.owning_module is not None:
        m = n.graph.owning_module.get_submodule(n.target)
        return first if getattr(m, "inplace", False) is True else None
    return None


def _read_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes whose value something reads: the outputs and every effect other than a shape assert, and
    what they depend on. A shape query that only feeds an assert is dropped before rewriting (``prune``)."""
    roots = [n for n in gm.graph.nodes if n.op == "output" or
             (n.op == "call_function" and n.target not in SHAPE_CHECKS and n.is_impure()) or _mutated(n) is not None]
    live: set[fx.Node] = set()
    while roots:
        n = roots.pop()
        if n not in live:
            live.add(n)
            roots.extend(n.all_input_nodes)
    return live


def writes_in_place(gm: fx.GraphModule) -> str | None:
    """Why the symbolic graph ``gm`` would be misread (None if it would not): an index write, or an in-place write
    into a tensor that is read elsewhere too (its later reads would see the old value). The IR's ops are pure, so
    such a graph cannot be rewritten as it was traced."""
    for n in gm.graph.nodes:
        target = getattr(n.target, "__name__", n.target)
        x = _mutated(n)
        if n.op == "call_function" and n.target is operator.setitem:
            return f"'{n.name}' writes into a tensor by index"
        if x is not None and len(x.users) > 1:
            return f"'{n.name}' ({target}) writes in place into '{x.name}', which is read elsewhere too"
    return None


def reads_shape_besides_value(gm: fx.GraphModule) -> str | None:
    """Why the symbolic graph ``gm`` fuses less than the model allows (None if it does not): a shape query of a
    computed tensor that is also read for its value, where the query's result is used (a second consumer that
    only the shape needs; a query that only feeds a shape assert is pruned). Such a graph is read rightly."""
    read = None
    for n in gm.graph.nodes:
        if n.op in ("call_module", "call_function", "call_method") and len(n.users) > 1 and \
                any(_shape_only_use(u, n) for u in n.users) and not all(_shape_only_use(u, n) for u in n.users):
            read = _read_nodes(gm) if read is None else read
            if any(_shape_only_use(u, n) and u in read for u in n.users):
                return f"the shape of '{n.name}' is read besides its value"
    return None


def sees_less(gm: fx.GraphModule) -> str | None:
    """Why the symbolic graph ``gm`` reads less than the model computes (None if it reads it all): see
    ``writes_in_place`` and ``reads_shape_besides_value``."""
    return writes_in_place(gm) or reads_shape_besides_value(gm)


def record_inputs(model: nn.Module, example_inputs: tuple) -> dict[str, tuple]:
    """Run ``model`` once and remember the positional inputs of every submodule's first call."""
    seen: dict[str, tuple] = {}
    hooks = []
    for name, m in model.named_modules():
        def hook(mod, args, name=name):
            seen.setdefault(name, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
        hooks.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def inputs_of_submodules(model: nn.Module, example_inputs: tuple | None) -> dict[str, tuple]:
    """``record_inputs`` on a structure copy of ``model`` ({} without example inputs); a model that does not run
    on them raises CaptureError naming their shapes."""
    if example_inputs is None:
        return {}
    try:
        return record_inputs(structure_copy(model), example_inputs)
    except Exception as err:
        shapes = [list(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)]
        raise CaptureError(f"the model does not run on inputs of shape {shapes}: {first_line(err)}") from err


def has_hooks(m: nn.Module) -> bool:
    """The module runs forward (pre-)hooks, which a traced graph would not see: it must stay a call."""
    return bool(m._forward_hooks or m._forward_pre_hooks)


class _IndexedTracer(fx.Tracer):
    """torch.fx's tracer, but a parameter or buffer used in forward is found by a dict lookup instead of a
    scan of every named parameter (quadratic in the model size when BatchNorms are traced through), a buffer
    read in forward is a graph node, and a module with hooks stays one call (tracing through it would drop its
    hooks)."""

    # a computation on buffers is recorded (and folded from their float64 values), not run once while tracing
    # and baked into the graph as a float32 constant
    proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if has_hooks(m):
            return True
        # a parametrized layer computes its weights in forward: traced through, so they are folded exactly
        inside = parametrize.is_parametrized(m) or isinstance(m, parametrize.ParametrizationList) or \
            ".parametrizations." in f".{qualname}."
        return not inside and super().is_leaf_module(m, qualname)

    def trace(self, root, concrete_args=None):
        self._attr_names: dict[int, tuple[torch.Tensor, str]] = {}
        if isinstance(root, nn.Module):
            for n, t in [*root.named_buffers(), *root.named_parameters()][::-1]:  # the first name wins
                self._attr_names[id(t)] = (t, n)
        return super().trace(root, concrete_args)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict):
        """``module.weight`` read in forward: the proxy of the root's name for that tensor, found in the index
        (torch.fx scans every named parameter and buffer of the root per read)."""
        found = self._attr_names.get(id(attr_val)) if isinstance(attr_val, torch.Tensor) else None
        if found is None or found[0] is not attr_val or self.param_shapes_constant:
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        name = found[1]
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def create_arg(self, a):
        if isinstance(a, torch.Tensor):
            found = self._attr_names.get(id(a))
            if found is not None and found[0] is a:
                return self.create_node("get_attr", found[1], (), {})
        return super().create_arg(a)


def trace(module: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` of a structure copy of ``module`` (tracing runs its forward on proxies,
    which it may store, e.g. in a cache), with parameter and buffer references resolved in constant time."""
    tracer = _IndexedTracer()
    module = structure_copy(module)
    graph = tracer.trace(module)
    return fx.GraphModule(tracer.root, graph, module.__class__.__name__)


def capture_one(module: nn.Module, inputs: tuple | None) -> tuple[fx.GraphModule, bool, str | None]:
    """``module`` as one graph: (graph, shapes attached, note). Symbolic tracing when it sees everything, else a
    concrete capture on ``inputs``. A symbolic graph that reads shapes besides values is kept when no concrete
    capture works; one with in-place or index writes never is: then this raises (the symbolic failure first)."""
    symbolic, why, misread = None, None, None
    try:
        symbolic = trace(module)
        misread = writes_in_place(symbolic)
        why = misread or reads_shape_besides_value(symbolic)
        if why is None:
            return symbolic, attach_shapes(symbolic, inputs), None
    except Exception as err:  # noqa: BLE001 - any tracing failure: try the concrete captures
        why = first_line(err)
        failure = err
    reasons = []
    for concrete in concrete_captures() if inputs is not None else ():
        try:
            gm = concrete(module, inputs)
            gm.meta[CONCRETE] = True
            return gm, True, f"captured on the example inputs ({why})"
        except Exception as err:  # noqa: BLE001
            reasons.append(first_line(err))
    if symbolic is not None and misread is None:  # it fuses less, but what it reads is right
        note = f"traced symbolically although {why}" + (f"; the concrete capture failed: {reasons[0]}"
                                                         if reasons else "")
        return symbolic, attach_shapes(symbolic, inputs), note
    if symbolic is not None:
        raise CaptureError(f"{why}, which the rules cannot read as traced; " + (
            f"the capture on the example inputs failed: {reasons[0]}" if reasons else
            "pass example inputs to capture it on them"))
    if reasons:
        raise CaptureError(f"{why}; on the example inputs: {reasons[0]}") from failure
    raise failure


def capture(model: nn.Module, example_inputs: tuple | None) -> Capture:
    """Capture ``model`` whole if possible (see ``capture_one``); otherwise its largest capturable submodules."""
    out = Capture()
    try:
        gm, out.shaped, note = capture_one(model, example_inputs)
        if note:
            out.notes.append(note)
        out.regions.append(Region("", gm, example_inputs))
        return out
    except Exception as err:  # any capture failure: fall back to submodules
        out.opaque[""] = str(err)[:300] if isinstance(err, CaptureError) else first_line(err)
    _capture_children(model, "", inputs_of_submodules(model, example_inputs), out)
    return out


def _capture_children(module: nn.Module, prefix: str, recorded: dict[str, tuple], out: Capture) -> None:
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if not any(True for _ in child.parameters()) and not any(True for _ in child.buffers()):
            continue  # nothing to fuse inside
        if path in recorded or not recorded:
            try:
                inputs = recorded.get(path)
                gm, _, note = capture_one(child, inputs)
                if note:
                    out.notes.append(f"'{path}': {note}")
                out.regions.append(Region(path, gm, inputs))
                continue
            except Exception as err:
                out.opaque[path] = _first_line(err)
        _capture_children(child, path, recorded, out)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put every submodule in eval mode for the duration, then restore each one's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def example_inputs_for(model: nn.Module) -> tuple[Any, ...] | None:
    """A guess at one input for a model whose first layer is a conv or linear (None if unsure)."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))), None)
    if first is None:
        return None
    p = next(first.parameters())
    if isinstance(first, nn.Linear):
        return (torch.randn(1, first.in_features, dtype=p.dtype, device=p.device),)
    nd = first.weight.ndim - 2
    size = {1: 224, 2: 224, 3: 32}[nd]
    return (torch.randn(1, first.in_channels, *(size,) * nd, dtype=p.dtype, device=p.device),)
