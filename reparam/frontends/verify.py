"""End-to-end verification: the fused model against the original on the same random inputs, and the one metric
every front end judges it by.

The metric (``docs/design.md``, "Verification"): per output, the largest difference over the output's
*magnitude*: the larger of its own largest value and the size of the computation behind it, read from the
original's own rounding (how far the original in its own dtype lands from its float64 result, in units of that
dtype's precision). Each output is judged on its own (a large output hides nothing), non-finite values the
original itself produces must be reproduced exactly (NaN where it has NaN, the same infinity), and the deploy
model in its own dtype is judged at that dtype's precision (``native_tolerance``).
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map

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


def eval_view(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model``'s modules sharing its parameters and buffers (a forward that keeps
    state, a cache say, changes the copy, never the model)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo).eval()


def random_like(inputs: tuple, seed: int = 0) -> tuple:
    """Fresh random tensors with the shapes and dtypes of ``inputs`` (non-float inputs kept)."""
    gen = torch.Generator().manual_seed(seed)

    def fresh(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype).to(x.device)
        return x

    return tree_map(fresh, inputs)


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
