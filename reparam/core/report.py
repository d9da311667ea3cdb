"""What a fusion did: rules fired and refused (with module paths), counts before → after, verification."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class Counts:
    """Ops are FX call nodes (call_module/function/method) of the traced model; None if it cannot be traced."""

    ops: int | None
    convs: int
    bns: int
    linears: int
    params: int


@dataclass
class Verification:
    input_shapes: list[list[int]] = field(default_factory=list)
    error_fp64: float | None = None  # fused vs original, both run in float64 (relative, max-abs scale)
    error_native: float | None = None  # fused in the model's own dtype vs the float64 original
    baseline_native: float | None = None  # the original in its own dtype vs the float64 original
    tolerance: float | None = None
    passed: bool | None = None
    skipped: str | None = None


@dataclass
class Report:
    rules_fired: list[dict] = field(default_factory=list)
    refusals: list[dict] = field(default_factory=list)
    opaque: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    before: Counts | None = None
    after: Counts | None = None
    verification: Verification = field(default_factory=Verification)
    seconds: dict[str, float] = field(default_factory=dict)

    def fired_counts(self) -> dict[str, int]:
        return dict(Counter(e["rule"] for e in self.rules_fired))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fired_counts"] = self.fired_counts()
        return d

    def summary(self) -> str:
        """A readable multi-line summary (the CLI prints a richer table from the same data)."""
        lines = []
        b, a = self.before, self.after
        if b and a:
            def fmt(x):
                return "?" if x is None else f"{x:,}"
            for label, k in (("ops", "ops"), ("convs", "convs"), ("batchnorms", "bns"), ("linears", "linears"),
                             ("params", "params")):
                lines.append(f"{label:>11}: {fmt(getattr(b, k))} → {fmt(getattr(a, k))}")
        fired = ", ".join(f"{k}×{v}" for k, v in sorted(self.fired_counts().items())) or "none"
        lines.append(f"rules fired: {fired}")
        v = self.verification
        if v.skipped:
            lines.append(f"verification: skipped ({v.skipped})")
        elif v.passed is not None:
            lines.append(f"verification: {'passed' if v.passed else 'FAILED'} on {v.input_shapes}: relative error "
                         f"{v.error_fp64:.2e} in float64 (tolerance {v.tolerance:.0e}), {v.error_native:.2e} in "
                         f"the model's dtype")
        for path, why in self.opaque.items():
            lines.append(f"opaque: '{path or '<model>'}' was not traced ({why})")
        lines.extend(f"note: {n}" for n in self.notes)
        if self.refusals:
            lines.append(f"refused: {len(self.refusals)} match(es); e.g. " + "; ".join(
                f"{r['rule']} at '{r['where']}': {r['detail']}" for r in self.refusals[:3]))
        return "\n".join(lines)

    def __str__(self):
        return self.summary()
