"""What serial_merge and serial_into_sibling share: whether conv₂∘conv₁ is one conv, and its shape without its kernel."""
from __future__ import annotations

import math
from types import SimpleNamespace

from reparam.math import kernels
from reparam.core.ops import Conv


def composite_refusal(a: Conv, b: Conv) -> str | None:
    """Why b(a(x)) is not one conv (None when it is): non-zero padding modes, or b reads a zero-padded
    position of a's output that a would not have produced as zero (kernels.serial_is_exact)."""
    if not a.padding_mode == b.padding_mode == "zeros":
        return "non-zero padding modes do not compose"
    bias_zero = a.bias is None or not bool(a.bias.any())
    return kernels.serial_is_exact(a.kernel_size, bias_zero, a.stride, a.dilation, a.padding, b.padding)


def composite_shape(a: Conv, b: Conv) -> SimpleNamespace:
    """groups, stride, extent and multiply-adds per output pixel of ``opmath.compose(a, b)``, without its kernel
    (the kernel has taps j·d₂·s₁ + l·d₁ in units of their gcd, as in kernels.compose_serial)."""
    g = math.gcd(a.groups, b.groups)
    size = []
    for k1, k2, d1, d2, s1 in zip(a.kernel_size, b.kernel_size, a.dilation, b.dilation, a.stride):
        steps = ([d2 * s1] if k2 > 1 else []) + ([d1] if k1 > 1 else [])
        d = math.gcd(*steps) if steps else 1
        size.append((k2 - 1) * (d2 * s1 // d) + (k1 - 1) * (d1 // d) + 1)
    extent = tuple((e2 - 1) * s1 + e1 for e1, e2, s1 in zip(a.extent, b.extent, a.stride))
    return SimpleNamespace(groups=g, stride=tuple(s1 * s2 for s1, s2 in zip(a.stride, b.stride)), extent=extent,
                           macs=b.out_channels * (a.in_channels // g) * math.prod(size))
