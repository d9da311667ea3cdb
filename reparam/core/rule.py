"""The public rule API: a rule is a pattern, a guard and a rewrite.

    from reparam.core.rule import rule, require
    from reparam.core.pattern import P, X
    from reparam.core.ops import Affine, Conv
    from reparam.math import kernels

    @rule(P(Affine, P(Conv, X("x"), name="conv"), name="bn"))
    def conv_bn_fold(x, conv, bn):
        '''BN(conv(x)) = conv'(x), W' = W·s, b' = b·s + t. Exact when BN acts on the conv's channels.'''
        require(bn.op.acts_on(1, bn.rank), "the affine is not per output channel")
        ...
        return new_conv_op(x)

The decorated function receives the pattern's bound nodes by name and returns an expression built by
calling ops on nodes (``Conv(...)(x)``), or None when the rule does not apply after all. ``require``
(or raising :class:`Refusal`) refuses with a reason the user can read; the graph is untouched.
The engine, not the rule, checks that nothing outside the match uses its intermediate values, keeps
shared parameters intact (rewrites build new ops, never edit old ones), verifies every rewrite on
random float64 inputs, and stops rules that never reach a fixpoint.

A rule belongs to a phase (``@rule(pattern, phase="fold")``). The engine keeps every phase at its fixpoint
before a later phase acts: after any rewrite, the touched nodes are revisited by the earliest phase first.
So precedence between rules is data (their phases), not the order in which a forward writes its branches.
Rules without a phase (a user's) are in the phase "user", which runs first.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from reparam.core.pattern import Pattern


# the phases in the order the engine gives them precedence
PHASES = ("user", "canonicalize", "fold", "normalize", "merge", "serial", "forward-fold")
PHASE_DOCS = {
    "user": "a user's rules without a phase",
    "canonicalize": "drop identities, flatten sums, absorb explicit pads",
    "fold": "fold an affine into the conv or Linear before it",
    "normalize": "bring parallel branches of one input to a common form (identity, pool, dilation, grouping)",
    "merge": "merge parallel branches of one input",
    "serial": "merge convs or Linears in a chain",
    "forward-fold": "fold an affine into the conv or Linear after it (after the backward folds had their turn)",
}


class Refusal(Exception):
    """Raised by a rule's guard: the match is not provably exact (or not worth it); says why."""


def require(condition: object, reason: str) -> None:
    """Refuse the current match with ``reason`` unless ``condition`` holds."""
    if not condition:
        raise Refusal(reason)


@dataclass(eq=False)
class Rule:
    name: str
    pattern: Pattern
    fn: Callable
    doc: str = ""
    phase: str = "user"

    @property
    def identity(self) -> str:
        """The first line of the docstring: the identity the rule applies."""
        return self.doc.strip().splitlines()[0] if self.doc.strip() else self.name

    def root_types(self):
        return self.pattern.root_types()

    def __call__(self, **bound):
        return self.fn(**bound)

    def matches(self, node):
        """Every match of the pattern at ``node`` (bindings by name)."""
        return self.pattern.all(node)

    def __repr__(self):
        return f"Rule({self.name})"


def rule(pattern: Pattern, *, name: str | None = None, phase: str = "user") -> Callable[[Callable], Rule]:
    """Make a rule from a rewrite function; its name and docstring become the rule's. ``phase`` is one of
    :data:`PHASES`."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase '{phase}'; the phases are {', '.join(PHASES)}")

    def make(fn: Callable) -> Rule:
        return Rule(name or fn.__name__, pattern, fn, inspect.getdoc(fn) or "", phase)

    return make
