"""Copies of a module's structure: its modules copied, its tensors shared or swapped for others.

``copy.deepcopy`` with the tensors memoized means the same, but walks every attribute generically; modules that
pickle as plain nn.Modules are copied here directly (several times faster on a large model), others by deepcopy.
What a forward writes into the modules (caches, counters, mode flags) lands in the copy, never the original.
A copy that is only run may share its GraphModules' graphs (``share_graphs``)."""
from __future__ import annotations

import collections
import copy
import functools
import types

import torch.fx as fx
import torch.nn as nn

_COPY_PROTOCOL = ("__getstate__", "__setstate__", "__deepcopy__", "__reduce_ex__", "__reduce__")
_ATOMS = (int, float, bool, str, type(None))
_CONTAINERS = (dict, collections.OrderedDict, set)
_METHODS = (types.MethodType, types.FunctionType, functools.partial)


@functools.lru_cache(maxsize=None)
def _plain_state(cls: type) -> bool:
    """Instances copy as their ``__dict__``: no copy or pickle method of their own beyond torch.nn's
    ``__setstate__`` shims, which only fill in attributes missing from old checkpoints."""
    for f in _COPY_PROTOCOL:
        own = getattr(cls, f, None)
        if own is not getattr(nn.Module, f, None) and not (
                f == "__setstate__" and getattr(own, "__module__", "").startswith("torch.nn.modules.")):
            return False
    return True


@functools.lru_cache(maxsize=None)
def _plain_graph_module(cls: type) -> bool:
    """A GraphModule class (torch.fx makes one per instance) with no copy or pickle method of its own beyond
    GraphModule's: its instances are their ``__dict__`` around a graph that running them only reads."""
    return issubclass(cls, fx.GraphModule) and all(
        getattr(cls, f, None) is getattr(fx.GraphModule, f, None) for f in _COPY_PROTOCOL)


def copy_modules(m: nn.Module, memo: dict, share_graphs: bool = False) -> nn.Module:
    """``copy.deepcopy(m, memo)``: the modules copied, each parameter and buffer replaced by ``memo[id(t)]``
    when it is there (else shared). ``share_graphs``: a GraphModule's copy shares its graph (for a copy that is
    only run: deepcopy would copy the graph and compile its code again)."""
    if id(m) in memo:
        return memo[id(m)]
    graph_module = share_graphs and _plain_graph_module(type(m)) and not any(
        isinstance(v, _METHODS) for v in m.__dict__.values())  # no methods of its own (torch.export sets train)
    if not graph_module and not _plain_state(type(m)):
        return copy.deepcopy(m, memo)  # a module with its own copy or pickle behaviour
    new = object.__new__(type(m))
    memo[id(m)] = new
    state = {}
    for k, v in m.__dict__.items():
        if k == "_compiled_call_impl":
            continue
        if graph_module and k == "_graph":
            state[k] = v  # shared: the copy runs the code torch.fx generated for it (on its class)
            continue
        if k == "_modules":
            state[k] = type(v)((name, None if c is None else copy_modules(c, memo, share_graphs)) for name, c in v.items())
        elif k in ("_parameters", "_buffers"):
            state[k] = type(v)((name, None if t is None else memo.get(id(t), t)) for name, t in v.items())
        elif type(v) in _ATOMS or (type(v) in (tuple, frozenset) and all(type(x) in _ATOMS for x in v)):
            state[k] = v
        elif type(v) in _CONTAINERS and all(type(x) in _ATOMS for x in v) and (not v or type(v) is set):
            state[k] = type(v)(v)  # the hook dicts (empty) and the set of non-persistent buffer names
        else:
            state[k] = copy.deepcopy(v, memo)
    new.__dict__.update(state)
    return new


def structure_copy(module: nn.Module, share_graphs: bool = False) -> nn.Module:
    """A copy of ``module`` that shares its parameters and buffers but nothing else: what its forward
    writes into the module (caches, counters) lands in the copy. ``copy.deepcopy`` with the tensors
    memoized, done directly for modules that pickle as plain nn.Modules (several times faster).
    ``share_graphs``: see :func:`copy_modules`."""
    memo = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return copy_modules(module, memo, share_graphs)
