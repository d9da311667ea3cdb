"""The documentation cannot rot: docs/rules.md is what the rules' docstrings generate, `reparam rules` lists
the same rules and identities, and every Python block of docs/writing-rules.md runs."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reparam.cli.catalogue import render_markdown, rule_catalogue
from reparam.cli.app import app

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_rules_md_is_generated_from_the_rules():
    assert (DOCS / "rules.md").read_text(encoding="utf-8") == render_markdown(), \
        "docs/rules.md is stale: regenerate it with `python -m reparam.cli.catalogue --write`"


def test_reparam_rules_lists_the_catalogue():
    result = CliRunner().invoke(app, ["rules", "--json"])
    assert result.exit_code == 0, result.output
    listed = [(e["name"], e["identity"]) for e in json.loads(result.stdout)["rules"]]
    assert listed == [(name, identity) for name, identity, _ in rule_catalogue()]
    table = re.findall(r"^\| \d+ \| \[`(\w+)`\]\(#\w+\) \| (.*) \|$", (DOCS / "rules.md").read_text("utf-8"), re.M)
    assert [(n, i.replace("\\|", "|")) for n, i in table] == listed


# ------------------------------------------------------------------------------------- writing-rules.md
GUIDE = DOCS / "writing-rules.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", GUIDE.read_text("utf-8"), re.S | re.M)


def _file_block(name: str) -> str:
    """The Python block that starts with ``# file: NAME``."""
    found = [b for b in _blocks("python") if b.startswith(f"# file: {name}\n")]
    assert len(found) == 1, f"the guide has no single '# file: {name}' block"
    return found[0]


def test_every_python_block_of_the_guide_runs_and_its_rule_fires_on_its_target_block():
    import torch

    from reparam.core.rule import Rule
    from reparam.testing import assert_fires, count_ops

    import sys
    import types

    guide = types.ModuleType("writing_rules_guide")  # a real module: the guide's dataclasses look it up
    sys.modules[guide.__name__] = guide
    ns = guide.__dict__
    blocks = _blocks("python")
    assert len(blocks) >= 5
    for k, block in enumerate(blocks):
        exec(compile(block, f"{GUIDE}[python block {k + 1}]", "exec"), ns)
    assert ns["rep"].fired_counts()["affine_before_upsample"] == 1  # §6: the op kind added from the guide
    user_rule = ns["pointwise_through_mean"]
    assert isinstance(user_rule, Rule) and user_rule.name not in {n for n, _, _ in rule_catalogue()}
    # the guide's own run: the rule fired once on Head, the result verified in float64
    report = ns["report"]
    assert report.fired_counts()["pointwise_through_mean"] == 1
    assert report.verification.passed and report.verification.error_fp64 <= 1e-9
    # and independently, on a grouped variant of the target block
    head = ns["randomize_bn"](ns["Head"](groups=2)).eval()
    fused, _ = assert_fires(user_rule, head, torch.randn(2, 8, 7, 7), times=1)
    assert count_ops(fused)["convs"] == 0 and count_ops(fused)["linears"] == 1


def test_the_guides_command_lines_run(tmp_path, monkeypatch):
    import shlex

    import torch

    (tmp_path / "my_rules.py").write_text(_file_block("my_rules.py"), encoding="utf-8")
    head_src = re.search(r"^class Head\(nn\.Module\):\n(?:(?: .*)?\n)+", _blocks("python")[1], re.M).group(0)
    (tmp_path / "head_model.py").write_text("import torch.nn as nn\n\n\n" + head_src, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import head_model

    torch.save(head_model.Head().eval(), tmp_path / "model.pt")
    commands = [shlex.split(line.split("#")[0]) for block in _blocks("shell") for line in block.splitlines()
                if line.startswith("reparam ")]
    assert any(c[1] == "fuse" and "--rules" in c for c in commands)
    for command in commands:
        args = command[1:] + (["--json"] if command[1] in ("fuse", "inspect", "rules") else [])
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, f"{' '.join(command)}: {result.output}"
        doc = json.loads(result.stdout)
        if command[1] == "rules":
            assert doc["rules"][0]["name"] == "pointwise_through_mean" and doc["rules"][0]["user"]
        elif command[1] == "fuse":
            assert doc["report"]["fired_counts"].get("pointwise_through_mean") == 1, doc["report"]
            assert doc["report"]["verification"]["passed"]
    assert (tmp_path / "deploy.pt").exists()


# ------------------------------------------------------------------------------------- quickstart.md
def test_the_quickstart_runs_and_shows_its_real_report():
    text = (DOCS / "quickstart.md").read_text("utf-8")
    ns: dict = {"__name__": "quickstart"}
    for k, block in enumerate(re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)):
        exec(compile(block, f"docs/quickstart.md[python block {k + 1}]", "exec"), ns)
    shown = re.search(r"^```text\n(.*?)^```", text, re.S | re.M).group(1).splitlines()
    actual = str(ns["report"]).splitlines()
    # counts, rules fired and refusals are structural; the verification's error digits depend on the draw
    for line in shown:
        if not line.startswith("verification:"):
            assert line in actual, f"the quickstart shows {line!r}, the report says:\n" + "\n".join(actual)
    assert ns["report"].verification.passed


# ------------------------------------------------------------------------------------- command-line docs
FRESH = "# runs in a fresh folder\n"
ROOT = DOCS.parent


def _fresh_blocks(path: Path) -> list[str]:
    return [b for b in re.findall(r"^```(?:bash|shell)\n(.*?)^```", path.read_text("utf-8"), re.S | re.M)
            if b.startswith(FRESH)]


@pytest.mark.parametrize("doc", ["README.md", "docs/quickstart.md", "docs/cli.md"])
def test_the_command_line_examples_run_in_a_fresh_folder(doc, tmp_path):
    """Each block marked '# runs in a fresh folder' runs as a bash script in an empty folder, with the
    installed console script on PATH and no PYTHONPATH (so nothing from this repository is importable)."""
    import os
    import subprocess
    import sys

    blocks = _fresh_blocks(ROOT / doc)
    assert blocks, f"{doc} has no block marked {FRESH.strip()!r}"
    bindir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    for k, block in enumerate(blocks):
        folder = tmp_path / f"block{k}"
        folder.mkdir()
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=folder, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"{doc} block {k + 1} failed:\n{proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr, proc.stderr
        if "--trust" in block:
            assert any(p.name.startswith("deploy") for p in folder.iterdir())
