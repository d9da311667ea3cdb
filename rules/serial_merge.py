import math

from reparam import kernels, opmath
from reparam.ops import Conv, Linear, Sum
from reparam.pattern import P, X
from reparam.rule import require, rule


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


@rule(P((Conv, Linear), P((Conv, Linear), X("x"), name="first"), name="second"))
def serial_merge(x, first, second):
    """conv₂(conv₁(x)) = conv(x): taps j·d₂·s₁ + l·d₁ accumulate W₂ⱼW₁ₗ, stride s₁s₂, bias b₂ + ΣW₂b₁.

    Covers 1×1→k×k, k×k→1×1, 1×1→1×1, separable 1×k→k×1 (also stride (1,s) then (s,1)), Linear→Linear.
    Exact when conv₂ never reads a zero-padded position of conv₁'s output that conv₁ would not have
    produced as zero: conv₂ is unpadded, or conv₁ has no bias and reads only padding there
    (kernels.serial_is_exact). Fires only when the result is not costlier than the two convs, or will be
    absorbed by a larger sibling kernel of the same sum.
    """
    a, b = first.op, second.op
    if isinstance(a, Linear) or isinstance(b, Linear):
        require(isinstance(a, Linear) and isinstance(b, Linear), "a conv and a linear do not compose")
        return opmath.compose_linear(a, b)(x)
    require(a.padding_mode == b.padding_mode == "zeros", "non-zero padding modes do not compose")
    bias_zero = a.bias is None or not bool(a.bias.any())
    reason = kernels.serial_is_exact(a.kernel_size, bias_zero, a.stride, a.dilation, a.padding, b.padding)
    require(reason is None, reason or "")
    composite = opmath.compose(a, b)
    cheaper = opmath.macs_per_pixel(composite) <= opmath.macs_per_pixel(a) * math.prod(b.stride) + \
        opmath.macs_per_pixel(b)
    require(cheaper or _absorbed_by_sibling(second, composite, x),
            "the merged conv would cost more multiply-adds than the two convs")
    return composite(x)
