"""The rule catalogue: every rule's name, the identity it applies (first docstring line) and its full doc.

``reparam rules`` prints it; ``render_markdown()`` generates docs/rules.md from the same data, so the
documentation cannot drift from the code.
"""
from __future__ import annotations

from typing import Sequence

from reparam.frontends.rulesets import builtin_rules
from reparam.core.rule import Rule


def rule_catalogue(rules: Sequence[Rule] | None = None) -> list[tuple[str, str, str]]:
    """``(name, identity, doc)`` for ``rules`` (default: the built-in rules), in the order they are tried."""
    chosen = builtin_rules() if rules is None else list(rules)
    return [(r.name, r.identity, r.doc.strip()) for r in chosen]


def where(rule: Rule) -> str | None:
    """Where a built-in rule and its tests live: ``rules/<file>.py`` and ``tests/rules/test_<file>.py``."""
    module = getattr(rule.fn, "__module__", "")
    if not module.startswith("reparam.rules."):
        return None
    stem = module.rsplit(".", 1)[-1]
    return f"Source: `rules/{stem}.py` · tests: `tests/rules/test_{stem}.py` · phase: `{rule.phase}`"


def render_markdown(rules: Sequence[Rule] | None = None) -> str:
    """A Markdown page: a summary table (name → identity) then one section per rule with its full doc."""
    chosen = builtin_rules() if rules is None else list(rules)
    entries = rule_catalogue(chosen)
    lines = ["# Built-in rules", "",
             "Generated from the rules' docstrings by `reparam.cli.catalogue.render_markdown()` "
             "(`reparam rules` prints the same list). The rules are grouped in phases (canonicalize, fold, normalize, "
             "merge, serial, forward-fold): the earliest phase with pending nodes acts, and within a phase the engine "
             "tries the rules in this order at each node; the first that applies wins. Each rule's source and tests "
             "sit side by side: `rules/<file>.py` and `tests/rules/test_<file>.py`.", "",
             "| # | rule | identity |", "|---|------|----------|"]
    for i, (name, identity, _) in enumerate(entries, 1):
        lines.append(f"| {i} | [`{name}`](#{name}) | {_cell(identity)} |")
    for rule, (name, identity, doc) in zip(chosen, entries):
        lines += ["", f"## {name}", "", doc or identity]
        if where(rule):
            lines += ["", where(rule)]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


DOC_PATH = "docs/rules.md"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m reparam.cli.catalogue`` prints docs/rules.md; ``--write [PATH]`` writes it (default docs/rules.md)."""
    import sys
    from pathlib import Path

    args = list(sys.argv[1:] if argv is None else argv)
    text = render_markdown()
    if args and args[0] == "--write":
        path = Path(args[1] if len(args) > 1 else DOC_PATH)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path} ({len(rule_catalogue())} rules)")
    elif args:
        print("usage: python -m reparam.cli.catalogue [--write [PATH]]", file=sys.stderr)
        return 2
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
