"""Counting what a PyTorch model computes: calls in its FX graph (recursing into fused regions), else its modules."""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from reparam.core.report import Counts
from reparam.frontends.fx.capture import has_hooks, trace
from reparam.frontends.fx.dropin import installed_graph

_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_FUNCS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
_BN_FUNCS = {F.batch_norm, torch.batch_norm}
_LINEAR_FUNCS = {F.linear}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def count_model(model: nn.Module) -> Counts:
    """Count calls in the model's FX graph (recursing into fused sub-graphs; for a drop-in model with an
    installed graph, that graph and its parameters); modules when untraceable."""
    installed = installed_graph(model)
    if installed is not None:  # a drop-in model whose forward runs one graph: count that graph
        model = installed
    try:
        gm = model if isinstance(model, fx.GraphModule) else trace(model)
    except Exception:
        mods = list(model.modules())
        return Counts(None, sum(isinstance(m, _CONV_MODULES) for m in mods),
                      sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in mods),
                      sum(isinstance(m, nn.Linear) for m in mods), count_params(model))
    c = Counter()
    modules = dict(gm.named_modules())
    for n in gm.graph.nodes:
        if n.op not in ("call_module", "call_function", "call_method"):
            continue
        inner_graph = n.op == "call_module" and (isinstance(modules[n.target], fx.GraphModule) or (
            has_hooks(modules[n.target]) and any(True for _ in modules[n.target].children())))
        if inner_graph:  # a fused region, or a hooked block kept as one call: count what it calls
            inner = count_model(modules[n.target])
            for k in ("ops", "convs", "bns", "linears"):
                c[k] += getattr(inner, k) or 0
            continue
        c["ops"] += 1
        m = modules.get(n.target) if n.op == "call_module" else None
        if isinstance(m, _CONV_MODULES) or (n.op == "call_function" and n.target in _CONV_FUNCS):
            c["convs"] += 1
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) or (n.op == "call_function" and n.target in _BN_FUNCS):
            c["bns"] += 1
        elif isinstance(m, nn.Linear) or (n.op == "call_function" and n.target in _LINEAR_FUNCS):
            c["linears"] += 1
    return Counts(c["ops"], c["convs"], c["bns"], c["linears"], count_params(model))


def count_run(model: nn.Module, inputs: tuple) -> Counter:
    """The convolutions and batch norms ``model`` runs on ``inputs`` (ATen calls seen by a dispatch mode,
    so a module called twice counts twice and functional calls count too): {'convs', 'bns', 'matmuls'}
    (matrix products: Linear layers and attention's)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = Counter(convs=0, bns=0, matmuls=0)

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if "convolution" in name and "backward" not in name:
                seen["convs"] += 1
            elif "batch_norm" in name and "backward" not in name and "stats" not in name:
                seen["bns"] += 1
            elif name in ("addmm", "mm", "bmm", "linear", "baddbmm"):
                seen["matmuls"] += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Counting():
        model(*inputs)
    return seen
