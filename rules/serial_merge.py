import math
from types import SimpleNamespace

from reparam.math import kernels
from reparam.core import opmath
from reparam.core.ops import Conv, Linear, Sum
from reparam.core.pattern import P, X
from reparam.core.rule import require, rule


def _absorbed_by_sibling(second, composite: Conv, x) -> bool:
    """The composite will vanish into a parallel merge: a sibling conv of x in the consumer sum covers it."""
    if len(second.users) != 1 or not isinstance(second.users[0].op, Sum):
        return False
    for n in second.users[0].inputs:
        if n is second or not isinstance(n.op, Conv) or n.inputs[0] is not x:
            continue
        s = n.op
        if s.stride == composite.stride and composite.groups % s.groups == 0 and \
                all(e >= c for e, c in zip(s.extent, composite.extent)):
            return True
    return False


def _linear_absorbed_by_sibling(second, in_features: int, x) -> bool:
    """The composite Linear will vanish into linear_sum: the consumer sum holds another Linear of x with the
    same in → out shape (a low-rank branch beside a full one, as in LoRA)."""
    if len(second.users) != 1 or not isinstance(second.users[0].op, Sum):
        return False
    shape = (second.op.out_features, in_features)
    return any(n is not second and isinstance(n.op, Linear) and n.inputs[0] is x and len(n.users) == 1
               and tuple(n.op.weight.shape) == shape for n in second.users[0].inputs)


@rule(P((Conv, Linear), P((Conv, Linear), X("x"), name="first"), name="second"))
def serial_merge(x, first, second):
    """conv₂(conv₁(x)) = conv(x): taps j·d₂·s₁ + l·d₁ accumulate W₂ⱼW₁ₗ, stride s₁s₂, bias b₂ + ΣW₂b₁.

    Covers 1×1→k×k, k×k→1×1, 1×1→1×1, separable 1×k→k×1 (also stride (1,s) then (s,1)), Linear→Linear.
    Exact when conv₂ never reads a zero-padded position of conv₁'s output that conv₁ would not have
    produced as zero: conv₂ is unpadded, or conv₁ has no bias and reads only padding there
    (kernels.serial_is_exact). Fires only when the result is not costlier than the two convs (for
    Linear→Linear: in·out ≤ in·mid + mid·out), or will be absorbed by a larger sibling kernel (a sibling
    Linear of the same shape) of the same sum.
    """
    a, b = first.op, second.op
    if isinstance(a, Linear) or isinstance(b, Linear):
        require(isinstance(a, Linear) and isinstance(b, Linear), "a conv and a linear do not compose")
        merged, apart = a.in_features * b.out_features, a.weight.numel() + b.weight.numel()
        require(merged <= apart or _linear_absorbed_by_sibling(second, a.in_features, x),
                f"the merged Linear ({a.in_features}→{b.out_features}, {merged} multiply-adds per row) would cost "
                f"more multiply-adds than the two Linears ({a.in_features}→{a.out_features}→{b.out_features}, "
                f"{apart})")
        return opmath.compose_linear(a, b)(x)
    require(a.padding_mode == b.padding_mode == "zeros", "non-zero padding modes do not compose")
    bias_zero = a.bias is None or not bool(a.bias.any())
    reason = kernels.serial_is_exact(a.kernel_size, bias_zero, a.stride, a.dilation, a.padding, b.padding)
    require(reason is None, reason or "")
    shape = _composite_shape(a, b)  # decide on cost before building the (possibly large) kernel
    cheaper = shape.macs <= opmath.macs_per_pixel(a) * math.prod(b.stride) + opmath.macs_per_pixel(b)
    require(cheaper or _absorbed_by_sibling(second, shape, x),
            "the merged conv would cost more multiply-adds than the two convs")
    return opmath.compose(a, b)(x)


def _composite_shape(a: Conv, b: Conv) -> SimpleNamespace:
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
