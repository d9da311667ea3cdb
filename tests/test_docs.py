"""The documentation cannot rot: docs/rules.md is what the rules' docstrings generate, `reparam rules` lists
the same rules and identities, and every Python block of docs/writing-rules.md runs."""
from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from reparam.catalogue import render_markdown, rule_catalogue
from reparam.cli import app

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_rules_md_is_generated_from_the_rules():
    assert (DOCS / "rules.md").read_text(encoding="utf-8") == render_markdown(), \
        "docs/rules.md is stale: regenerate it with `python -m reparam.catalogue --write`"


def test_reparam_rules_lists_the_catalogue():
    result = CliRunner().invoke(app, ["rules", "--json"])
    assert result.exit_code == 0, result.output
    listed = [(e["name"], e["identity"]) for e in json.loads(result.stdout)]
    assert listed == [(name, identity) for name, identity, _ in rule_catalogue()]
    table = re.findall(r"^\| \d+ \| \[`(\w+)`\]\(#\w+\) \| (.*) \|$", (DOCS / "rules.md").read_text("utf-8"), re.M)
    assert [(n, i.replace("\\|", "|")) for n, i in table] == listed
