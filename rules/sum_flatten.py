from reparam.ops import Sum
from reparam.pattern import P
from reparam.rule import rule


@rule(P(Sum, name="total"))
def sum_flatten(total):
    """Σ cᵢ·(Σ dⱼ·yⱼ) = Σ cᵢdⱼ·yⱼ: nested sums become one, so branches of one input meet.

    Exact always (up to rounding order); the inner sum must have no other consumer (engine-checked).
    """
    coeffs, inputs, nested = [], [], False
    for c, n in zip(total.op.coeffs, total.inputs):
        if isinstance(n.op, Sum) and len(n.users) == 1 and n.shape == total.shape:
            nested = True
            coeffs += [c * d for d in n.op.coeffs]
            inputs += n.inputs
        else:
            coeffs.append(c)
            inputs.append(n)
    return Sum(tuple(coeffs))(*inputs) if nested else None
