"""The package's layers: every import statement (at module level or inside a function) points downward, and no
two modules import each other, directly or around a cycle.

    math (kernel math) → core (ops, IR, patterns, rules API, engine) → rules (built-in) → frontends → io → cli
    → testing; errors at the bottom; front ends are peers except that ATen builds on FX.
"""
import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["reparam.errors", "reparam.math", "reparam.core", "reparam.rules", "reparam.frontends", "reparam.io",
          "reparam.cli", "reparam.testing"]
FRONTEND_PEERS = {"reparam.frontends.aten": {"reparam.frontends.fx"}}  # which front end may import which


def _modules() -> dict[str, Path]:
    found = {}
    for base, prefix in ((ROOT / "reparam", "reparam"), (ROOT / "rules", "reparam.rules")):
        for f in base.rglob("*.py"):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix] + parts)] = f
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of the package that ``name`` imports, by every import statement in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def _graph() -> nx.DiGraph:
    modules = _modules()
    g = nx.DiGraph()
    g.add_nodes_from(modules)
    for name, path in modules.items():
        g.add_edges_from((name, target) for target in _imports(name, path, set(modules)))
    return g


def _layer(module: str) -> int | None:
    return next((k for k, layer in enumerate(LAYERS) if module == layer or module.startswith(layer + ".")), None)


def test_no_import_cycles():
    cycles = [sorted(c) for c in nx.strongly_connected_components(_graph()) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def test_every_module_has_a_layer():
    assert [m for m in _graph() if m != "reparam" and _layer(m) is None] == []


def test_kernel_math_imports_nothing_of_reparam():
    g = _graph()
    assert {(a, b) for a, b in g.edges if a.startswith("reparam.math")} == set()


def _frontend(module: str) -> str | None:
    parts = module.split(".")
    return ".".join(parts[:3]) if module.startswith("reparam.frontends.") and len(parts) > 3 else None


def _violation(a: str, b: str) -> str | None:
    if b == "reparam":  # the root package: only its version string is imported from below (it imports lazily)
        return None
    if _layer(b) > _layer(a):
        return f"{a} (layer {LAYERS[_layer(a)]}) imports {b} (layer {LAYERS[_layer(b)]})"
    fa, fb = _frontend(a), _frontend(b)
    if fa and fb and fa != fb and fb not in FRONTEND_PEERS.get(fa, set()):
        return f"front end {fa} imports front end {fb}"
    return None


def test_imports_point_downward():
    assert [v for a, b in sorted(_graph().edges) if (v := _violation(a, b))] == []


def test_an_upward_import_is_seen():
    """The checker itself: an import of the CLI from the core would be reported."""
    assert _violation("reparam.core.engine", "reparam.cli.app")
    assert _violation("reparam.frontends.onnx.backend", "reparam.frontends.fx.capture")
    assert _violation("reparam.frontends.aten.backend", "reparam.frontends.fx.capture") is None
