"""End-to-end verification: the fused model against the original on the same random inputs.

Both models run in float64 without a float64 copy of either (``run_float64``): while one runs, every
floating-point tensor an operation reads is converted to float64 at that operation and dropped after it, so
the extra memory is that of one operation's parameters at a time, however big the model. A mismatch found
that way is confirmed on float64 copies of both models (``run(..., torch.float64)``, the reference
semantics) before it is reported, so a streamed run can never be the reason a correct model is refused.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

DEFAULT_TOLERANCE = 1e-9


def _to(x, dtype):
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def run(model: nn.Module, inputs: tuple, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """The model's flattened tensor outputs, optionally run on a float-``dtype`` copy of the model."""
    if dtype is not None:
        model = copy_in(model, dtype)
        inputs = tree_map(lambda x: _to(x, dtype), inputs)
    elif model.training:
        model = copy.deepcopy(model).eval()
    with torch.no_grad():
        out = model(*inputs)
    leaves, _ = tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def copy_in(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """An eval-mode copy of ``model`` whose floating-point parameters and buffers are ``dtype`` tensors,
    each converted once (no intermediate copy in the old dtype)."""
    memo: dict[int, torch.Tensor] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in memo:
            new = t.detach().to(dtype) if t.is_floating_point() else t.detach().clone()
            if new.data_ptr() == t.data_ptr():
                new = new.clone()
            memo[id(t)] = nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new
    return copy.deepcopy(model, memo).eval()


def relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """max |got − want| / max |want| over all outputs (shapes must agree)."""
    if len(got) != len(want):
        return float("inf")
    worst = 0.0
    for g, w in zip(got, want):
        if g.shape != w.shape:
            return float("inf")
        w64, g64 = w.detach().double().cpu(), g.detach().double().cpu()
        scale = float(w64.abs().max()) if w64.numel() else 0.0
        diff = float((g64 - w64).abs().max()) if w64.numel() else 0.0
        if diff != diff:  # NaN
            return float("inf")
        worst = max(worst, diff / max(scale, 1e-30))
    return worst


def random_like(inputs: tuple, seed: int = 0) -> tuple:
    """Fresh random tensors with the shapes and dtypes of ``inputs`` (non-float inputs kept)."""
    gen = torch.Generator().manual_seed(seed)

    def fresh(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype).to(x.device)
        return x

    return tree_map(fresh, inputs)


# reads of a tensor's metadata: answered from the tensor as it is (a float64 copy would give the same answer)
_METADATA = frozenset({
    "shape", "device", "ndim", "requires_grad", "is_cuda", "is_cpu", "is_meta", "layout", "names", "is_leaf",
    "grad_fn", "is_sparse", "is_quantized", "is_mkldnn", "is_nested", "size", "dim", "ndimension", "numel",
    "nelement", "stride", "is_contiguous", "is_floating_point", "is_complex", "storage_offset", "get_device",
    "__len__", "__hash__", "data_ptr", "untyped_storage", "_is_view", "is_inference"})


def _name(func) -> str:
    owner = getattr(func, "__self__", None)  # a property getter is the descriptor's bound __get__
    if owner is not None and type(owner).__name__ == "getset_descriptor":
        return owner.__name__
    return getattr(func, "__name__", "")


def _in_place(name: str, kwargs: dict) -> bool:
    return ("out" in kwargs or name == "__setitem__" or name.startswith("__i")
            or (name.endswith("_") and not name.endswith("__")))


def _f64(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64:
        return x.detach().to(torch.float64)
    return x


def _needs_f64(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64


class Float64Stream(TorchFunctionMode):
    """While active, every operation reads its floating-point tensor arguments (parameters, buffers,
    constants) as float64 copies made for that operation alone; ``t.dtype`` of a floating-point tensor
    reads float64. In-place operations are left alone (their target must stay the tensor it is), and so are
    reads of metadata. The same arithmetic as running on a float64 copy of the model (float32/float16/bfloat16
    values are exact in float64), with one operation's copies alive at a time.

    The copies of CPU tensors are written into one scratch buffer, reused from operation to operation (as
    big as the largest operation's arguments): fresh memory is slow to touch, and a model's parameters are
    read once per run. An output that would share the buffer (a view of an argument) is copied out."""

    def __init__(self):
        super().__init__()
        self.scratch: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        if name == "dtype" and args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            return torch.float64
        if name in _METADATA or _in_place(name, kwargs):
            return func(*args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        todo = [x for x in leaves if _needs_f64(x)]
        if not todo:
            return func(*args, **kwargs)
        converted = self._convert(todo)
        args, kwargs = spec.unflatten([converted.get(id(x), x) if _needs_f64(x) else x for x in leaves])
        del converted, todo, leaves
        out = func(*args, **kwargs)
        if self.scratch is not None:
            ptr = self.scratch.untyped_storage().data_ptr()
            out = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) and t.device.type == "cpu"
                           and t.untyped_storage().data_ptr() == ptr else t, out)
        return out

    def _convert(self, tensors: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        unique = list({id(t): t for t in tensors}.values())
        on_cpu = [t for t in unique if t.device.type == "cpu"]
        need = sum(t.numel() for t in on_cpu)
        if on_cpu and (self.scratch is None or self.scratch.numel() < need):
            self.scratch = None  # free the old buffer first
            self.scratch = torch.empty(need, dtype=torch.float64)
        out, offset = {}, 0
        for t in unique:
            if t.device.type != "cpu":
                out[id(t)] = t.detach().to(torch.float64)
                continue
            out[id(t)] = self.scratch[offset:offset + t.numel()].view(t.shape).copy_(t.detach())
            offset += t.numel()
        return out


def _eval_view(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model``'s modules sharing its parameters and buffers (a forward that keeps
    state, a cache say, changes the copy, never the model)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo).eval()


def run_float64(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    """The model's flattened tensor outputs computed in float64, streaming its tensors (``Float64Stream``)
    instead of copying the model: the same values as ``run(model, inputs, torch.float64)``."""
    inputs = tree_map(lambda x: _to(x, torch.float64), inputs)
    model = _eval_view(model)
    with torch.no_grad(), Float64Stream():
        out = model(*inputs)
    leaves, _ = tree_flatten(out)
    return [_f64(t) for t in leaves if isinstance(t, torch.Tensor)]


def outputs_float64(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    """``run_float64``, or (if the model cannot run streamed) ``run`` on a float64 copy."""
    try:
        return run_float64(model, inputs)
    except Exception:  # noqa: BLE001 - the copy is the reference; an error there is the caller's to see
        return run(model, inputs, torch.float64)


def float64_error(original: nn.Module, fused64: nn.Module, probe: tuple, tolerance: float):
    """Relative float64 error of ``fused64`` against ``original`` on ``probe`` and the original's float64
    outputs. Both run streamed; an error above ``tolerance`` is measured again on float64 copies of both
    (the reference), which is what is returned then."""
    want = outputs_float64(original, probe)
    err = relative_error(outputs_float64(fused64, probe), want)
    if err <= tolerance:
        return err, want
    want = run(original, probe, torch.float64)
    return relative_error(run(fused64, probe, torch.float64), want), want
