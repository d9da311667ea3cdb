"""reparam: a structural-reparameterization compiler for PyTorch and ONNX.

    import reparam
    deploy = reparam.fuse(model, example_inputs)                 # a numerically equivalent GraphModule
    deploy, report = reparam.fuse(model, example_inputs, report=True)

The names below are imported on first use (PEP 562), so ``import reparam`` (and ``reparam --version``) does not
import torch until something needs it.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "fuse": ".api", "CaptureError": ".errors", "FixpointError": ".errors", "ReparamError": ".errors",
    "RewriteMismatch": ".errors", "RuleError": ".errors", "VerificationError": ".errors", "Expr": ".ir",
    "Graph": ".ir", "Node": ".ir", "P": ".pattern", "X": ".pattern", "builtin_rules": ".registry",
    "load_rule_file": ".registry", "select_rules": ".registry", "Report": ".report", "Refusal": ".rule",
    "Rule": ".rule", "require": ".rule", "rule": ".rule",
}
_SUBMODULES = {"kernels", "ops"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'reparam' has no attribute '{name}'")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)


def fuse_onnx(*args, **kwargs):
    """Fuse an ONNX model (see :func:`reparam.onnx_backend.fuse_onnx`)."""
    from .onnx_backend import fuse_onnx as _fuse_onnx

    return _fuse_onnx(*args, **kwargs)


def fuse_exported(*args, **kwargs):
    """Fuse a torch.export program (see :func:`reparam.export_backend.fuse_exported`)."""
    from .export_backend import fuse_exported as _fuse_exported

    return _fuse_exported(*args, **kwargs)


__all__ = ["fuse", "fuse_onnx", "fuse_exported", "rule", "require", "Refusal", "Rule", "P", "X", "ops", "kernels",
           "Expr", "Graph", "Node", "builtin_rules", "load_rule_file", "select_rules", "Report", "ReparamError",
           "CaptureError", "FixpointError", "RewriteMismatch", "RuleError", "VerificationError"]
