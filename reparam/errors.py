"""Errors reparam raises. Each message says what went wrong, where, and what to do."""
from __future__ import annotations


class ReparamError(Exception):
    """Base class of every error reparam raises on purpose."""


class RewriteMismatch(ReparamError):
    """A rewrite changed the values it replaced (a bug in that rule)."""

    def __init__(self, rule: str, where: str, detail: str):
        self.rule, self.where, self.detail = rule, where, detail
        super().__init__(f"rule '{rule}' at '{where}' changed outputs: {detail}. The rule is wrong for this "
                         f"case; disable it (rules/disable) and report it.")


class RuleError(ReparamError):
    """A rule crashed or returned something that is not an expression (a bug in that rule)."""

    def __init__(self, rule: str, where: str, detail: str):
        self.rule, self.where, self.detail = rule, where, detail
        super().__init__(f"rule '{rule}' failed at '{where}': {detail}. Fix or disable that rule.")


class FixpointError(ReparamError):
    """Rules kept rewriting without reaching a fixpoint (a rule that rewrites its own output)."""

    def __init__(self, rule: str, count: int, involved: dict[str, int] | None = None):
        self.rule = rule
        self.involved = dict(involved or {rule: count})  # rule → rewrites among the most recent ones
        others = ", ".join(f"'{r}'×{n}" for r, n in self.involved.items() if r != rule)
        cycle = f" (in a cycle with {others} among the last rewrites)" if others else ""
        super().__init__(f"no fixpoint after {count} rewrites: rule '{rule}' keeps firing{cycle} (it probably "
                         f"rewrites its own output, or undoes another rule). Fix or disable that rule.")


class VerificationError(ReparamError):
    """The fused model does not match the original on random inputs."""

    def __init__(self, message: str, rewrite: str | None = None, error: float | None = None):
        self.rewrite, self.error = rewrite, error
        super().__init__(message)


class CaptureError(ReparamError):
    """The model could not be captured or run with the given inputs."""


class ExportError(ReparamError):
    """A front end wrote a new op that does not compute what the op means (a bug in that op kind's emitter)."""

    def __init__(self, exporter: str, op: str, where: str, detail: str):
        self.exporter, self.op, self.where, self.detail = exporter, op, where, detail
        super().__init__(f"internal error in the {exporter} exporter: the new {op} at '{where}' was written as "
                         f"nodes that differ from the op's own semantics ({detail}). This is a bug in the {exporter} "
                         f"emitter of that op kind, not in a rule; please report it (or fix the emitter you "
                         f"registered).")
