"""Finding rules in Python modules and user rule files (``--rules my_rules.py``)."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from reparam.errors import ReparamError
from reparam.core.rule import Rule


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
                               f"function with @reparam.core.rule and list what the decorator returns)")
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
        raise ReparamError(f"rule file '{path}' defines no rules (decorate functions with @reparam.core.rule)")
    return found
