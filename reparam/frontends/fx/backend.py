"""``reparam.fuse``: training-time model in, numerically equivalent single-branch model out."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from reparam.frontends import verify as verify_mod
from reparam.frontends.fx.capture import capture, eval_mode, example_inputs_for, set_submodule
from reparam.core.engine import Engine
from reparam.errors import CaptureError, ReparamError
from reparam.frontends.fx.exporter import export_fx
from reparam.frontends.fx.importer import import_fx
from reparam.frontends.fx.prune import prune_unused
from reparam.frontends.fx.param_fold import materialize
from reparam.frontends.fx.import_check import misread_nodes
from reparam.frontends.pipeline import gc_paused, mismatch
from reparam.core.ir import Graph
from reparam.frontends.rulesets import select_rules
from reparam.core.report import Report, Verification
from reparam.frontends.fx.counting import count_run
from reparam.core.rule import Rule


def _as_tuple(example_inputs) -> tuple | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _shapes(inputs: tuple) -> list[list[int]]:
    leaves, _ = tree_flatten(inputs)
    return [list(t.shape) for t in leaves if isinstance(t, torch.Tensor)]


def _rewrite(model: nn.Module, inputs, rules, check, stop_after, report: Report):
    """Capture ``model`` (in eval mode for the while), rewrite every region, write the regions back into
    a copy. The model itself is left as it was.

    Returns the deploy model and a function building its twin whose new tensors are float64 (for exact
    verification; built only when it is needed)."""
    with eval_mode(model):
        return _rewrite_eval(model, inputs, rules, check, stop_after, report)


def _rewrite_eval(work: nn.Module, inputs, rules, check, stop_after, report: Report):
    cap = capture(work, inputs)
    if inputs is not None and cap.regions and cap.regions[0].path == "" and not cap.shaped:
        try:
            verify_mod.run(work, inputs)
        except Exception as err:
            raise CaptureError(f"the model does not run on inputs of shape {_shapes(inputs)}: "
                               f"{type(err).__name__}: {err}") from err
    report.opaque.update(cap.opaque)
    report.notes.extend(cap.notes)
    if cap.opaque.get("") and cap.regions:
        report.notes.append(f"the model's forward could not be traced as a whole ({cap.opaque['']}); "
                            f"{len(cap.regions)} traceable submodule(s) were fused separately")
    rewritten: list[tuple[str, Rewritten]] = []
    budget = stop_after
    for region in cap.regions:
        done = rewrite_graph_module(region.gm, rules, check, budget, report, region.path)
        if not region.path:
            return done.fused, done.float64_twin
        rewritten.append((region.path, done))
        if budget is not None:
            budget = max(budget - done.count, 0)
    result, kept = _assemble(work, rewritten, inputs, report)

    def twin() -> nn.Module:
        out = copy.deepcopy(result)
        for path, done in kept:
            region64 = done.float64_twin()
            carry_attributes(out.get_submodule(path), region64)
            set_submodule(out, path, region64)
        return out

    return result, twin


def _assemble(work: nn.Module, rewritten: list, inputs, report: Report):
    """A copy of ``work`` with its fused regions in place (each keeping the plain attributes of the module
    it replaces, which the surrounding code may read). A region the rest of the model cannot run with
    (it uses something a graph does not have, e.g. a method) is put back as it was, and the report says
    so. Returns the model and the regions kept."""
    result = copy.deepcopy(work)  # never the input itself
    originals = {path: result.get_submodule(path) for path, _ in rewritten}
    for path, done in rewritten:
        carry_attributes(originals[path], done.fused)
        set_submodule(result, path, done.fused)
    if inputs is None or _runs(result, inputs):
        return result, rewritten
    kept = []
    for path, done in rewritten:  # one region at a time, on top of those that worked
        set_submodule(result, path, originals[path])
    for path, done in rewritten:
        set_submodule(result, path, done.fused)
        if _runs(result, inputs):
            kept.append((path, done))
        else:
            set_submodule(result, path, originals[path])
            report.notes.append(f"'{path}': kept as it was; the model around it does not run with its fused "
                                f"graph in place (it uses more of the module than its forward)")
    return result, kept


def _runs(model: nn.Module, inputs) -> bool:
    try:
        verify_mod.run(model, inputs)
        return True
    except Exception:
        return False


def carry_attributes(original: nn.Module, fused: nn.Module) -> None:
    """Give ``fused`` the public plain attributes of ``original`` it lacks (configuration values such as a
    window size that the code around a region may read), kept across copies of the GraphModule."""
    kept = fused.meta.setdefault("_user_preserved_attributes", {})  # what GraphModule.__deepcopy__ restores
    for name, value in vars(original).items():
        if not name.startswith("_") and name != "training" and not hasattr(fused, name):
            setattr(fused, name, value)
            kept[name] = value


@dataclass
class Rewritten:
    """A rewritten graph: the deploy GraphModule and the number of rewrites applied."""

    graph: Graph
    source: fx.GraphModule
    fused: fx.GraphModule
    count: int

    def float64_twin(self) -> fx.GraphModule:
        """The same graph with every new tensor in float64, as computed (not cast), for exact verification."""
        return export_fx(self.graph, self.source, torch.float64)


def rewrite_graph_module(gm: fx.GraphModule, rules, check, stop_after, report: Report, path: str = "") -> Rewritten:
    """Import ``gm`` (shapes attached), rewrite it to a fixpoint, export it back; log into ``report``."""
    graph, notes = import_fx(gm)
    prune_unused(graph)
    materialize(graph)
    report.notes.extend(f"{path + ': ' if path else ''}{n}" for n in notes)
    engine = Engine(rules, check=check, stop_after=stop_after)
    log = engine.run(graph, wait=False)
    try:
        fused = export_fx(graph, gm, copy_modules=True)  # while the last local checks finish
    finally:
        engine.wait()
    prefix = f"{path}." if path else ""
    report.rules_fired += [dict(rule=e.rule, where=prefix + e.where, detail=e.detail) for e in log.fired_events()]
    report.refusals += [dict(rule=e.rule, where=prefix + e.where, detail=e.detail) for e in log.refusals()]
    return Rewritten(graph, gm, fused, engine.count)


@gc_paused
def fuse(model: nn.Module, example_inputs=None, *, rules: Sequence[Rule] | None = None,
         extra_rules: Sequence[Rule] = (), disable: Sequence[str] = (), only: Sequence[str] | None = None,
         verify: bool = True, check: bool = True, tolerance: float = verify_mod.DEFAULT_TOLERANCE,
         report: bool = False, progress: Callable[[str], None] | None = None, _stop_after: int | None = None):
    """Fuse ``model``'s reparameterizable structure; return the deploy module (and a Report if asked).

    The input model is never modified: fusion runs on an eval-mode copy. ``example_inputs`` (a tensor or a
    tuple) fixes the shapes used for capture and verification; without it one input is guessed from the
    first conv/linear layer. ``rules`` replaces the built-in rule list, ``extra_rules`` are tried before it,
    ``disable``/``only`` pick rules by name. With ``verify`` the result is compared end to end with the
    original in float64 and a mismatch raises :class:`VerificationError` naming the rewrite responsible.
    ``progress``, if given, is called with the name of each long step as it starts ('rewrite', 'verify').
    """
    if not isinstance(model, nn.Module):
        raise ReparamError(f"fuse() needs a torch.nn.Module, got {type(model).__name__}")
    started = time.perf_counter()
    rep = Report()
    chosen = select_rules(None if rules is None else list(rules), extra_rules, disable, only)
    training = [name or "the model" for name, m in model.named_modules() if m.training]
    if training:
        who = "the model was" if model.training else \
            f"submodule(s) {', '.join(training[:3])}{' …' if len(training) > 3 else ''} were"
        rep.notes.append(f"{who} in training mode; it was fused in eval mode (BatchNorm uses running "
                         "statistics, dropout is off)")
    inputs = _as_tuple(example_inputs)
    if inputs is None:
        inputs = example_inputs_for(model)
        if inputs is not None:
            rep.notes.append(f"no example inputs given; guessed one of shape {_shapes(inputs)}")
    t0 = time.perf_counter()
    if progress is not None:
        progress("rewrite")
    fused, twin = _rewrite(model, inputs, chosen, check, _stop_after, rep)
    rep.seconds["rewrite"] = time.perf_counter() - t0
    if verify and inputs is not None and _stop_after is None:
        t0 = time.perf_counter()
        if progress is not None:
            progress("verify")
        rep.verification = _verify(model, fused, twin(), inputs, tolerance)
        rep.seconds["verify"] = time.perf_counter() - t0
        if not rep.verification.passed:
            def right_after(k: int) -> bool:
                partial, partial_twin = _rewrite(model, inputs, chosen, check, k, Report())
                return _verify(model, partial, partial_twin(), inputs, tolerance).passed

            raise mismatch("model", rep, tolerance, right_after, lambda: _misread(model, inputs))
    elif not verify:
        rep.verification.skipped = "disabled by the caller"
    elif inputs is None:
        rep.verification.skipped = "no example inputs (pass example_inputs to verify)"
    rep.seconds["total"] = time.perf_counter() - started
    if report:
        rep.before, rep.after = count_run(model, inputs), count_run(fused, inputs)
        return fused, rep
    return fused


def _verify(original: nn.Module, fused: nn.Module, fused64: nn.Module, inputs: tuple,
            tolerance: float) -> Verification:
    """Both models in float64 (the fused one with its new weights computed, not cast, in float64)."""
    probe = verify_mod.random_like(inputs, seed=1234)
    err64, want = verify_mod.float64_error(original, fused64, probe, tolerance)
    got = verify_mod.run(fused, probe)
    return Verification(input_shapes=_shapes(inputs), error_fp64=err64,
                        error_native=verify_mod.relative_error(got, want), tolerance=tolerance,
                        passed=err64 <= tolerance)


def _misread(model: nn.Module, inputs) -> list[str]:
    """The operations of ``model`` that the capture reads wrongly (see import_check)."""
    with eval_mode(model):
        cap = capture(model, inputs)
    return [f"{r.path}.{name}" if r.path else name for r in cap.regions for name in misread_nodes(r.gm)]
