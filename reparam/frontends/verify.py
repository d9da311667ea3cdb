"""End-to-end verification: the fused model against the original on the same random inputs, and the one metric
every front end judges it by.

The metric (``docs/design.md``, "Verification"): per output, the largest difference over the output's
*magnitude*: the larger of its own largest value and the size of the computation behind it, read from the
original's own rounding (how far the original in its own dtype lands from its float64 result, in units of that
dtype's precision). Each output is judged on its own (a large output hides nothing), non-finite values the
original itself produces must be reproduced exactly (NaN where it has NaN, the same infinity), and the deploy
model in its own dtype is judged at that dtype's precision (``native_tolerance``).

Both models run in float64 without a float64 copy of either (``run_float64``): while one runs, every
floating-point tensor an operation reads is converted to float64 at that operation and dropped after it, so
the extra memory is that of one operation's parameters at a time, however big the model. A mismatch found
that way is confirmed on float64 copies of both models (``run(..., torch.float64)``, the reference
semantics) before it is reported, so a streamed run can never be the reason a correct model is refused.
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from reparam.frontends.module_copy import copy_modules, structure_copy

DEFAULT_TOLERANCE = 1e-9  # fused vs original, both in float64
NATIVE_ULPS = 64  # the deploy model in its own dtype: within this many units of its precision


def _to(x, dtype):
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def run(model: nn.Module, inputs: tuple, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """The model's flattened tensor outputs, optionally run on a float-``dtype`` copy of the model."""
    if dtype is not None:
        model = copy_in(model, dtype)
        inputs = tree_map(lambda x: _to(x, dtype), inputs)
    elif model.training:
        model = eval_view(model)
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
    return copy_modules(model, memo, share_graphs=True).eval()


def eval_view(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model``'s modules sharing its parameters and buffers (a forward that keeps
    state, a cache say, changes the copy, never the model)."""
    return structure_copy(model, share_graphs=True).eval()


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


_eval_view = eval_view  # the streamed runs' copy of the modules


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


# --- the metric -------------------------------------------------------------------------------------------

def precision(dtype) -> float:
    """The unit roundoff (machine epsilon) of a torch or numpy floating dtype; 0 for exact (integer, bool) ones."""
    if isinstance(dtype, torch.dtype):
        return torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    dtype = np.dtype(dtype)
    return float(np.finfo(dtype).eps) if dtype.kind == "f" else 0.0


def dtype_of(x) -> torch.dtype | np.dtype:
    return x.dtype if isinstance(x, torch.Tensor) else np.asarray(x).dtype


def native_tolerance(tolerance: float, dtypes: Sequence) -> float:
    """The error accepted of a model run in its own dtype(s): ``tolerance``, but never below NATIVE_ULPS units of
    the least precise floating dtype among ``dtypes`` (a float16 graph is not judged at float32 precision)."""
    eps = max((precision(d) for d in dtypes), default=0.0)
    return max(tolerance, NATIVE_ULPS * eps)


def _as64(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64)
    return torch.from_numpy(np.asarray(x, dtype=np.float64))


def magnitudes(want: Sequence, baseline: Sequence | None = None) -> list[float]:
    """Per output of the exact (float64) result ``want``: its magnitude, max |w|, raised to the size of the
    computation behind it when the original run in its own dtype (``baseline``) shows it: a float32 result that
    lands 1.2e-7 from the exact one came from values of size about 1 (1.2e-7 / float32's 1.19e-7), however
    small the output itself is. Non-finite positions count for neither."""
    scales = []
    for i, w in enumerate(want):
        w64 = _as64(w)
        finite = torch.isfinite(w64)
        scale = float(w64[finite].abs().max()) if bool(finite.any()) else 0.0
        if baseline is not None and i < len(baseline):
            b = baseline[i]
            eps = precision(dtype_of(b))
            b64 = _as64(b)
            if eps > 0 and b64.shape == w64.shape:
                both = finite & torch.isfinite(b64)
                if bool(both.any()):
                    noise = float((b64[both] - w64[both]).abs().max())
                    if math.isfinite(noise):
                        scale = max(scale, noise / eps)
        scales.append(scale)
    return scales


def output_errors(got: Sequence, want: Sequence, scales: Sequence[float] | None = None,
                  baseline: Sequence | None = None) -> list[float]:
    """Per output: max |got − want| / scale (``scales`` default: each output's max |want|; see ``magnitudes``).

    Where ``want`` is not finite, ``got`` must hold the same value (NaN for NaN, the same infinity): the
    original produced it, so reproducing it is no difference. Where ``want`` is finite but the original in its
    own dtype (``baseline``) overflowed, ``got`` may overflow the same way. Anything else non-finite, a shape
    or an output count that differs, is an infinite error."""
    if len(got) != len(want):
        return [math.inf]
    if scales is None:
        scales = magnitudes(want)
    errors = []
    for i, (g, w) in enumerate(zip(got, want)):
        g64, w64 = _as64(g), _as64(w)
        if g64.shape != w64.shape:
            errors.append(math.inf)
            continue
        numeric = torch.isfinite(w64)
        expected = w64
        if baseline is not None and i < len(baseline) and _as64(baseline[i]).shape == w64.shape:
            b64 = _as64(baseline[i])
            overflowed = numeric & ~torch.isfinite(b64)
            expected = torch.where(overflowed, b64, w64)
            numeric = numeric & ~overflowed
        special = ~numeric
        if bool(special.any()):
            g_s, e_s = g64[special], expected[special]
            same = (g_s == e_s) | (torch.isnan(g_s) & torch.isnan(e_s))
            if not bool(same.all()):
                errors.append(math.inf)
                continue
        if not bool(numeric.any()):
            errors.append(0.0)
            continue
        diff = float((g64[numeric] - w64[numeric]).abs().max())
        if not math.isfinite(diff):
            errors.append(math.inf)
        elif diff == 0.0:
            errors.append(0.0)
        else:
            errors.append(diff / max(float(scales[i]), 1e-300))
    return errors


def relative_error(got: Sequence, want: Sequence, scales: Sequence[float] | None = None,
                   baseline: Sequence | None = None) -> float:
    """The worst per-output error of ``got`` against ``want`` (see ``output_errors``); torch tensors or arrays."""
    return max(output_errors(got, want, scales, baseline), default=0.0)
