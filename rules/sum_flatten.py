from reparam.core.ops import Sum
from reparam.core.pattern import P
from reparam.core.rule import rule
from reparam.core.terms import nested_sum


@rule(P(Sum, name="total"))
def sum_flatten(total):
    """Σ cᵢ·(α·Σ dⱼ·yⱼ) = Σ cᵢαdⱼ·yⱼ: nested (and scaled) sums become one, so branches of one input meet.

    Exact always (up to rounding order); the inner sum and its scale must have no other consumer.
    """
    coeffs, inputs, nested = [], [], False
    for c, n in zip(total.op.coeffs, total.inputs):
        found = nested_sum(n, total)
        if found is None:
            coeffs.append(c)
            inputs.append(n)
            continue
        inner, alpha = found
        nested = True
        coeffs += [c * alpha * d for d in inner.op.coeffs]
        inputs += inner.inputs
    return Sum(tuple(coeffs))(*inputs) if nested else None
