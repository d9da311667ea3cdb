"""Finding rules: the built-in set (``rules/`` in the source tree, ``reparam.rules`` once installed) and
user rule files. Rules are tried in list order at each node; the first that applies wins."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from .errors import ReparamError
from .rule import Rule


def _rules_package() -> ModuleType:
    try:
        return importlib.import_module("reparam.rules")
    except ModuleNotFoundError:
        pass
    source = Path(__file__).resolve().parent.parent / "rules" / "__init__.py"
    if not source.exists():
        raise ReparamError("the built-in rules are missing: reinstall reparam (pip install reparam)")
    spec = importlib.util.spec_from_file_location("reparam.rules", source,
                                                  submodule_search_locations=[str(source.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["reparam.rules"] = module
    spec.loader.exec_module(module)
    return module


def builtin_rules() -> list[Rule]:
    """The built-in rules in the order the engine tries them."""
    return list(_rules_package().DEFAULT_RULES)


def rules_in(module: ModuleType) -> list[Rule]:
    """Rules a module defines: its ``RULES`` list if it has one, else every Rule at top level, in order."""
    listed = getattr(module, "RULES", None)
    if listed is None:
        return [v for v in vars(module).values() if isinstance(v, Rule)]
    where = getattr(module, "__file__", None) or module.__name__
    if not isinstance(listed, (list, tuple)):
        raise ReparamError(f"'{where}': RULES must be a list of rules, not a {type(listed).__name__}")
    for k, item in enumerate(listed):
        if not isinstance(item, Rule):
            raise ReparamError(f"'{where}': RULES[{k}] is a {type(item).__name__}, not a rule (decorate the "
                               f"function with @reparam.rule and list what the decorator returns)")
    return list(listed)


def load_rule_file(path: str | Path) -> list[Rule]:
    """Import a Python file of user rules (it runs as code: only load files you trust). The file's folder is on
    sys.path while it is imported, so it can import modules next to it."""
    path = Path(path)
    if not path.is_file():
        raise ReparamError(f"rule file '{path}' does not exist")
    spec = importlib.util.spec_from_file_location(f"reparam_user_rules_{abs(hash(str(path.resolve())))}", path)
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        raise ReparamError(f"rule file '{path}' failed to import: {type(err).__name__}: {err}") from err
    finally:
        sys.path.remove(folder)
    found = rules_in(module)
    if not found:
        raise ReparamError(f"rule file '{path}' defines no rules (decorate functions with @reparam.rule)")
    return found


def select_rules(rules: list[Rule] | None = None, extra_rules=(), disable=(), only=None) -> list[Rule]:
    """The rule list for one run: ``rules`` (default: built-in) after ``extra_rules``, minus ``disable``.
    Rule names must be unique (``disable``/``only`` and reports name rules)."""
    base = builtin_rules() if rules is None else list(rules)
    chosen = list(extra_rules) + base
    seen: set[str] = set()
    for r in chosen:
        if not isinstance(r, Rule):
            raise ReparamError(f"{r!r} is a {type(r).__name__}, not a rule (make one with @reparam.rule)")
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
