"""The one fuse driver, for every front end: rules → import → engine → export → verify → (on a mismatch) the
culprit → report. A front end supplies an adapter (:class:`reparam.frontends.base.FrontEnd`); everything here
behaves the same for torch.fx, torch.export and ONNX:

- the engine rewrites each imported graph to a fixpoint (one rewrite budget across regions, for bisection), its
  local checks finishing while the graph is exported;
- opaque operations are counted by kind into one note;
- verification runs the original and the fused result on the same random inputs and judges them with one metric
  (:mod:`reparam.frontends.verify`): in float64 at ``tolerance``, and as deployed at its own dtype's precision;
- a failed float64 check names a misread operation, else the first wrong rewrite (bisection: the engine is
  deterministic, so re-running it with a budget of k rewrites gives the model after k rewrites), else the
  capture; a deploy check that fails while float64 passes is the export's or the dtype's, not a rule's;
- ``progress(phase)`` is called as each long phase starts ('rewrite', 'verify', 'bisect'; 'export' where the
  front end exports again), with ``done=`` / ``total=`` counts for callbacks that accept them;
- the garbage collector is paused while fusing, and it and torch's thread count are restored for the caller on
  every path.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from reparam.core.engine import Engine
from reparam.core.ops import Opaque
from reparam.core.report import Report, Verification
from reparam.core.rule import Rule
from reparam.errors import VerificationError
from reparam.frontends import verify as metric
from reparam.frontends.base import FrontEnd, Outputs, Region, names


@contextlib.contextmanager
def process_state_kept():
    """Pause the cyclic garbage collector (fusing makes many short-lived objects, and full collections over a
    big model's heap cost more than the whole rewrite); on leaving, by any path, restore it and torch's
    intra-op thread count as the caller had them."""
    was_enabled = gc.isenabled()
    threads = torch.get_num_threads()
    gc.disable()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if was_enabled:
            gc.enable()


def gc_paused(fn):
    """``fn`` run inside :func:`process_state_kept`."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with process_state_kept():
            return fn(*args, **kwargs)

    return run


class Progress:
    """Announces phases to a user callback: ``progress(phase)``, plus ``done=``/``total=`` counts when the
    callback accepts them (a one-argument callback hears each phase once)."""

    def __init__(self, callback: Callable | None):
        self.callback, self.phase = callback, None
        self.counts = callback is not None and _accepts_counts(callback)

    def __call__(self, phase: str, done: int | None = None, total: int | None = None) -> None:
        if self.callback is None:
            return
        if self.counts and (done is not None or total is not None):
            self.callback(phase, done=done, total=total)
        elif phase != self.phase:
            self.callback(phase)
        self.phase = phase


def _accepts_counts(callback: Callable) -> bool:
    try:
        params = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):
        return False
    kinds = {p.name: p.kind for p in params}
    if inspect.Parameter.VAR_KEYWORD in kinds.values():
        return True
    usable = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return kinds.get("done") in usable and kinds.get("total") in usable


@dataclass
class Options:
    """One run's settings (as the public fuse functions take them)."""

    rules: list[Rule]
    check: bool = True
    verify: bool = True
    tolerance: float = metric.DEFAULT_TOLERANCE
    report: bool = False
    progress: Callable | None = None
    stop_after: int | None = None


@dataclass
class Rewritten:
    regions: list[Region]
    fused: Any
    count: int


def rewrite(front: FrontEnd, rules: Sequence[Rule], check: bool, stop_after: int | None, report: Report,
            before_engine: Callable[[list[Region]], None] | None = None) -> Rewritten:
    """Import, rewrite every region to a fixpoint (at most ``stop_after`` rewrites in all), export, assemble.
    ``before_engine(regions)`` runs on the fresh import (the float64 reference of an IR-evaluated front end)."""
    regions = front.import_graphs(report)
    if before_engine is not None:
        before_engine(regions)
    budget = _rewrite_each(front, regions, rules, check, stop_after, report)
    import_more = getattr(front, "import_more", None)
    if import_more is not None:  # regions read from the rewritten ones (the whole graph over fused submodules)
        more = import_more(regions, report) or []
        _rewrite_each(front, more, rules, check, budget, report)
        regions = regions + more
    fused = front.assemble(regions, report)
    return Rewritten(regions, fused, sum(r.count for r in regions))


def _rewrite_each(front: FrontEnd, regions: list[Region], rules: Sequence[Rule], check: bool,
                  budget: int | None, report: Report) -> int | None:
    """Rewrite and export each region in turn, within ``budget`` rewrites in all; returns what is left of it.
    A region's local checks finish while the next region is rewritten; every check has passed on return, and
    a failed check is raised before any later error (an earlier wrong rewrite may explain it)."""
    previous: Engine | None = None
    for region in regions:
        engine = Engine(list(rules), check=check, stop_after=budget)
        try:
            log = engine.run(region.graph, wait=False)
            try:
                region.fused = front.export(region)  # while the last local checks finish
            except BaseException:
                engine.wait()
                raise
        except BaseException:
            if previous is not None:
                previous.wait()
            raise
        if previous is not None:
            previous.wait()
        previous = engine
        prefix = f"{region.path}." if region.path else ""
        report.rules_fired += [dict(rule=e.rule, where=prefix + e.where, detail=e.detail) for e in log.fired_events()]
        report.refusals += [dict(rule=e.rule, where=prefix + e.where, detail=e.detail) for e in log.refusals()]
        region.count = engine.count
        if budget is not None:
            budget = max(budget - engine.count, 0)
    if previous is not None:
        previous.wait()
    return budget


def opaque_note(front: FrontEnd, regions: list[Region]) -> str | None:
    """One line naming the operations opaque to the rules (kept as they were), most frequent first."""
    kinds = Counter(front.opaque_kind(n) for r in regions for n in r.graph.nodes
                    if isinstance(n.op, Opaque) and n.op.value is None)
    if not kinds:
        return None
    return "operations opaque to the rules, kept as they were: " + ", ".join(
        f"{kind}×{k}" for kind, k in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))


def judge(reference: Outputs, exact: list | None, native: list | None, tolerance: float,
          shapes: list[list[int]]) -> Verification:
    """The verification verdict, by the one metric: each output over its magnitude (its own size, or the size
    of the computation behind it as the original's own rounding shows); float64 at ``tolerance``, the deployed
    result at its dtype's precision (``verify.native_tolerance``)."""
    want = reference.exact
    if want is not None:
        scales = metric.magnitudes(want, reference.native)
    else:  # two runs as deployed that round differently show the size of the computation as well
        scales = metric.magnitudes(reference.native, reference.rounding) if reference.native is not None else None
    err64 = metric.relative_error(exact, want, scales) if want is not None and exact is not None else None
    err_native = baseline = None
    native_ok = True
    if native is not None and reference.native is not None:
        if want is not None:
            err_native = metric.relative_error(native, want, scales, baseline=reference.native)
            baseline = metric.relative_error(reference.native, want, scales)
        else:
            err_native = metric.relative_error(native, reference.native, scales)
        allowed = metric.native_tolerance(tolerance, [metric.dtype_of(t) for t in reference.native])
        native_ok = err_native <= allowed
    return Verification(input_shapes=shapes, error_fp64=err64, error_native=err_native, baseline_native=baseline,
                        tolerance=tolerance, passed=(err64 is None or err64 <= tolerance) and native_ok)


def fuse_with(front: FrontEnd, opts: Options):
    """The whole run for one front end; returns the artifact (and the Report with ``opts.report``)."""
    with process_state_kept():
        return _fuse(front, opts)


def _fuse(front: FrontEnd, opts: Options):
    started = time.perf_counter()
    progress = Progress(opts.progress)
    rep = Report()
    front.prepare(rep)
    skipped = None if opts.verify else "disabled by the caller"
    skipped = skipped or front.cannot_verify()
    verifying = skipped is None and opts.stop_after is None
    ref: list[Outputs] = []

    def take_reference(regions: list[Region]) -> None:
        t0 = time.perf_counter()
        ref.append(front.reference(regions))
        rep.seconds["reference"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    progress("rewrite")
    done = rewrite(front, opts.rules, opts.check, opts.stop_after, rep, take_reference if verifying else None)
    rep.seconds["rewrite"] = time.perf_counter() - t0 - rep.seconds.get("reference", 0.0)
    note = opaque_note(front, done.regions)
    if note:
        rep.notes.append(note)
    if verifying:
        t0 = time.perf_counter()
        progress("verify")
        reference = ref[0]
        shapes = front.input_shapes()
        exact = front.exact(done.fused, done.regions) if reference.exact is not None else None
        native = front.native(done.fused)
        rep.verification = judge(reference, exact, native, opts.tolerance, shapes)
        if _exact_failed(rep.verification, opts.tolerance) and hasattr(front, "recheck"):
            reference, exact = _rechecked(front, reference, done)
            rep.verification = judge(reference, exact, native, opts.tolerance, shapes)
        rep.seconds["verify"] = time.perf_counter() - t0 + rep.seconds.pop("reference", 0.0)
        if not rep.verification.passed:
            raise _mismatch(front, opts, rep, reference, progress)
    elif skipped:
        rep.verification.skipped = skipped
    phase = getattr(front, "finish_phase", None)  # a front end that exports again says so
    if phase:
        progress(phase)
    t0 = time.perf_counter()
    artifact = front.finish(done.fused, rep)
    if phase:
        rep.seconds[phase] = time.perf_counter() - t0
    rep.seconds["total"] = time.perf_counter() - started
    if opts.report:
        rep.before, rep.after = front.count(None, True), front.count(artifact, False)
        return artifact, rep
    return artifact


def _exact_failed(v: Verification, tolerance: float) -> bool:
    return v.error_fp64 is not None and not v.error_fp64 <= tolerance


def _rechecked(front: FrontEnd, reference: Outputs, done: Rewritten) -> tuple[Outputs, list]:
    """The reference and the fused float64 outputs again, by the front end's reference semantics."""
    want, exact = front.recheck(done.fused, done.regions)
    return Outputs(exact=want, native=reference.native, rounding=reference.rounding), exact


def _mismatch(front: FrontEnd, opts: Options, rep: Report, reference: Outputs, progress: Progress) \
        -> VerificationError:
    """The error for a failed verification, naming what went wrong."""
    v = rep.verification
    tol = opts.tolerance
    exact_failed = _exact_failed(v, tol)
    subject = front.subject
    if not exact_failed and v.error_fp64 is not None:
        allowed = metric.native_tolerance(tol, [metric.dtype_of(t) for t in reference.native])
        return VerificationError(
            f"the fused {subject} differs from the original as deployed (error {v.error_native:.3g} in its own "
            f"dtype > {allowed:g}) though the rewritten graph matches in float64 (error {v.error_fp64:.3g}): "
            f"only the written model differs, so no rule is to blame: its tensors lose too much in their dtype, or "
            f"this is a bug in reparam's export; nothing was returned; please report it", rewrite=None,
            error=v.error_native)
    if exact_failed:
        error, where = v.error_fp64, f"{v.error_fp64:.3g} in float64 > {tol:g}"
    else:  # no float64 evaluation: the deployed result is all there is to judge (and to bisect on)
        allowed = metric.native_tolerance(tol, [metric.dtype_of(t) for t in reference.native])
        error, where = v.error_native, f"{v.error_native:.3g} as deployed > {allowed:g}; no float64 check"
    head = f"the fused {subject} differs from the original (relative error {where})"
    misread = front.misread() if exact_failed else []
    if misread:
        return VerificationError(f"{head}; the capture read {names(misread)} wrongly (a bug in reparam's import of "
                                 f"that operation; please report it)", rewrite=None, error=error)

    def right_after(k: int) -> bool:
        part = rewrite(front, opts.rules, opts.check, k, Report())
        exact = front.exact(part.fused, part.regions) if exact_failed else None
        native = None if exact_failed else front.native(part.fused)
        passed = judge(reference, exact, native, tol, []).passed
        if not passed and exact_failed and hasattr(front, "recheck"):
            passed = judge(*_rechecked(front, reference, part), None, tol, []).passed
        return passed

    total = len(rep.rules_fired)
    progress("bisect", 0, max(1, math.ceil(math.log2(total + 1))))
    if total == 0 or not right_after(0):
        return VerificationError(f"{head}; it differs already as captured, before any rewrite: an operation was "
                                 f"read wrongly (a bug in reparam's capture of this {subject}; please report it)",
                                 rewrite=None, error=error)
    culprit = bisect_culprit(right_after, total, rep, progress)
    return VerificationError(f"{head}; first wrong rewrite: {culprit}. Disable that rule and report it.",
                             rewrite=culprit, error=error)


def bisect_culprit(right_after, total: int, rep: Report, progress: Callable | None = None) -> str:
    """The first rewrite after which ``right_after(k)`` (the model is right after k rewrites) fails."""
    lo, hi = 0, total  # the model is right after lo rewrites, wrong after hi
    steps, step = max(1, math.ceil(math.log2(total + 1))), 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok = right_after(mid)
        lo, hi = (mid, hi) if ok else (lo, mid)
        step += 1
        if progress is not None:
            progress("bisect", step, steps)
    event = rep.rules_fired[hi - 1] if 0 < hi <= len(rep.rules_fired) else None
    return f"rule '{event['rule']}' at '{event['where']}'" if event else "none (the capture itself differs)"
