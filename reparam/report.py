"""What a fusion did: rules fired and refused (with module paths), counts before → after, verification."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .capture import has_hooks, trace

_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_FUNCS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
_BN_FUNCS = {F.batch_norm, torch.batch_norm}
_LINEAR_FUNCS = {F.linear}


@dataclass
class Counts:
    """Ops are FX call nodes (call_module/function/method) of the traced model; None if it cannot be traced."""

    ops: int | None
    convs: int
    bns: int
    linears: int
    params: int


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def count_model(model: nn.Module) -> Counts:
    """Count calls in the model's FX graph (recursing into fused sub-graphs); modules when untraceable."""
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
