"""reparam: a structural-reparameterization compiler for PyTorch and ONNX.

    import reparam
    deploy = reparam.fuse(model, example_inputs)                 # a numerically equivalent model
    deploy, report = reparam.fuse(model, example_inputs, report=True)

The layers, each importing only those below it: ``reparam.math`` (kernel math) → ``reparam.core`` (ops, IR,
patterns, rules, engine) → ``reparam.rules`` (the built-in rules) → ``reparam.frontends`` (torch.fx,
torch.export, ONNX) → ``reparam.io`` (loading, saving) → ``reparam.cli``. The names below are loaded on first
use, so ``import reparam`` (and ``reparam --version``) stays cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute; None for the module itself)
_PUBLIC = {
    "fuse": ("reparam.frontends.fx.backend", "fuse"),
    "fuse_exported": ("reparam.frontends.aten.backend", "fuse_exported"),
    "fuse_onnx": ("reparam.frontends.onnx.backend", "fuse_onnx"),
    "rule": ("reparam.core.rule", "rule"),
    "require": ("reparam.core.rule", "require"),
    "Refusal": ("reparam.core.rule", "Refusal"),
    "Rule": ("reparam.core.rule", "Rule"),
    "P": ("reparam.core.pattern", "P"),
    "X": ("reparam.core.pattern", "X"),
    "Expr": ("reparam.core.expr", "Expr"),
    "Graph": ("reparam.core.ir", "Graph"),
    "Node": ("reparam.core.ir", "Node"),
    "Report": ("reparam.core.report", "Report"),
    "ops": ("reparam.core.ops", None),
    "opmath": ("reparam.core.opmath", None),
    "terms": ("reparam.core.terms", None),
    "kernels": ("reparam.math.kernels", None),
    "vocabulary": ("reparam.core.vocabulary", None),
    "builtin_rules": ("reparam.frontends.rulesets", "builtin_rules"),
    "select_rules": ("reparam.frontends.rulesets", "select_rules"),
    "load_rule_file": ("reparam.core.registry", "load_rule_file"),
    "ReparamError": ("reparam.errors", "ReparamError"),
    "CaptureError": ("reparam.errors", "CaptureError"),
    "FixpointError": ("reparam.errors", "FixpointError"),
    "RewriteMismatch": ("reparam.errors", "RewriteMismatch"),
    "RuleError": ("reparam.errors", "RuleError"),
    "VerificationError": ("reparam.errors", "VerificationError"),
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    try:
        module, attribute = _PUBLIC[name]
    except KeyError:
        raise AttributeError(f"module 'reparam' has no attribute '{name}'") from None
    value = importlib.import_module(module)
    value = value if attribute is None else getattr(value, attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
