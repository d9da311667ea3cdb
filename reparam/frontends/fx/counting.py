"""Counting what a PyTorch model computes.

``count_run`` counts what runs: the ATen calls the model makes on its example inputs (below autograd, so
every form of a layer, module or functional or traced or exported, counts the same), with views left out.
A conv is ``aten.convolution``, a BatchNorm any batch-norm kernel, a Linear a matrix product whose operand is
one of the model's own tensors. ``count_model`` counts calls in the model's FX graph (recursing into fused
regions), else its modules, without running it.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from reparam.core.report import Counts
from reparam.frontends.fx.capture import eval_mode, has_hooks, trace
from reparam.frontends.fx.dropin import installed_graph
from reparam.frontends.module_copy import structure_copy

_ATEN_CONVS = {"convolution", "_convolution", "mkldnn_convolution", "conv_depthwise2d", "slow_conv2d_forward"}
_ATEN_MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul"}
_FREE = {"detach", "lift_fresh", "_to_copy", "empty", "empty_like", "zeros", "ones", "full", "scalar_tensor"}


class _AtenCounter(TorchDispatchMode):
    """Counts the ATen calls made while active (views and allocations left out)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps a mode's __torch_dispatch__ in torch._dynamo.disable unless this says False; that wrapper
        # imports torch._dynamo (about 2 s) at the first call, for a guard against compiling inside the mode,
        # which never happens here: counting runs eagerly
        return False

    def __init__(self, own: set[int]):
        super().__init__()
        self.own = own
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        is_view = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
        if not is_view and name not in _FREE:
            self.counts["ops"] += 1
            if name in _ATEN_CONVS:
                self.counts["convs"] += 1
            elif "batch_norm" in name:
                self.counts["bns"] += 1
            elif name in _ATEN_MATMULS and any(isinstance(a, torch.Tensor) and _storage(a) in self.own
                                               for a in args):
                self.counts["linears"] += 1
        return func(*args, **(kwargs or {}))


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except Exception:  # noqa: BLE001 - a tensor without storage (fake, sparse)
        return -1


def count_run(model: nn.Module, inputs: tuple | None) -> Counts:
    """What ``model`` executes on ``inputs`` (in eval mode, on a structure copy: the model is left as it was),
    counted at ATen level; the FX-graph count when there are no inputs or the model does not run."""
    if inputs is None:
        return count_model(model)
    work = structure_copy(model, share_graphs=True)  # only run
    own = {_storage(t) for t in [*work.parameters(), *work.buffers()]} - {-1, 0}
    counter = _AtenCounter(own)
    try:
        with eval_mode(work), torch.no_grad(), counter:
            work(*inputs)
    except Exception:  # noqa: BLE001 - a model that does not run here is counted from its graph
        return count_model(model)
    c = counter.counts
    runs = installed_graph(model)  # a drop-in model's parameters in use: those of the graph its forward runs
    return Counts(c["ops"], c["convs"], c["bns"], c["linears"], count_params(model if runs is None else runs))


_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_FUNCS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d, F.conv_transpose1d,
               F.conv_transpose2d, F.conv_transpose3d}
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

