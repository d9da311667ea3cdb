"""Measurements shared by the RepNeXt demo and benchmark: model building, MACs, latency, errors."""
from __future__ import annotations

import copy
import statistics
import time
from typing import Callable, Sequence

import torch
import torch.nn as nn

from examples.repnext import model as repnext_model
from examples.repnext.utils import randomize_bn_stats

VARIANTS = tuple(name.removeprefix("repnext_") for name in repnext_model.REPNEXT_CONFIGS)


def build(variant: str, seed: int = 0, num_classes: int = 1000) -> nn.Module:
    """Training-time RepNeXt ``variant`` ('m0'..'m5') with seeded weights and randomized BN stats, in eval mode."""
    name = f"repnext_{variant.lower()}"
    if name not in repnext_model.REPNEXT_CONFIGS:
        raise ValueError(f"unknown RepNeXt variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    torch.manual_seed(seed)
    net = getattr(repnext_model, name)(num_classes=num_classes)
    randomize_bn_stats(net, torch.Generator().manual_seed(seed + 1))
    return net.eval()


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of every Conv2d and Linear call in one forward (forward hooks).

    conv: out.numel() · (in_channels / groups) · prod(kernel_size); linear: out.numel() · in_features."""
    total = 0

    def conv_hook(mod, _inp, out):
        nonlocal total
        k = 1
        for s in mod.kernel_size:
            k *= s
        total += out.numel() * (mod.in_channels // mod.groups) * k

    def linear_hook(mod, _inp, out):
        nonlocal total
        total += out.numel() * mod.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| / max |want|, computed in float64."""
    g, w = got.detach().double(), want.detach().double()
    return float((g - w).abs().max() / w.abs().max())


def fp64_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output when model and input are cast to float64 (the reference every error is measured against)."""
    with torch.no_grad():
        return copy.deepcopy(model).double().eval()(x.double())


def latencies(models: Sequence[Callable], x, *, threads: int = 2, rounds: int = 15, inner: int = 3,
              warmup: int = 3) -> list[float]:
    """Median seconds per call ``m(x)`` of each model (or any callable), measured interleaved in the same run.

    Each round times ``inner`` back-to-back calls of every model in turn (so drifts in machine load hit all
    models alike); the result is the median over ``rounds`` of the per-call mean. ``threads`` sets torch's
    intra-op threads for the duration (callables with their own thread pool, e.g. ONNX Runtime sessions, set
    theirs themselves)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        samples: list[list[float]] = [[] for _ in models]
        with torch.inference_mode():
            for m in models:
                for _ in range(warmup):
                    m(x)
            for _ in range(rounds):
                for i, m in enumerate(models):
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        m(x)
                    samples[i].append((time.perf_counter() - t0) / inner)
        return [statistics.median(s) for s in samples]
    finally:
        torch.set_num_threads(previous)


def median_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
