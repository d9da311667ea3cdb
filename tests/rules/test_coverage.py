"""Every built-in rule has its tests in one mirrored place: ``rules/<name>.py`` ↔ ``tests/rules/test_<name>.py``,
holding at least one hypothesis property test (``test_property*``, decorated with ``@given``) and at least one
trap (``test_trap*``). (``test_parity.py`` checks that each has its FX + ONNX parity case.)"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import reparam

HERE = Path(__file__).resolve().parent
RULES = sorted(r.name for r in reparam.builtin_rules())


def _tests(path: Path) -> dict[str, list[str]]:
    """Top-level test functions of ``path`` → the names of their decorators."""
    tree = ast.parse(path.read_text())
    return {f.name: [ast.unparse(d).split("(")[0] for d in f.decorator_list]
            for f in tree.body if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")}


@pytest.mark.parametrize("name", RULES)
def test_each_rule_has_its_property_test_and_its_trap_beside_it(name):
    rule = next(r for r in reparam.builtin_rules() if r.name == name)
    stem = rule.fn.__module__.rsplit(".", 1)[-1]
    path = HERE / f"test_{stem}.py"
    assert path.exists(), f"rule {name} (rules/{stem}.py) has no tests/rules/test_{stem}.py"
    tests = _tests(path)
    properties = [t for t, decorators in tests.items() if t.startswith("test_property") and "given" in decorators]
    traps = [t for t in tests if t.startswith("test_trap")]
    assert properties, f"{path.name}: no hypothesis property test (test_property*, @given)"
    assert traps, f"{path.name}: no trap test (test_trap*)"

