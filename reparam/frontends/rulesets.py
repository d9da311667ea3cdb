"""The rule list of one run: the built-in rules (``reparam.rules``) with a user's extra rules before them, minus
those disabled. Each rule names its phase; the engine keeps earlier phases at their fixpoint before a later one
acts (reparam.core.rule.PHASES), and within a phase tries rules in list order at each node."""
from __future__ import annotations

from reparam.core.rule import PHASES, Rule
from reparam.errors import ReparamError
from reparam.rules import DEFAULT_RULES


def builtin_rules() -> list[Rule]:
    """The built-in rules, phase by phase, in the order the engine tries them."""
    return sorted(DEFAULT_RULES, key=lambda r: PHASES.index(r.phase))


def phases(rules: list[Rule] | None = None) -> dict[str, list[str]]:
    """Phase name → the names of its rules (built-in by default), in the engine's order."""
    chosen = builtin_rules() if rules is None else list(rules)
    return {p: [r.name for r in chosen if r.phase == p] for p in PHASES if any(r.phase == p for r in chosen)}


def select_rules(rules: list[Rule] | None = None, extra_rules=(), disable=(), only=None) -> list[Rule]:
    """The rule list for one run: ``rules`` (default: built-in) after ``extra_rules``, minus ``disable``.
    ``disable`` and ``only`` take rule names or phase names (all the rules of that phase). Rule names must be
    unique (``disable``/``only`` and reports name rules)."""
    base = builtin_rules() if rules is None else list(rules)
    chosen = list(extra_rules) + base
    seen: set[str] = set()
    for r in chosen:
        if not isinstance(r, Rule):
            raise ReparamError(f"{r!r} is a {type(r).__name__}, not a rule (make one with @reparam.core.rule)")
        if r.name in seen:
            raise ReparamError(f"two rules are named '{r.name}': rule names must be unique; rename one (a user "
                               f"rule may not reuse a built-in name, see `reparam rules`)")
        seen.add(r.name)
    by_phase = {p: {r.name for r in chosen if r.phase == p} for p in PHASES}

    def names(given) -> set[str]:
        out: set[str] = set()
        for n in given:
            out |= by_phase[n] if n in by_phase and n not in seen else {n}
        return out

    unknown = [n for n in list(disable) + list(only or []) if n not in seen and n not in by_phase]
    if unknown:
        raise ReparamError(f"unknown rule name(s): {', '.join(unknown)}; see `reparam rules` for the list (a phase "
                           f"name, one of {', '.join(PHASES)}, selects all its rules)")
    if only:
        keep = names(only)
        chosen = [r for r in chosen if r.name in keep]
    drop = names(disable)
    return [r for r in chosen if r.name not in drop]
