"""``reparam.fuse``: training-time model in, numerically equivalent single-branch model out."""
from __future__ import annotations

import copy
import time
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from . import verify as verify_mod
from .capture import capture, example_inputs_for, set_submodule
from .engine import Engine
from .errors import CaptureError, ReparamError, VerificationError
from .fx_export import export_fx
from .fx_import import import_fx
from .registry import select_rules
from .report import Report, Verification, count_model
from .rule import Rule


def _as_tuple(example_inputs) -> tuple | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _shapes(inputs: tuple) -> list[list[int]]:
    leaves, _ = tree_flatten(inputs)
    return [list(t.shape) for t in leaves if isinstance(t, torch.Tensor)]


def _rewrite(work: nn.Module, inputs, rules, check, stop_after, report: Report):
    """Capture ``work`` (an eval copy), rewrite every region, write the regions back.

    Returns the deploy model and a twin whose new tensors are float64 (for exact verification)."""
    cap = capture(work, inputs)
    if inputs is not None and cap.regions and cap.regions[0].path == "" and not cap.shaped:
        try:
            verify_mod.run(work, inputs)
        except Exception as err:
            raise CaptureError(f"the model does not run on inputs of shape {_shapes(inputs)}: "
                               f"{type(err).__name__}: {err}") from err
    report.opaque.update({p: why for p, why in cap.opaque.items() if p or not cap.regions})
    if cap.opaque.get("") and cap.regions:
        report.notes.append(f"the model's forward could not be traced as a whole ({cap.opaque['']}); "
                            f"{len(cap.regions)} traceable submodule(s) were fused separately")
    result = work
    twin = copy.deepcopy(work) if any(r.path for r in cap.regions) else work
    budget = stop_after
    for region in cap.regions:
        graph, notes = import_fx(region.gm)
        report.notes.extend(f"{region.path + ': ' if region.path else ''}{n}" for n in notes)
        engine = Engine(rules, check=check, stop_after=budget)
        log = engine.run(graph)
        prefix = f"{region.path}." if region.path else ""
        report.rules_fired += [dict(rule=e.rule, where=prefix + e.where, detail=e.detail) for e in log.fired_events()]
        report.refusals += [dict(rule=e.rule, where=prefix + e.where, detail=e.detail) for e in log.refusals()]
        fused = export_fx(graph, region.gm)
        fused64 = export_fx(graph, region.gm, torch.float64)
        if region.path:
            set_submodule(result, region.path, fused)
            set_submodule(twin, region.path, fused64)
        else:
            result, twin = fused, fused64
        if budget is not None:
            budget -= engine.count
            if budget <= 0:
                budget = 0
    return result, twin


def fuse(model: nn.Module, example_inputs=None, *, rules: Sequence[Rule] | None = None,
         extra_rules: Sequence[Rule] = (), disable: Sequence[str] = (), only: Sequence[str] | None = None,
         verify: bool = True, check: bool = True, tolerance: float = verify_mod.DEFAULT_TOLERANCE,
         report: bool = False, _stop_after: int | None = None):
    """Fuse ``model``'s reparameterizable structure; return the deploy module (and a Report if asked).

    The input model is never modified: fusion runs on an eval-mode copy. ``example_inputs`` (a tensor or a
    tuple) fixes the shapes used for capture and verification; without it one input is guessed from the
    first conv/linear layer. ``rules`` replaces the built-in rule list, ``extra_rules`` are tried before it,
    ``disable``/``only`` pick rules by name. With ``verify`` the result is compared end to end with the
    original in float64 and a mismatch raises :class:`VerificationError` naming the rewrite responsible.
    """
    if not isinstance(model, nn.Module):
        raise ReparamError(f"fuse() needs a torch.nn.Module, got {type(model).__name__}")
    started = time.perf_counter()
    rep = Report()
    chosen = select_rules(None if rules is None else list(rules), extra_rules, disable, only)
    work = copy.deepcopy(model)
    if model.training:
        rep.notes.append("the model was in training mode; it was fused in eval mode (BatchNorm uses running "
                         "statistics, dropout is off)")
    work.eval()
    inputs = _as_tuple(example_inputs)
    if inputs is None:
        inputs = example_inputs_for(work)
        if inputs is not None:
            rep.notes.append(f"no example inputs given; guessed one of shape {_shapes(inputs)}")
    t0 = time.perf_counter()
    fused, fused64 = _rewrite(work, inputs, chosen, check, _stop_after, rep)
    rep.seconds["rewrite"] = time.perf_counter() - t0
    if verify and inputs is not None and _stop_after is None:
        t0 = time.perf_counter()
        rep.verification = _verify(model, fused, fused64, inputs, tolerance)
        rep.seconds["verify"] = time.perf_counter() - t0
        if not rep.verification.passed:
            culprit = _find_culprit(model, inputs, chosen, check, tolerance, len(rep.rules_fired), rep)
            raise VerificationError(
                f"the fused model differs from the original (relative error {rep.verification.error_fp64:.3g} "
                f"in float64 > {tolerance:g}); first wrong rewrite: {culprit}. Disable that rule and report it.",
                rewrite=culprit, error=rep.verification.error_fp64)
    elif not verify:
        rep.verification.skipped = "disabled by the caller"
    elif inputs is None:
        rep.verification.skipped = "no example inputs (pass example_inputs to verify)"
    rep.seconds["total"] = time.perf_counter() - started
    if report:
        rep.before, rep.after = count_model(model), count_model(fused)
        return fused, rep
    return fused


def _verify(original: nn.Module, fused: nn.Module, fused64: nn.Module, inputs: tuple,
            tolerance: float) -> Verification:
    """Both models in float64 (the fused one with its new weights computed, not cast, in float64)."""
    probe = verify_mod.random_like(inputs, seed=1234)
    want = verify_mod.run(original, probe, torch.float64)
    got64 = verify_mod.run(fused64, probe, torch.float64)
    got = verify_mod.run(fused, probe)
    err64 = verify_mod.relative_error(got64, want)
    return Verification(input_shapes=_shapes(inputs), error_fp64=err64,
                        error_native=verify_mod.relative_error(got, want), tolerance=tolerance,
                        passed=err64 <= tolerance)


def _find_culprit(model, inputs, rules, check, tolerance, total: int, rep: Report) -> str:
    """Bisect the rewrite sequence for the first rewrite after which the model stops matching."""
    lo, hi = 0, total  # the model is right after lo rewrites, wrong after hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        work = copy.deepcopy(model).eval()
        partial, partial64 = _rewrite(work, inputs, rules, check, mid, Report())
        ok = _verify(model, partial, partial64, inputs, tolerance).passed
        lo, hi = (mid, hi) if ok else (lo, mid)
    event = rep.rules_fired[hi - 1] if 0 < hi <= len(rep.rules_fired) else None
    return f"rule '{event['rule']}' at '{event['where']}'" if event else "none (the capture itself differs)"
