"""``torch.export`` programs: fuse the ATen-level graph of an ExportedProgram through the same rules.

The program is unlifted (``ep.module()``: parameters and buffers become attributes read by get_attr,
every node keeps its fake-tensor ``meta['val']``), its ATen calls are seen as vocabulary ops
(``aten_ops``), rewritten by the engine, written back as a GraphModule and exported again on inputs
of the program's own (static) shapes, decomposed to core ATen again if the input was. The fused graph
is verified against the original program in float64 (the fused tensors computed, not cast, in float64).
"""
from __future__ import annotations

import copy
import time
from typing import Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_unflatten

from reparam.frontends.aten import recognize as aten_ops
from reparam.frontends import verify as verify_mod
from reparam.frontends.pipeline import gc_paused, mismatch
from reparam.frontends.fx.backend import rewrite_graph_module
from reparam.errors import CaptureError, ReparamError, VerificationError
from reparam.frontends.rulesets import select_rules
from reparam.core.report import Counts, Report, Verification
from reparam.frontends.fx.counting import count_params
from reparam.core.rule import Rule

_CONV = {aten_ops.aten.conv1d.default, aten_ops.aten.conv2d.default, aten_ops.aten.conv3d.default,
         aten_ops.aten.conv1d.padding, aten_ops.aten.conv2d.padding, aten_ops.aten.conv3d.padding,
         aten_ops.aten.convolution.default}
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
    """Give ``fused`` the calling convention (pytree in/out specs) of the unlifted ``source``."""
    codegen = source.graph._codegen
    fused.graph._codegen = copy.deepcopy(codegen)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(source, attr):
            setattr(fused, attr, getattr(source, attr))
    fused.recompile()
    return fused


def _rewrite(ep, rules, check, stop_after, rep: Report):
    gm = _unlifted(ep)
    done = rewrite_graph_module(gm, rules, check, stop_after, rep)
    return _with_signature(done.fused, gm), lambda: _with_signature(done.float64_twin(), gm), done.count


def _verify(ep, fused, twin, flat, n_args, kw, tolerance) -> Verification:
    """``fused`` and its float64 ``twin()`` against ``ep.module()`` run in float64."""
    probe = verify_mod.random_like(tuple(flat), seed=1234)
    err64, want = verify_mod.float64_error(_Call(ep.module(), n_args, kw), _Call(twin(), n_args, kw), probe,
                                           tolerance)
    got = verify_mod.run(_Call(fused, n_args, kw), probe)
    shapes = [list(t.shape) for t in flat if isinstance(t, torch.Tensor)]
    return Verification(input_shapes=shapes, error_fp64=err64, error_native=verify_mod.relative_error(got, want),
                        tolerance=tolerance, passed=err64 <= tolerance)


@gc_paused
def fuse_exported(ep: torch.export.ExportedProgram, *, rules: Sequence[Rule] | None = None,
                  extra_rules: Sequence[Rule] = (), disable: Sequence[str] = (), only: Sequence[str] | None = None,
                  verify: bool = True, check: bool = True, tolerance: float = verify_mod.DEFAULT_TOLERANCE,
                  report: bool = False):
    """Fuse an ExportedProgram's reparameterizable structure; return a new ExportedProgram (and a Report).

    ``ep`` is not modified. Rule selection is as in :func:`reparam.fuse`. With ``verify`` the fused graph is
    compared with ``ep.module()`` in float64 on random inputs of the program's shapes; a mismatch raises
    :class:`VerificationError` naming the first wrong rewrite. The result is re-exported with the same
    input/output structure.
    """
    _check_program(ep)
    started = time.perf_counter()
    rep = Report()
    chosen = select_rules(None if rules is None else list(rules), extra_rules, disable, only)
    args, kwargs = example_inputs(ep)
    kw = list(kwargs)
    flat = list(args) + [kwargs[k] for k in kw]

    t0 = time.perf_counter()
    fused, twin, _ = _rewrite(ep, chosen, check, None, rep)
    rep.seconds["rewrite"] = time.perf_counter() - t0
    if verify:
        t0 = time.perf_counter()
        rep.verification = _verify(ep, fused, twin, flat, len(args), kw, tolerance)
        rep.seconds["verify"] = time.perf_counter() - t0
        if not rep.verification.passed:
            def right_after(k: int) -> bool:
                part, part_twin, _ = _rewrite(ep, chosen, check, k, Report())
                return _verify(ep, part, part_twin, flat, len(args), kw, tolerance).passed

            raise mismatch("program", rep, tolerance, right_after)
    else:
        rep.verification.skipped = "disabled by the caller"

    t0 = time.perf_counter()
    out = _export(fused, args, kwargs, flat, kw, decompose=is_core_aten(ep))
    rep.seconds["export"] = time.perf_counter() - t0
    rep.seconds["total"] = time.perf_counter() - started
    if report:
        rep.before, rep.after = count_program(ep), count_program(out)
        return out, rep
    return out


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
    dtypes = [t.dtype for t in want if t.is_floating_point()]
    eps = max((torch.finfo(d).eps for d in dtypes), default=0.0)
    err = verify_mod.relative_error(got, want)
    if not err <= 64 * eps:
        raise VerificationError(f"the re-exported program differs from the fused graph (relative error {err:.3g})",
                                error=err)
    return out
