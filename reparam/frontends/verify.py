"""End-to-end verification: the fused model against the original on the same random inputs."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
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
