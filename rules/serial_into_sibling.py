from reparam.core import opmath
from reparam.core.ops import Conv, Linear
from reparam.core.pattern import One, P, SumOf, X
from reparam.core.rule import require, rule
from reparam.core.terms import rebuild

from reparam.rules._serial import composite_refusal, composite_shape

_CHAIN = P((Conv, Linear), P((Conv, Linear), X("x"), name="first", one_use=True), name="second", one_use=True)
_SIBLING = P((Conv, Linear), X("x"), name="sibling", one_use=True)


@rule(SumOf(One(_CHAIN, name="term"), _SIBLING), phase="normalize")
def serial_into_sibling(total, x, first, second, term, sibling, rest):
    """c·conv₂(conv₁(x)) beside conv(x) in a sum → c·conv'(x), conv' = conv₂∘conv₁ (a bottleneck or DBB 1×1 → k×k
    branch beside a k×k conv; a low-rank Linear branch beside a full one, as in LoRA).

    Exact when conv₂∘conv₁ is one conv (serial_merge's condition: conv₂ never reads a zero-padded position
    that conv₁ would not have produced as zero). Fires only when the sibling covers the composite: the same
    stride, a grouping that divides the composite's, a kernel extent at least as large per axis (for Linears:
    the same in → out shape), so the composite costs nothing once summed into the sibling's kernel.
    """
    a, b, s = first.op, second.op, sibling.op
    if isinstance(a, Linear) or isinstance(b, Linear) or isinstance(s, Linear):
        if not (isinstance(a, Linear) and isinstance(b, Linear) and isinstance(s, Linear)):
            return None
        if tuple(s.weight.shape) != (b.out_features, a.in_features):
            return None
        return rebuild(total, {term.index: (opmath.compose_linear(a, b)(x), term.coeff)})
    shape = composite_shape(a, b)
    covered = s.stride == shape.stride and shape.groups % s.groups == 0 and \
        all(e >= c for e, c in zip(s.extent, shape.extent))
    if not covered:
        return None
    reason = composite_refusal(a, b)
    require(reason is None, reason or "")
    return rebuild(total, {term.index: (opmath.compose(a, b)(x), term.coeff)})
