"""Drop-in deploy models: the fused model is an instance of the original's class, with its attributes and methods.

A user replaces ``model.fuse()`` / ``switch_to_deploy()`` / timm's ``reparameterize_model``; those keep the class,
so the deploy model must too. Two views of the same model are built (see docs/design.md, "Drop-in deploy models"):

- **boundary regions**: the model's own code runs, and each submodule it may observe is fused in place. The
  root and every container (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``: code indexes and iterates
  them, e.g. ``forward_intermediates``) are kept as they are, unless the container holds only torch.nn layers
  (``nn.Sequential(conv, bn, act)``); every other submodule with parameters that the example input reaches is
  traced and fused whole (else searched inside); a lone torch.nn layer is left as it is. Every public method then computes
  what it did, through fused children.
- **the whole graph**: the model with its fused boundary regions in place, traced as one graph and rewritten
  again, so folds cross those boundaries (a BatchNorm that is a sibling of the conv before it). When it runs
  fewer convs, BatchNorms or Linear products than the boundary regions, it is installed as the instance's
  ``forward`` (:class:`DeployForward`), sharing the fused children's modules it did not change; the other
  methods keep running the fused children. It steps aside (the class's own forward runs) as soon as a submodule is
  replaced or given a hook, since the graph no longer describes the model then.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect

import torch.fx as fx
import torch.nn as nn

from reparam.errors import CaptureError
from reparam.frontends.fx.capture import (Capture, Region, capture_one, first_line, has_hooks, inputs_of_submodules,
                                          trace, writes_in_place)
from reparam.frontends.fx.shapes import attach_shapes

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
GRAPH_NAME = "fused_forward"  # the submodule holding an installed whole graph


def boundary_capture(model: nn.Module, example_inputs: tuple | None) -> Capture:
    """The regions at the module boundaries the model's code can observe: below the root, containers are
    descended into, every other submodule with parameters reached by the example input is traced whole
    (a submodule that does not trace is searched inside)."""
    out = Capture()
    _capture_below(model, "", inputs_of_submodules(model, example_inputs), out)
    return out


def _capture_below(module: nn.Module, prefix: str, recorded: dict[str, tuple], out: Capture) -> None:
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if not any(True for _ in child.parameters()) and not any(True for _ in child.buffers()):
            continue  # nothing to fuse inside
        if recorded and path not in recorded:
            continue  # not reached by the example input: its shapes are unknown, it stays as it was
        if _is_layer(child):
            continue  # one torch.nn layer: nothing to fuse inside it on its own
        if (not isinstance(child, CONTAINERS) or all(_is_layer(c) for c in child.children())) and not has_hooks(child):
            try:
                inputs = recorded.get(path)
                gm, note = _capture_region(child, inputs)
                if note:
                    out.notes.append(f"'{path}': {note}")
                out.regions.append(Region(path, gm, inputs))
                continue
            except Exception as err:
                out.opaque[path] = str(err)[:300] if isinstance(err, CaptureError) else first_line(err)
        _capture_below(child, path, recorded, out)


def _capture_region(child: nn.Module, inputs: tuple | None) -> tuple[fx.GraphModule, str | None]:
    """A boundary region's graph: its symbolic trace (which takes every argument its forward takes), unless that
    graph would be misread (an in-place or index write, ``writes_in_place``): then its capture on the example
    inputs, if its forward takes nothing but those inputs (the recorded graph takes only them); else it raises."""
    gm = trace(child)
    misread = writes_in_place(gm)
    if misread is None:
        attach_shapes(gm, inputs)
        return gm, None
    if inputs is None or not _takes_only(child, inputs):
        raise CaptureError(f"{misread}, which the rules cannot read as traced, and its forward takes more than "
                           f"the inputs it was called with")
    gm, _, note = capture_one(child, inputs)
    return gm, note


def _takes_only(m: nn.Module, inputs: tuple) -> bool:
    """``m.forward`` takes exactly ``len(inputs)`` positional parameters and nothing else."""
    try:
        params = list(inspect.signature(m.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) == len(inputs) and all(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _is_layer(m: nn.Module) -> bool:
    """A torch.nn layer (not a container): torch.fx keeps it as one call."""
    return not isinstance(m, CONTAINERS) and fx.Tracer().is_leaf_module(m, "")


@functools.lru_cache(maxsize=None)
def is_sealed(cls: type) -> bool:
    """Instances of ``cls`` offer nothing to call but ``forward`` (and ``nn.Module``'s own API): then only
    ``forward`` observes the model, and the whole graph can replace its children."""
    if issubclass(cls, (fx.GraphModule, *CONTAINERS)):
        return False
    base = set(dir(nn.Module))
    return all(name.startswith("_") or name in base or not callable(getattr(cls, name, None))
               for name in dir(cls))


class DeployForward:
    """An instance's ``forward``: the fused whole graph (the submodule ``fused_forward``), as long as the
    model still has the structure the graph was built from (the same submodules, none with hooks);
    otherwise the class's own ``forward`` (running the fused children). Pickled without reparam; a model
    that was changed stays on its own forward after a round trip."""

    def __init__(self, owner: nn.Module, watch: bool = True):
        self.owner = owner
        self.watch = watch  # False for a sealed model: the graph is all it has
        self.stale = False
        self._snapshot: list | None = None

    def _structure(self) -> list:
        graph = self.owner._modules.get(GRAPH_NAME)
        out, stack = [], [self.owner]
        while stack:
            parent = stack.pop()
            for name, child in parent._modules.items():
                if child is not graph:
                    out.append((parent, name, child))
                    if child is not None:
                        stack.append(child)
        return out

    def valid(self) -> bool:
        if not self.watch:
            return True
        if self.stale:
            return False
        if GRAPH_NAME not in self.owner._modules:
            self.stale = True
            return False
        if self._snapshot is None:
            self._snapshot = self._structure()
        for parent, name, child in self._snapshot:
            if parent._modules.get(name) is not child or (child is not None and has_hooks(child)):
                self.stale = True
                return False
        return not has_hooks(self.owner._modules[GRAPH_NAME])

    def _target(self):
        return self.owner._modules[GRAPH_NAME].forward if self.valid() else \
            type(self.owner).forward.__get__(self.owner)

    @property
    def __code__(self):  # what torch.export and inspect read of a forward
        return self._target().__code__

    @property
    def __signature__(self):
        return inspect.signature(self._target())

    def __call__(self, *args, **kwargs):
        if self.valid():
            return self.owner._modules[GRAPH_NAME](*args, **kwargs)
        return type(self.owner).forward(self.owner, *args, **kwargs)

    def __reduce__(self):
        """Pickled as torch-only objects, so a saved deploy model loads without reparam (with the model's own
        code, as the original needed): the graph's bound ``forward`` while the graph is in use, else the
        class's ``forward`` bound to the model. A loaded model no longer watches for replaced or hooked
        submodules; ``copy.deepcopy`` keeps the watch (:meth:`__deepcopy__`)."""
        if self.valid():
            return getattr, (self.owner._modules[GRAPH_NAME], "forward")
        return functools.partial, (type(self.owner).forward, self.owner)

    def __deepcopy__(self, memo):
        new = DeployForward(copy.deepcopy(self.owner, memo), self.watch)
        new.stale = self.stale
        return new


def installed_graph(model: nn.Module) -> nn.Module | None:
    """The whole graph ``model``'s forward runs, if one is installed (and still in use), else None."""
    forward = model.__dict__.get("forward")
    graph = model._modules.get(GRAPH_NAME)
    if isinstance(forward, DeployForward) and forward.owner is model and forward.valid():
        return graph
    if graph is not None and getattr(forward, "__self__", None) is graph:  # as loaded from a pickle
        return graph
    return None


def shell(model: nn.Module) -> nn.Module:
    """A new instance of ``model``'s class with a copy of its plain attributes and no submodules or tensors."""
    new = object.__new__(type(model))
    state = {k: v for k, v in vars(model).items() if k not in ("_modules", "_parameters", "_buffers")}
    new.__dict__.update(copy.deepcopy(state))
    new.__dict__.update(_modules={}, _parameters={}, _buffers={})
    return new


def forward_graph(model: nn.Module) -> fx.GraphModule:
    """The graph ``model``'s forward runs: its installed graph, the model itself if it is a GraphModule, else
    its trace (through its fused submodules)."""
    graph = installed_graph(model)
    if graph is not None:
        return graph
    return model if isinstance(model, fx.GraphModule) else trace(model)


def install(model: nn.Module, graph: nn.Module, *, sealed: bool) -> nn.Module:
    """``model`` (an instance of its class) whose ``forward`` runs ``graph``. A sealed model keeps nothing but
    its plain attributes and the graph; otherwise its fused children stay for its other methods."""
    if sealed:
        model._modules.clear()
        model._parameters.clear()
        model._buffers.clear()
        model._non_persistent_buffers_set.clear()
    model.add_module(GRAPH_NAME, graph)
    model.forward = DeployForward(model, watch=not sealed)
    return model


@contextlib.contextmanager
def own_forward(model: nn.Module):
    """For the duration, ``model`` runs its class's forward (through its fused submodules), not the graph."""
    forward = model.__dict__.pop("forward", None)
    try:
        yield model
    finally:
        if forward is not None:
            model.__dict__["forward"] = forward


def uninstalled(model: nn.Module) -> nn.Module:
    """``model`` with its own class forward again (the graph removed), in place."""
    if isinstance(model.__dict__.get("forward"), DeployForward):
        del model.__dict__["forward"]
        del model._modules[GRAPH_NAME]
    return model
