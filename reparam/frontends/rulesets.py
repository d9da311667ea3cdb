"""The rule list of one run: the built-in rules (``reparam.rules``) with a user's extra rules before them, minus
those disabled. Rules are tried in list order at each node; the first that applies wins."""
from __future__ import annotations

from reparam.core.rule import Rule
from reparam.errors import ReparamError
from reparam.rules import DEFAULT_RULES


def builtin_rules() -> list[Rule]:
    """The built-in rules in the order the engine tries them."""
    return list(DEFAULT_RULES)


def select_rules(rules: list[Rule] | None = None, extra_rules=(), disable=(), only=None) -> list[Rule]:
    """The rule list for one run: ``rules`` (default: built-in) after ``extra_rules``, minus ``disable``.
    Rule names must be unique (``disable``/``only`` and reports name rules)."""
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
    unknown = [n for n in list(disable) + list(only or []) if n not in seen]
    if unknown:
        raise ReparamError(f"unknown rule name(s): {', '.join(unknown)}; see `reparam rules` for the list")
    if only:
        chosen = [r for r in chosen if r.name in set(only)]
    return [r for r in chosen if r.name not in set(disable)]
