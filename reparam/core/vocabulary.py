"""The open vocabulary: how each front end reads a source op as an IR op (recognizers) and writes an IR op back
(emitters). Built-in op kinds are registered here exactly as a user's are: call these from a rules file
(``--rules my_rules.py``) or from Python before fusing, and reparam reads and writes the new kind; no file of
reparam is edited.

Recognizers return ``(op, data_inputs)``, or None to leave the source op opaque (kept as it was). They may
raise TypeError/ValueError/IndexError/KeyError/AttributeError for an unexpected call: that too means opaque.

- ``fx_module(*classes)``: ``fn(ctx, node, module) -> (op, [input fx nodes]) | None`` for a ``call_module`` of an
  instance of one of ``classes`` (or a subclass; the most derived registered class is tried first).
- ``fx_function(*targets)``: ``fn(ctx, node, args, kwargs)`` for a ``call_function`` of one of ``targets``.
- ``fx_method(*names)``: ``fn(ctx, node, args, kwargs)`` for a ``call_method`` (``args[0]`` is the tensor).
- ``aten(*overloads)``: ``fn(ctx, node, a)`` for a torch.export ATen call, ``a`` its arguments by schema name
  (defaults filled in).
- ``onnx_op(*op_types, domain="")``: ``fn(ctx, node, k) -> (op, [input gs tensors]) | None`` for output ``k`` of an
  onnx-graphsurgeon node.
- ``fx_emitter(op_class)``: ``fn(ctx, node, op, xs) -> fx.Node`` writes a new ``op`` (IR ``node``) on FX inputs ``xs``.
- ``onnx_emitter(op_class)``: ``fn(ctx, node, op, xs, out) -> gs.Variable``; ``out`` is the name the result must
  carry, or None.

The ``ctx`` objects are the front ends' importers and exporters; what they offer recognizers and emitters is
documented on them (``reparam.frontends.fx.importer.FxImporter``, ``...fx.exporter.FxExporter``,
``...onnx.importer.OnnxImporter``, ``...onnx.exporter.OnnxExporter``) and in docs/writing-rules.md.
A recognizer registered later for the same key is tried first; when it returns None the earlier one is tried
(a user's recognizer may handle some calls of a built-in target and leave the others). An emitter registered later
for the same op class replaces the earlier one.
"""
from __future__ import annotations

from typing import Any, Callable

FX_MODULES: dict[type, Callable] = {}
FX_FUNCTIONS: dict[Any, Callable] = {}
FX_METHODS: dict[str, Callable] = {}
FX_SPLITS: dict[Any, Callable] = {}
ONNX_OPS: dict[tuple[str, str], Callable] = {}
FX_EMITTERS: dict[type, Callable] = {}
ONNX_EMITTERS: dict[type, Callable] = {}


def _register(table: dict, keys, fn: Callable | None, chain: bool = True):
    def add(f: Callable) -> Callable:
        for k in keys:
            table[k] = _first_of(f, table[k]) if chain and k in table else f
        return f
    return add if fn is None else add(fn)


def _first_of(new: Callable, old: Callable) -> Callable:
    """A recognizer trying ``new``, then ``old`` when ``new`` gives None."""
    def recognize(*args):
        found = new(*args)
        return found if found is not None else old(*args)
    return recognize


def fx_module(*classes: type, fn: Callable | None = None):
    """Register ``fn(ctx, node, module)`` as the recognizer of calls to modules of ``classes`` (a decorator)."""
    return _register(FX_MODULES, classes, fn)


def fx_function(*targets, fn: Callable | None = None):
    """Register ``fn(ctx, node, args, kwargs)`` as the recognizer of ``call_function`` nodes of ``targets``."""
    return _register(FX_FUNCTIONS, targets, fn)


def fx_method(*names: str, fn: Callable | None = None):
    """Register ``fn(ctx, node, args, kwargs)`` as the recognizer of ``call_method`` nodes named ``names``."""
    return _register(FX_METHODS, names, fn)


def fx_split(*targets, fn: Callable | None = None):
    """Register ``fn(ctx, node) -> (x, dim, sizes) | None`` for a chunk/split target whose getitems become Slices."""
    return _register(FX_SPLITS, targets, fn)


def aten(*overloads, fn: Callable | None = None):
    """Register ``fn(ctx, node, a)`` for ATen ``overloads`` (``torch.ops.aten.x.y``); ``a``: arguments by name."""
    def add(f: Callable) -> Callable:
        for o in overloads:
            _register(FX_FUNCTIONS, [o], _by_schema(o, f))
        return f
    return add if fn is None else add(fn)


def onnx_op(*op_types: str, domain: str = "", fn: Callable | None = None):
    """Register ``fn(ctx, node, k)`` as the recognizer of output ``k`` of ONNX nodes of ``op_types``."""
    return _register(ONNX_OPS, [(_domain(domain), t) for t in op_types], fn)


def fx_emitter(op_class: type, fn: Callable | None = None):
    """Register ``fn(ctx, node, op, xs)`` as the FX writer of new ops of ``op_class`` (and its subclasses)."""
    return _register(FX_EMITTERS, [op_class], fn, chain=False)


def onnx_emitter(op_class: type, fn: Callable | None = None):
    """Register ``fn(ctx, node, op, xs, out)`` as the ONNX writer of new ops of ``op_class`` (and subclasses)."""
    return _register(ONNX_EMITTERS, [op_class], fn, chain=False)


# --- lookups (the front ends') ----------------------------------------------------------------------------
def by_class(table: dict[type, Callable], cls: type) -> Callable | None:
    """The entry of the most derived class of ``cls``'s MRO in ``table``."""
    for c in cls.__mro__:
        if c in table:
            return table[c]
    return None


def onnx_recognizer(domain: str | None, op_type: str) -> Callable | None:
    return ONNX_OPS.get((_domain(domain), op_type))


def _domain(domain: str | None) -> str:
    return "" if domain in (None, "", "ai.onnx") else domain


# --- ATen argument normalization --------------------------------------------------------------------------
def arguments(f, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by schema name, defaults filled in."""
    out: dict[str, Any] = {}
    schema = f._schema.arguments
    for k, arg in enumerate(schema):
        if k < len(args):
            out[arg.name] = args[k]
        elif arg.name in kwargs:
            out[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    if len(args) > len(schema) or set(kwargs) - {a.name for a in schema}:
        raise TypeError(f"unexpected arguments for {f}")
    return out


def _by_schema(f, handler: Callable) -> Callable:
    """An FX recognizer for ATen overload ``f``: its arguments by schema name, then ``handler``."""
    def recognize(ctx, node, args, kwargs):
        return handler(ctx, node, arguments(f, args, kwargs))
    return recognize
