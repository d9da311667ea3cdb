"""What every front end's fuse driver shares: the paused garbage collector, and naming the culprit of a failed
verification (a misread operation, the first wrong rewrite by bisection, or the capture itself)."""
from __future__ import annotations

import functools
import gc

from reparam.core.report import Report
from reparam.errors import VerificationError


def gc_paused(fn):
    """Run ``fn`` with the cyclic garbage collector paused: fusing makes many short-lived objects, and
    full collections over a big model's heap cost more than the whole rewrite (they run once it is done)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    return run


def mismatch(subject: str, rep: Report, tolerance: float, right_after, misread=None) -> VerificationError:
    """The error for a failed verification, naming what went wrong: operations the capture read wrongly
    (``misread()`` lists them), else the first rewrite after which the model stops matching
    (``right_after(k)``: it matches after k rewrites), else the capture itself."""
    error = rep.verification.error_fp64
    head = f"the fused {subject} differs from the original (relative error {error:.3g} in float64 > {tolerance:g})"
    names = misread() if misread is not None else []
    if names:
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        return VerificationError(f"{head}; the capture read {', '.join(repr(n) for n in names[:3])}{more} wrongly "
                                 f"(a bug in reparam's import of that operation; please report it)",
                                 rewrite=None, error=error)
    total = len(rep.rules_fired)
    if total == 0 or not right_after(0):
        return VerificationError(f"{head}; it differs already as captured, before any rewrite: an operation was "
                                 f"read wrongly (a bug in reparam's capture of this model; please report it)",
                                 rewrite=None, error=error)
    culprit = bisect_culprit(right_after, total, rep)
    return VerificationError(f"{head}; first wrong rewrite: {culprit}. Disable that rule and report it.",
                             rewrite=culprit, error=error)


def bisect_culprit(right_after, total: int, rep: Report) -> str:
    """The first rewrite after which ``right_after(k)`` (the model is right after k rewrites) fails."""
    lo, hi = 0, total  # the model is right after lo rewrites, wrong after hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok = right_after(mid)
        lo, hi = (mid, hi) if ok else (lo, mid)
    event = rep.rules_fired[hi - 1] if 0 < hi <= len(rep.rules_fired) else None
    return f"rule '{event['rule']}' at '{event['where']}'" if event else "none (the capture itself differs)"
