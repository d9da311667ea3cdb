"""``reparam.fuse``: training-time model in, numerically equivalent single-branch model out.

The torch.fx adapter of the one fuse driver (:mod:`reparam.frontends.pipeline`): the model is captured (whole,
else region by region), each region's graph imported to IR, rewritten, exported back as a GraphModule, and the
regions put in place in a copy of the model. A model traced whole keeps its class (docs/design.md, "Drop-in
deploy models"): the regions at its module boundaries are rewritten, then the whole graph over them, and the
deploy model is built from them (:meth:`FxFrontEnd.assemble`)."""
from __future__ import annotations

import collections
import copy
from typing import Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from reparam.core.ir import Node
from reparam.core.report import Report
from reparam.core.rule import Rule
from reparam.errors import CaptureError, ReparamError
from reparam.frontends import verify as verify_mod
from reparam.frontends.base import Outputs, Region
from reparam.frontends.fx import dropin
from reparam.core.ops import exact_values
from reparam.frontends.fx.capture import (CONCRETE, capture, capture_one, eval_mode, example_inputs_for, first_line,
                                          set_submodule, trace)
from reparam.frontends.fx.counting import count_model, count_run
from reparam.frontends.fx.exporter import export_fx
from reparam.frontends.fx.import_check import misread_nodes
from reparam.frontends.fx.importer import import_fx
from reparam.frontends.fx.nodes import FxOrigin
from reparam.frontends.fx.param_fold import materialize
from reparam.frontends.fx.prune import prune_unused
from reparam.frontends.module_copy import structure_copy
from reparam.frontends.pipeline import Options, fuse_with, opaque_note
from reparam.frontends.rulesets import select_rules

PROBE_SEED = 1234  # the verification's random inputs (the same for every front end)


def _as_tuple(example_inputs) -> tuple | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _shapes(inputs: tuple) -> list[list[int]]:
    leaves, _ = tree_flatten(inputs)
    return [list(t.shape) for t in leaves if isinstance(t, torch.Tensor)]


def import_graph_module(gm: fx.GraphModule, report: Report, path: str = "") -> Region:
    """``gm`` (shapes attached) read into IR, unused nodes pruned; import notes into ``report``."""
    graph, notes = import_fx(gm)
    prune_unused(graph)
    materialize(graph)
    report.notes.extend(f"{path + ': ' if path else ''}{n}" for n in notes)
    return Region(path, graph, source=gm)


def export_region(region: Region, dtype: torch.dtype | None = None, checked: set | None = None, *,
                  copy_modules: bool = True, source: nn.Module | None = None) -> fx.GraphModule:
    """The region's rewritten graph as a GraphModule; ``dtype=torch.float64``: every new tensor in float64, as
    computed (not cast), for exact verification (unchanged modules are shared then). ``checked``: the exporter
    self-checks of this run so far. ``source``: where unchanged modules are found by path (the region's own
    source by default)."""
    source = region.source if source is None else source
    if dtype is None:
        return export_fx(region.graph, source, copy_modules=copy_modules, checked=checked)
    return export_fx(region.graph, source, dtype, checked=checked)


def fx_opaque_kind(node: Node) -> str:
    """An opaque FX node's operation: the module class it calls, or the function or method name."""
    origin = node.origin
    n = origin.node if isinstance(origin, FxOrigin) else None
    if n is None:
        return node.op.what
    if n.op == "call_module" and n.graph.owning_module is not None:
        try:
            return type(n.graph.owning_module.get_submodule(str(n.target))).__name__
        except AttributeError:
            return str(n.target)
    if n.op == "call_method":
        return f".{n.target}()"
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


OPAQUE_NOTE = "operations opaque to the rules"  # how the pipeline's opaque note begins


class FxFrontEnd:
    """An ``nn.Module`` fused through torch.fx (see :func:`fuse`).

    A model traced whole is deployed in one of these forms (``self.form``, see docs/design.md, "Drop-in deploy
    models"):

    - 'graph': the fused GraphModule itself (``keep_class=False``, or a torch.nn container or GraphModule given
      as the model, which have no methods of their own to keep);
    - 'sealed': an instance of the model's class holding only its plain attributes and the graph, installed as
      its forward (a class with no public method but forward);
    - 'regions': an instance of the model's class, each submodule its code can observe fused in place;
    - 'installed': 'regions' with the whole graph installed as its forward, when the graph runs fewer convs,
      BatchNorms or Linear products on the example input than the regions do.

    For the last two the boundary regions are rewritten first; then the whole graph is read from the model with
    them in place (:meth:`import_more`: their deploy tensors read as the float64 values they were rounded from)
    and rewritten, so it only has the rewrites that cross their boundaries left to do. The form is chosen at the
    first assembly and kept for the bisection's re-runs; both forward and the class's own forward through the
    fused regions are verified; :meth:`finish` drops the whole graph's rewrites from the report when it is not
    installed."""

    subject = "model"

    def __init__(self, model: nn.Module, example_inputs, keep_class: bool = True):
        if not isinstance(model, nn.Module):
            raise ReparamError(f"fuse() needs a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.keep_class = keep_class
        self.form: str | None = None  # for a model traced whole: 'graph', 'sealed', 'regions' or 'installed'
        self.composed = False  # the boundary regions, then the whole graph over them (forms 'regions'/'installed')
        self._report: Report | None = None  # the report of the rewrite in progress (where each region's log starts)
        self._whole_notes: list[str] = []  # the whole graph's capture and import notes (kept if it is installed)
        self._assembled: tuple | None = None  # (model with the fused boundary regions, the (path, region)s kept)
        self._regions: list[Region] = []
        self.checked: set = set()  # the exporter's self-checks done in this run (by signature)
        self.exact_of: dict = {}  # deploy tensors of the boundary regions -> the float64 values they round
        self.inputs = _as_tuple(example_inputs)
        self.guessed = False
        if self.inputs is None:
            self.inputs = example_inputs_for(model)
            self.guessed = self.inputs is not None
        self.probe = verify_mod.random_like(self.inputs, seed=PROBE_SEED) if self.inputs is not None else None

    def prepare(self, report: Report) -> None:
        training = [name or "the model" for name, m in self.model.named_modules() if m.training]
        if training:
            who = "the model was" if self.model.training else \
                f"submodule(s) {', '.join(training[:3])}{' …' if len(training) > 3 else ''} were"
            report.notes.append(f"{who} in training mode; it was fused in eval mode (BatchNorm uses running "
                                "statistics, dropout is off)")
        if self.guessed:
            report.notes.append(f"no example inputs given; guessed one of shape {_shapes(self.inputs)}")

    def import_graphs(self, report: Report) -> list[Region]:
        self._report = report
        self.exact_of = {}
        if self.composed or (self.form is None and self._whole_form() is None and self._traces_whole()):
            return self._boundary_regions(report)
        with eval_mode(self.model):
            cap = capture(self.model, self.inputs)
            if self.inputs is not None and cap.regions and cap.regions[0].path == "" and not cap.shaped:
                try:
                    verify_mod.run(self.model, self.inputs)
                except Exception as err:
                    raise CaptureError(f"the model does not run on inputs of shape {_shapes(self.inputs)}: "
                                       f"{type(err).__name__}: {err}") from err
        whole = bool(cap.regions) and cap.regions[0].path == ""
        if whole and self.form is None:
            self.form = self._whole_form()
        report.opaque.update(cap.opaque)
        if whole and self.form not in ("graph", "sealed"):  # captured whole only on the example inputs
            return self._boundary_regions(report)
        report.notes.extend(cap.notes)
        if cap.opaque.get("") and cap.regions:
            report.notes.append(f"the model's forward could not be traced as a whole ({cap.opaque['']}); "
                                f"{len(cap.regions)} traceable submodule(s) were fused separately")
        regions = [import_graph_module(r.gm, report, r.path) for r in cap.regions]
        if whole:
            regions[0].extra["whole"] = True
        return regions

    def _traces_whole(self) -> bool:
        """The model traces symbolically as one graph (the whole graph over its fused regions will be captured,
        symbolically or on the example inputs, by :meth:`import_more`)."""
        try:
            with eval_mode(self.model):
                trace(self.model)
            return True
        except Exception:  # noqa: BLE001 - the full capture decides
            return False

    def _boundary_regions(self, report: Report) -> list[Region]:
        """A drop-in model's regions at the boundaries its code can observe (see dropin.boundary_capture); the
        whole graph over them is read once they are rewritten (:meth:`import_more`)."""
        self.composed = True
        self._whole_notes = []
        with eval_mode(self.model):
            cap = dropin.boundary_capture(self.model, self.inputs)
        report.opaque.update(cap.opaque)
        report.notes.extend(cap.notes)
        return [import_graph_module(r.gm, report, r.path) for r in cap.regions]

    def import_more(self, regions: list[Region], report: Report) -> list[Region]:
        """For a drop-in model: the whole graph, traced from the model with its fused boundary regions in place,
        reading their deploy tensors as the float64 values they were rounded from (so every tensor of the
        whole graph rounds once). [] if it cannot be captured (the regions are the deploy model then)."""
        if not self.composed:
            return []
        with eval_mode(self.model):
            assembled, kept = _assemble(self.model, [(r.path, r) for r in regions], self.inputs, report)
        self._assembled = (assembled, kept)
        with eval_mode(assembled):
            try:
                gm, _, note = capture_one(assembled, self.inputs)
            except Exception as err:  # noqa: BLE001 - the regions alone are the deploy model
                self._whole_notes.append(f"the model with its fused submodules in place could not be traced as a "
                                         f"whole: {first_line(err)}")
                return []
        if note:
            self._whole_notes.append(note)
        notes = Report()
        with exact_values(self.exact_of):
            whole = import_graph_module(gm, notes, "")
        self._whole_notes.extend(notes.notes)
        whole.extra.update(whole=True, concrete=gm.meta.get(CONCRETE, False))
        return [whole]

    def _whole_form(self) -> str | None:
        """The form of a model traced whole, or None when the example input's counts choose it (at assembly)."""
        if not self.keep_class or type(self.model) in dropin.CONTAINERS or isinstance(self.model, fx.GraphModule):
            return "graph"
        return "sealed" if dropin.is_sealed(type(self.model)) else None

    @staticmethod
    def _split(regions: list[Region]) -> tuple[Region | None, list[Region]]:
        """(the whole graph's region or None, the other regions)."""
        whole = next((r for r in regions if r.extra.get("whole")), None)
        return whole, [r for r in regions if r is not whole]

    def export(self, region: Region) -> fx.GraphModule:
        if self._report is not None:  # where this region's log starts in the report
            region.extra["log_from"] = (len(self._report.rules_fired), len(self._report.refusals))
        if not self.composed:
            return export_region(region, checked=self.checked)
        if region.extra.get("whole"):  # its unchanged modules are the deploy model's own: shared, not copied
            return export_region(region, checked=self.checked, copy_modules=False)
        with exact_values(self.exact_of):  # what the whole graph reads exactly (import_more)
            return export_region(region, checked=self.checked)

    def assemble(self, regions: list[Region], report: Report) -> nn.Module:
        self._regions = regions
        if len(regions) == 1 and regions[0].path == "" and self.form == "graph":
            return regions[0].fused
        if self.form == "sealed":
            with eval_mode(self.model):
                return dropin.install(dropin.shell(self.model), regions[0].fused, sealed=True)
        whole, boundary = self._split(regions)
        if self.composed and self._assembled is not None:
            result, kept = self._assembled
        else:
            with eval_mode(self.model):
                result, kept = _assemble(self.model, [(r.path, r) for r in boundary], self.inputs, report)
        kept_paths = {path for path, _ in kept}
        for r in boundary:
            r.extra["kept"] = r.path in kept_paths
        if not self.composed:
            return result
        if self.form is None:
            self.form = self._choose(result, whole, report)
        return dropin.install(result, whole.fused, sealed=False) if self.form == "installed" else result

    def _choose(self, by_regions: nn.Module, whole: Region | None, report: Report) -> str:
        """'installed' when the whole graph runs fewer convs, BatchNorms or Linear products on the example input
        than the model's own forward through its fused regions, else 'regions' (also when the whole graph had
        nothing left to rewrite: then it computes what the regions do)."""
        if self.inputs is None or whole is None or whole.count == 0:
            return "regions"
        if whole.extra.get("concrete"):  # ATen graphs: counted by running them
            ours, graph = count_run(by_regions, self.inputs), count_run(whole.fused, self.inputs)
        else:  # straight-line graphs of the same calls: the whole graph as traced computes what the regions do
            ours, graph = count_model(whole.source), count_model(whole.fused)
        if not any(getattr(ours, k) > getattr(graph, k) for k in ("convs", "bns", "linears")):
            return "regions"
        report.notes.append(
            f"forward runs the whole fused graph ({graph.convs} convs, {graph.bns} BatchNorms, {graph.linears} "
            f"Linear products on the example input); the model's other methods run its fused submodules "
            f"({ours.convs} convs, {ours.bns} BatchNorms, {ours.linears} Linear products through forward's own code)")
        return "installed"

    def opaque_kind(self, node: Node) -> str:
        return fx_opaque_kind(node)

    def cannot_verify(self) -> str | None:
        return "no example inputs (pass example_inputs to verify)" if self.inputs is None else None

    def input_shapes(self) -> list[list[int]]:
        return _shapes(self.inputs)

    # A drop-in model is verified twice over: its forward, and its class's own forward through the fused
    # regions (what its other methods run); the original's outputs are compared with both.

    def reference(self, regions: list[Region]) -> Outputs:
        # float64 streamed (no float64 copy of the model); the original as it runs, on a copy of its modules
        exact = verify_mod.outputs_float64(self.model, self.probe)
        native = verify_mod.run(verify_mod.eval_view(self.model), self.probe)
        twice = 2 if self.composed else 1
        return Outputs(exact=exact * twice, native=native * twice)

    def _both(self, fused: nn.Module, run: Callable[[nn.Module], list]) -> list:
        """``run(fused)``, and for a drop-in model ``run`` of it on its class's own forward after it."""
        outs = run(fused)
        if not self.composed:
            return outs
        if self.form != "installed":
            return outs + outs
        with dropin.own_forward(fused):
            return outs + run(fused)

    def exact(self, fused: nn.Module, regions: list[Region]) -> list:
        twin = float64_twin(fused, regions, self)
        return self._both(twin, lambda m: verify_mod.outputs_float64(m, self.probe))

    def recheck(self, fused: nn.Module, regions: list[Region]) -> tuple[list, list]:
        twice = 2 if self.composed else 1
        twin = float64_twin(fused, regions, self)
        return (verify_mod.run(self.model, self.probe, torch.float64) * twice,
                self._both(twin, lambda m: verify_mod.run(m, self.probe, torch.float64)))

    def native(self, fused: nn.Module) -> list:
        return self._both(fused, lambda m: verify_mod.run(m, self.probe))

    def misread(self) -> list[str]:
        return _misread(self.model, self.inputs)

    def finish(self, fused: nn.Module, report: Report) -> nn.Module:
        if self.composed:
            self._keep_log_of(self._regions, report)
        return fused

    def _keep_log_of(self, regions: list[Region], report: Report) -> None:
        """The report tells what the deploy model's rewrite did: the boundary regions' rewrites, and the whole
        graph's after them (see :meth:`import_more`) when it is installed as forward; the opaque operations of
        what forward runs."""
        whole, boundary = self._split(regions)
        if self.form == "installed":
            report.notes.extend(n for n in self._whole_notes if n not in report.notes)
            chosen = [whole]
        else:
            if whole is not None:
                fired, refused = whole.extra["log_from"]
                report.rules_fired, report.refusals = report.rules_fired[:fired], report.refusals[:refused]
            chosen = boundary
        note = opaque_note(self, chosen)
        report.notes[:] = [n for n in report.notes if not n.startswith(OPAQUE_NOTE)] + ([note] if note else [])

    def count(self, artifact, original: bool):
        return count_run(self.model if original else artifact, self.inputs)  # what runs, at ATen level


def float64_twin(fused: nn.Module, regions: list[Region], front: FxFrontEnd | None = None) -> nn.Module:
    """``fused`` with each kept region's new tensors computed (not cast) in float64 (in the form ``front`` chose
    for a model traced whole)."""
    form = front.form if front is not None else None
    checked = front.checked if front is not None else None
    if regions and regions[0].path == "" and form in (None, "graph") and len(regions) == 1:
        return export_region(regions[0], torch.float64, checked)
    if form == "sealed":
        with eval_mode(front.model):
            return dropin.install(dropin.shell(front.model), export_region(regions[0], torch.float64, checked), sealed=True)
    whole, boundary = FxFrontEnd._split(regions)
    # the regions' own forward (the graph is put on again below), sharing the deploy model's tensors
    out = dropin.uninstalled(structure_copy(fused, share_graphs=True))
    for r in boundary:
        if r.extra.get("kept"):
            region64 = export_region(r, torch.float64, checked)
            carry_attributes(out.get_submodule(r.path), region64)
            set_submodule(out, r.path, region64)
    if whole is not None and form == "installed":  # over the float64 regions: it reads their modules by path
        dropin.install(out, export_region(whole, torch.float64, checked, source=out), sealed=False)
    return out


def _assemble(work: nn.Module, rewritten: list, inputs, report: Report):
    """A copy of ``work`` with its fused regions in place (each keeping the plain attributes of the module
    it replaces, which the surrounding code may read). A region the rest of the model cannot run with
    (it uses something a graph does not have, e.g. a method) is put back as it was, and the report says
    so. ``rewritten`` is a list of (path, region) with ``region.fused`` the region's GraphModule. Returns the
    model and the (path, region) pairs kept."""
    # never the input itself; a module a region replaces is not copied (its fused graph stands in), unless the
    # model holds it at another path too (that one stays a copy of the original, as before the region)
    replaced = {path: work.get_submodule(path) for path, _ in rewritten}
    held = collections.Counter(id(m) for _, m in work.named_modules(remove_duplicate=False))
    memo = {id(replaced[path]): done.fused for path, done in rewritten if held[id(replaced[path])] == 1}
    result = copy.deepcopy(work, memo)
    for path, done in rewritten:
        carry_attributes(replaced[path], done.fused, memo)
        set_submodule(result, path, done.fused)
    if inputs is None or _runs(result, inputs):
        return result, rewritten
    for m in replaced.values():  # copied now, sharing what they share with the rest of the copy
        memo.pop(id(m), None)
    originals = {path: copy.deepcopy(m, memo) for path, m in replaced.items()}
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


def carry_attributes(original: nn.Module, fused: nn.Module, memo: dict | None = None) -> None:
    """Give ``fused`` the public plain attributes of ``original`` it lacks (configuration values such as a
    window size that the code around a region may read), kept across copies of the GraphModule. With ``memo``
    (that of a deepcopy of the model ``original`` belongs to) the values are copies, as in that copy."""
    kept = fused.meta.setdefault("_user_preserved_attributes", {})  # what GraphModule.__deepcopy__ restores
    for name, value in vars(original).items():
        if not name.startswith("_") and name != "training" and not hasattr(fused, name):
            if memo is not None:
                value = copy.deepcopy(value, memo)
            setattr(fused, name, value)
            kept[name] = value


def fuse(model: nn.Module, example_inputs=None, *, rules: Sequence[Rule] | None = None,
         extra_rules: Sequence[Rule] = (), disable: Sequence[str] = (), only: Sequence[str] | None = None,
         verify: bool = True, check: bool = True, tolerance: float = verify_mod.DEFAULT_TOLERANCE,
         report: bool = False, progress: Callable[..., None] | None = None, keep_class: bool = True,
         _stop_after: int | None = None):
    """Fuse ``model``'s reparameterizable structure; return the deploy module (and a Report if asked).

    The input model is never modified: fusion runs on an eval-mode copy. ``example_inputs`` (a tensor or a
    tuple) fixes the shapes used for capture and verification; without it one input is guessed from the
    first conv/linear layer. ``rules`` replaces the built-in rule list, ``extra_rules`` are tried before it,
    ``disable``/``only`` pick rules by name. With ``verify`` the result is compared end to end with the
    original (in float64 at ``tolerance``, and as deployed at its dtype's precision) and a mismatch raises
    :class:`VerificationError` naming the rewrite responsible. ``progress``, if given, is called with the name
    of each long step as it starts ('rewrite', 'verify', 'bisect'), and with ``done=``/``total=`` counts if it
    accepts them. With ``keep_class`` (the default) the deploy model is an instance of the model's class with its
    attributes and methods (docs/design.md, "Drop-in deploy models"); without it, a model traced whole comes back
    as one fused ``torch.fx.GraphModule``.
    """
    front = FxFrontEnd(model, example_inputs, keep_class)
    chosen = select_rules(None if rules is None else list(rules), extra_rules, disable, only)
    return fuse_with(front, Options(chosen, check=check, verify=verify, tolerance=tolerance, report=report,
                                    progress=progress, stop_after=_stop_after))


def _misread(model: nn.Module, inputs) -> list[str]:
    """The operations of ``model`` that the capture reads wrongly (see import_check)."""
    with eval_mode(model):
        cap = capture(model, inputs)
    return [f"{r.path}.{name}" if r.path else name for r in cap.regions for name in misread_nodes(r.gm)]
