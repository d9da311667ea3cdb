"""reparam: a structural-reparameterization compiler for PyTorch and ONNX.

    import reparam
    deploy = reparam.fuse(model, example_inputs)                 # a numerically equivalent GraphModule
    deploy, report = reparam.fuse(model, example_inputs, report=True)
"""
from . import kernels, ops
from .api import fuse
from .errors import (CaptureError, FixpointError, ReparamError, RewriteMismatch, RuleError, VerificationError)
from .ir import Expr, Graph, Node
from .pattern import P, X
from .registry import builtin_rules, load_rule_file, select_rules
from .report import Report
from .rule import Refusal, Rule, require, rule

__version__ = "0.1.0"


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
