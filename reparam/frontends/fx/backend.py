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
from reparam.frontends.fx.import_check import misread_nodes
from reparam.frontends.pipeline import gc_paused, mismatch
from reparam.core.ir import Graph
from reparam.frontends.rulesets import select_rules
from reparam.core.report import Report, Verification
from reparam.frontends.fx import dropin
from reparam.frontends.fx.counting import count_model, count_run
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


def _rewrite(model: nn.Module, inputs, rules, check, stop_after, report: Report, form: str = "auto"):
    """Capture ``model`` (in eval mode for the while), rewrite it, and build the deploy model from a copy.
    The model itself is left as it was.

    Returns the deploy model, a function building its twin whose new tensors are float64 (for exact
    verification; built only when it is needed), and the form chosen (see :func:`_deploy_forms`)."""
    with eval_mode(model):
        return _rewrite_eval(model, inputs, rules, check, stop_after, report, form)


def _rewrite_eval(work: nn.Module, inputs, rules, check, stop_after, report: Report, form: str):
    cap = capture(work, inputs)
    if inputs is not None and cap.regions and cap.regions[0].path == "" and not cap.shaped:
        try:
            verify_mod.run(work, inputs)
        except Exception as err:
            raise CaptureError(f"the model does not run on inputs of shape {_shapes(inputs)}: "
                               f"{type(err).__name__}: {err}") from err
    report.opaque.update(cap.opaque)
    if cap.regions and cap.regions[0].path == "":
        whole = rewrite_graph_module(cap.regions[0].gm, rules, check, stop_after, report)
        return _deploy_forms(work, whole, inputs, rules, check, stop_after, report, form)
    if cap.opaque.get("") and cap.regions:
        report.notes.append(f"the model's forward could not be traced as a whole ({cap.opaque['']}); "
                            f"{len(cap.regions)} traceable submodule(s) were fused separately")
    result, twin = _fuse_regions(work, cap, inputs, rules, check, stop_after, report)
    return result, twin, "regions"


def _fuse_regions(work: nn.Module, cap, inputs, rules, check, stop_after, report: Report):
    """Rewrite each region of ``cap`` and put them in place in a copy of ``work`` (see :func:`_assemble`);
    ``stop_after`` counts the rewrites of all regions together, in order."""
    rewritten: list[tuple[str, Rewritten]] = []
    budget = stop_after
    for region in cap.regions:
        done = rewrite_graph_module(region.gm, rules, check, budget, report, region.path)
        rewritten.append((region.path, done))
        if budget is not None:
            budget = max(budget - done.count, 0)
    result, kept = _assemble(work, rewritten, inputs, report)

    def twin() -> nn.Module:
        out = dropin.uninstalled(copy.deepcopy(result))  # the regions' own forward (a graph is put on later)
        for path, done in kept:
            region64 = done.float64_twin()
            carry_attributes(out.get_submodule(path), region64)
            set_submodule(out, path, region64)
        return out

    return result, twin


def _deploy_forms(work: nn.Module, whole: "Rewritten", inputs, rules, check, stop_after, report: Report,
                  form: str):
    """The deploy model of a model traced whole (docs/design.md, "Drop-in deploy models"), in one form:

    - 'graph': the fused GraphModule itself (for a torch.nn container or GraphModule given as the model,
      which have no methods of their own to keep);
    - 'sealed': an instance of the model's class holding only its plain attributes and the graph, installed
      as its forward (a class with no public method but forward);
    - 'regions': an instance of the model's class, each submodule its code can observe fused in place;
    - 'installed': 'regions' with the whole graph installed as its forward, when the graph runs fewer convs
      or BatchNorms on the example input than the regions do.
    'auto' picks the form; the others rebuild a given one (bisection)."""
    if form == "auto":
        if type(work) in dropin.CONTAINERS or isinstance(work, fx.GraphModule):
            form = "graph"
        elif dropin.is_sealed(type(work)):
            form = "sealed"
    if form == "graph":
        return whole.fused, whole.float64_twin, form
    if form == "sealed":
        return (dropin.install(dropin.shell(work), whole.fused, sealed=True),
                lambda: dropin.install(dropin.shell(work), whole.float64_twin(), sealed=True), form)
    regions_report = Report()
    cap = dropin.boundary_capture(work, inputs)
    result, twin = _fuse_regions(work, cap, inputs, rules, check, stop_after, regions_report)
    if form == "auto":
        form = "regions"
        if inputs is not None and not isinstance(work, dropin.CONTAINERS):
            by_regions, by_graph = count_run(result, inputs), count_run(whole.fused, inputs)
            if any(by_regions[k] > by_graph[k] for k in ("convs", "bns", "matmuls")):
                form = "installed"
                report.notes.append(
                    f"forward runs the whole fused graph ({by_graph['convs']} convs, {by_graph['bns']} BatchNorms, "
                    f"{by_graph['matmuls']} matrix products on the example input); the model's other methods run "
                    f"its fused submodules ({by_regions['convs']} convs, {by_regions['bns']} BatchNorms, "
                    f"{by_regions['matmuls']} matrix products through forward's own code)")
    if form == "regions":
        _replace_log(report, regions_report)
        return result, twin, form
    report.opaque.update(regions_report.opaque)
    return (dropin.install(result, whole.fused, sealed=False),
            lambda: dropin.install(twin(), whole.float64_twin(), sealed=False), form)


def _replace_log(report: Report, by: Report) -> None:
    """``report`` tells what ``by`` (the rewrite of the form kept) did, instead of the whole graph's rewrite."""
    report.rules_fired, report.refusals = by.rules_fired, by.refusals
    report.notes.extend(n for n in by.notes if n not in report.notes)
    report.opaque.update(by.opaque)


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
         report: bool = False, progress: Callable[[str], None] | None = None, keep_class: bool = True,
         _stop_after: int | None = None):
    """Fuse ``model``'s reparameterizable structure; return the deploy module (and a Report if asked).

    The input model is never modified: fusion runs on an eval-mode copy. ``example_inputs`` (a tensor or a
    tuple) fixes the shapes used for capture and verification; without it one input is guessed from the
    first conv/linear layer. ``rules`` replaces the built-in rule list, ``extra_rules`` are tried before it,
    ``disable``/``only`` pick rules by name. With ``verify`` the result is compared end to end with the
    original in float64 and a mismatch raises :class:`VerificationError` naming the rewrite responsible.
    ``progress``, if given, is called with the name of each long step as it starts ('rewrite', 'verify').
    With ``keep_class`` (the default) the deploy model is an instance of the model's class with its
    attributes and methods (docs/design.md, "Drop-in deploy models"); without it, a model traced whole
    comes back as one fused ``torch.fx.GraphModule``.
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
    fused, twin, form = _rewrite(model, inputs, chosen, check, _stop_after, rep, "auto" if keep_class else "graph")
    rep.seconds["rewrite"] = time.perf_counter() - t0
    if verify and inputs is not None and _stop_after is None:
        t0 = time.perf_counter()
        if progress is not None:
            progress("verify")
        fused64 = twin()
        rep.verification = _verify(model, fused, fused64, inputs, tolerance)
        checked = form
        if rep.verification.passed and form == "installed":  # the fused submodules the other methods run
            checked = "regions"
            with dropin.own_forward(fused), dropin.own_forward(fused64):
                rep.verification = _verify(model, fused, fused64, inputs, tolerance)
        rep.seconds["verify"] = time.perf_counter() - t0
        if not rep.verification.passed:
            def right_after(k: int) -> bool:
                partial, partial_twin, _ = _rewrite(model, inputs, chosen, check, k, Report(), checked)
                return _verify(model, partial, partial_twin(), inputs, tolerance).passed

            if checked != form:  # the log of the regions' rewrite, which the bisection counts
                _rewrite(model, inputs, chosen, check, None, regions_rep := Report(), checked)
                _replace_log(rep, regions_rep)
            raise mismatch("model", rep, tolerance, right_after, lambda: _misread(model, inputs))
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
