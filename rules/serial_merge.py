import math

from reparam.core import opmath
from reparam.core.ops import Conv, Linear
from reparam.core.pattern import P, X
from reparam.core.rule import require, rule

from reparam.rules._serial import composite_refusal, composite_shape


@rule(P((Conv, Linear), P((Conv, Linear), X("x"), name="first"), name="second"), phase="serial")
def serial_merge(x, first, second):
    """conv₂(conv₁(x)) = conv(x): taps j·d₂·s₁ + l·d₁ accumulate W₂ⱼW₁ₗ, stride s₁s₂, bias b₂ + ΣW₂b₁.

    Covers 1×1→k×k, k×k→1×1, 1×1→1×1, separable 1×k→k×1 (also stride (1,s) then (s,1)), Linear→Linear.
    Exact when conv₂ never reads a zero-padded position of conv₁'s output that conv₁ would not have
    produced as zero: conv₂ is unpadded, or conv₁ has no bias and reads only padding there
    (kernels.serial_is_exact). Fires only when the result is not costlier than the two convs (for
    Linear→Linear: in·out ≤ in·mid + mid·out); beside a sibling whose kernel covers it, a costlier
    composite is serial_into_sibling's.
    """
    a, b = first.op, second.op
    if isinstance(a, Linear) or isinstance(b, Linear):
        require(isinstance(a, Linear) and isinstance(b, Linear), "a conv and a linear do not compose")
        merged, apart = a.in_features * b.out_features, a.weight.numel() + b.weight.numel()
        require(merged <= apart, f"the merged Linear ({a.in_features}→{b.out_features}, {merged} multiply-adds per "
                f"row) would cost more multiply-adds than the two Linears ({a.in_features}→{a.out_features}→"
                f"{b.out_features}, {apart})")
        return opmath.compose_linear(a, b)(x)
    reason = composite_refusal(a, b)
    require(reason is None, reason or "")
    shape = composite_shape(a, b)  # decide on cost before building the (possibly large) kernel
    cheaper = shape.macs <= opmath.macs_per_pixel(a) * math.prod(b.stride) + opmath.macs_per_pixel(b)
    require(cheaper, "the merged conv would cost more multiply-adds than the two convs")
    return opmath.compose(a, b)(x)
