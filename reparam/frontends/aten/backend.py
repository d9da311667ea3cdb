"""``torch.export`` programs: fuse the ATen-level graph of an ExportedProgram through the same rules.

The program is unlifted (``ep.module()``: parameters and buffers become attributes read by get_attr,
every node keeps its fake-tensor ``meta['val']``), its ATen calls are seen as vocabulary ops
(``aten_ops``), rewritten by the engine, written back as a GraphModule and exported again on inputs
of the program's own (static) shapes, decomposed to core ATen again if the input was. The fused graph
is verified against the original program in float64 (the fused tensors computed, not cast, in float64).
This module is the torch.export adapter of the one fuse driver (:mod:`reparam.frontends.pipeline`).
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_unflatten

from reparam.core.report import Counts, Report
from reparam.core.rule import Rule
from reparam.errors import CaptureError, ReparamError, VerificationError
from reparam.frontends import verify as verify_mod
from reparam.frontends.aten import recognize as aten_ops
from reparam.frontends.base import Outputs, Region
from reparam.frontends.fx.backend import PROBE_SEED, export_region, fx_opaque_kind, import_graph_module
from reparam.frontends.fx.counting import count_params
from reparam.frontends.pipeline import Options, fuse_with
from reparam.frontends.rulesets import select_rules

_CONV = {aten_ops.aten.conv1d.default, aten_ops.aten.conv2d.default, aten_ops.aten.conv3d.default,
         aten_ops.aten.conv1d.padding, aten_ops.aten.conv2d.padding, aten_ops.aten.conv3d.padding,
         aten_ops.aten.convolution.default, aten_ops.aten.conv_transpose1d.default,
         aten_ops.aten.conv_transpose2d.input, aten_ops.aten.conv_transpose3d.input}
_BN = {aten_ops.aten.batch_norm.default, aten_ops.aten._native_batch_norm_legit_no_training.default,
       aten_ops.aten.native_batch_norm.default, aten_ops.aten._native_batch_norm_legit.default}
_LINEAR = {aten_ops.aten.linear.default, aten_ops.aten.addmm.default}


def count_program(ep_or_gm) -> Counts:
    """Counts of an exported program's ATen graph (ops are call_function nodes other than getitem)."""
    gm = ep_or_gm.graph_module if isinstance(ep_or_gm, torch.export.ExportedProgram) else ep_or_gm
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and aten_ops.is_aten(n.target)]
    params = ep_or_gm.state_dict if isinstance(ep_or_gm, torch.export.ExportedProgram) else None
    nparams = (sum(p.numel() for k, p in params.items() if k in set(ep_or_gm.graph_signature.parameters))
               if params is not None else count_params(gm))
    return Counts(len(calls), sum(n.target in _CONV for n in calls), sum(n.target in _BN for n in calls),
                  sum(n.target in _LINEAR for n in calls), nparams)


class _Call(nn.Module):
    """Calls ``model(*args, **kwargs)`` from flat positional tensors (so verify.run can cast and call it)."""

    def __init__(self, model: nn.Module, n_args: int, kw: list[str]):
        super().__init__()
        self.model, self.n_args, self.kw = model, n_args, kw

    def forward(self, *flat):
        return self.model(*flat[:self.n_args], **dict(zip(self.kw, flat[self.n_args:])))


def example_inputs(ep: torch.export.ExportedProgram) -> tuple[tuple, dict]:
    """Random (args, kwargs) with the shapes and dtypes of the program's user inputs (static shapes only)."""
    user = set(ep.graph_signature.user_inputs)
    vals = [n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder" and n.name in user]
    leaves = []
    for v in vals:
        if not isinstance(v, torch.Tensor):
            leaves.append(v)
            continue
        if not all(isinstance(s, int) for s in v.shape):
            raise CaptureError("the program has dynamic shapes; fusion needs static input shapes "
                               "(export it with concrete shapes)")
        leaves.append(torch.zeros(tuple(v.shape), dtype=v.dtype, device=v.device))
    args, kwargs = tree_unflatten(leaves, ep.call_spec.in_spec)
    return tuple(args), dict(kwargs)


def _check_program(ep) -> None:
    if not isinstance(ep, torch.export.ExportedProgram):
        raise ReparamError(f"fuse_exported() needs a torch.export.ExportedProgram, got {type(ep).__name__}")
    sig = ep.graph_signature
    mutating = [n for n in ep.graph.nodes if n.op == "call_function" and aten_ops.is_aten(n.target)
                and (n.target._schema.is_mutable or _updates_statistics(n))]
    if sig.buffers_to_mutate or sig.user_inputs_to_mutate or mutating:
        what = f" ('{mutating[0].name}': {mutating[0].target})" if mutating else ""
        raise CaptureError(f"the program mutates its buffers or inputs{what}, as a model exported in training "
                           f"mode does; export the model in eval mode")


def _updates_statistics(n: fx.Node) -> bool:
    """A batch norm in training mode (it updates its running statistics)."""
    if n.target not in (aten_ops.aten.batch_norm.default, aten_ops.aten.native_batch_norm.default):
        return False
    return aten_ops.arguments(n.target, n.args, n.kwargs).get("training") is not False


def _unlifted(ep) -> fx.GraphModule:
    gm = ep.module()
    aten_ops.normalize(gm)
    return gm


def _with_signature(fused: fx.GraphModule, source: fx.GraphModule) -> fx.GraphModule:
    """``fused`` with the calling convention (pytree input/output specs) of the unlifted ``source``: its graph
    is copied into a copy of ``source``'s graph emptied of nodes (a graph's copy keeps its code generator), and
    the new GraphModule takes its specs from that generator when it compiles."""
    graph = copy.deepcopy(source.graph)
    for node in reversed(list(graph.nodes)):
        graph.erase_node(node)
    graph.output(graph.graph_copy(fused.graph, {}))
    return fx.GraphModule(fused, graph)


class AtenFrontEnd:
    """An ExportedProgram fused on its unlifted ATen graph (see :func:`fuse_exported`)."""

    subject = "program"
    finish_phase = "export"

    def __init__(self, ep: torch.export.ExportedProgram):
        _check_program(ep)
        self.ep = ep
        self.args, kwargs = example_inputs(ep)
        self.kwargs = kwargs
        self.kw = list(kwargs)
        self.flat = list(self.args) + [kwargs[k] for k in self.kw]
        self.probe = verify_mod.random_like(tuple(self.flat), seed=PROBE_SEED)

    def _call(self, model: nn.Module) -> nn.Module:
        return _Call(model, len(self.args), self.kw)

    def prepare(self, report: Report) -> None:
        pass

    def import_graphs(self, report: Report) -> list[Region]:
        return [import_graph_module(_unlifted(self.ep), report)]

    def export(self, region: Region) -> fx.GraphModule:
        return _with_signature(export_region(region), region.source)

    def assemble(self, regions: list[Region], report: Report) -> fx.GraphModule:
        return regions[0].fused

    def opaque_kind(self, node) -> str:
        return fx_opaque_kind(node)

    def cannot_verify(self) -> str | None:
        return None

    def input_shapes(self) -> list[list[int]]:
        return [list(t.shape) for t in self.flat if isinstance(t, torch.Tensor)]

    def reference(self, regions: list[Region]) -> Outputs:
        original = self._call(self.ep.module())
        return Outputs(exact=verify_mod.outputs_float64(original, self.probe),
                       native=verify_mod.run(original, self.probe))

    def _twin(self, regions: list[Region]) -> nn.Module:
        return self._call(_with_signature(export_region(regions[0], torch.float64), regions[0].source))

    def exact(self, fused: fx.GraphModule, regions: list[Region]) -> list:
        return verify_mod.outputs_float64(self._twin(regions), self.probe)

    def recheck(self, fused: fx.GraphModule, regions: list[Region]) -> tuple[list, list]:
        return (verify_mod.run(self._call(self.ep.module()), self.probe, torch.float64),
                verify_mod.run(self._twin(regions), self.probe, torch.float64))

    def native(self, fused: fx.GraphModule) -> list:
        return verify_mod.run(self._call(fused), self.probe)

    def misread(self) -> list[str]:
        return []

    def finish(self, fused: fx.GraphModule, report: Report) -> torch.export.ExportedProgram:
        return _export(fused, self.args, self.kwargs, self.flat, self.kw, decompose=is_core_aten(self.ep))

    def count(self, artifact, original: bool) -> Counts:
        return count_program(self.ep if original else artifact)


def fuse_exported(ep: torch.export.ExportedProgram, *, rules: Sequence[Rule] | None = None,
                  extra_rules: Sequence[Rule] = (), disable: Sequence[str] = (), only: Sequence[str] | None = None,
                  verify: bool = True, check: bool = True, tolerance: float = verify_mod.DEFAULT_TOLERANCE,
                  report: bool = False, progress: Callable[..., None] | None = None):
    """Fuse an ExportedProgram's reparameterizable structure; return a new ExportedProgram (and a Report).

    ``ep`` is not modified. Rule selection is as in :func:`reparam.fuse`. With ``verify`` the fused graph is
    compared with ``ep.module()`` on random inputs of the program's shapes (in float64 at ``tolerance``, and as
    deployed at its dtype's precision); a mismatch raises :class:`VerificationError` naming the first wrong
    rewrite. The result is re-exported with the same input/output structure. ``progress`` as in
    :func:`reparam.fuse` (phases 'rewrite', 'verify', 'bisect', 'export').
    """
    front = AtenFrontEnd(ep)
    chosen = select_rules(None if rules is None else list(rules), extra_rules, disable, only)
    return fuse_with(front, Options(chosen, check=check, verify=verify, tolerance=tolerance, report=report,
                                    progress=progress))


def is_core_aten(ep: torch.export.ExportedProgram) -> bool:
    """Every ATen call of the program is a core ATen op (the program was decomposed)."""
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function" and aten_ops.is_aten(n.target)]
    return bool(targets) and all(torch.Tag.core in t.tags for t in targets)


def _export(fused: fx.GraphModule, args: tuple, kwargs: dict, flat: list, kw: list[str], decompose: bool):
    """Export ``fused`` again (decomposed to core ATen if ``decompose``, like the input) and check the
    program computes what the graph does (same ops, same dtype)."""
    try:
        with torch.no_grad():
            out = torch.export.export(fused, args, kwargs)
            if decompose:
                out = out.run_decompositions()
    except Exception as err:
        raise ReparamError(f"the fused graph could not be exported again: {type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}") from err
    probe = verify_mod.random_like(tuple(flat), seed=4321)
    n_args = len(args)
    got = verify_mod.run(_Call(out.module(), n_args, kw), probe)
    want = verify_mod.run(_Call(fused, n_args, kw), probe)
    err = verify_mod.relative_error(got, want)
    if not err <= verify_mod.native_tolerance(0.0, [t.dtype for t in want]):
        raise VerificationError(f"the re-exported program differs from the fused graph (relative error {err:.3g})",
                                error=err)
    return out
