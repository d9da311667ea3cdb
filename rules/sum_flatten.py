from reparam.ops import Affine, Sum
from reparam.pattern import P
from reparam.rule import rule


def _scalar_of(node):
    """α when ``node`` is α·y (a scalar affine without shift) of a sum y that nothing else reads."""
    op = node.op
    if isinstance(op, Affine) and op.is_scalar and (op.shift is None or not bool(op.shift.any())) \
            and len(node.users) == 1 and isinstance(node.inputs[0].op, Sum):
        return float(op.scale)
    return None


@rule(P(Sum, name="total"))
def sum_flatten(total):
    """Σ cᵢ·(α·Σ dⱼ·yⱼ) = Σ cᵢαdⱼ·yⱼ: nested (and scaled) sums become one, so branches of one input meet.

    Exact always (up to rounding order); the inner sum and its scale must have no other consumer.
    """
    coeffs, inputs, nested = [], [], False
    for c, n in zip(total.op.coeffs, total.inputs):
        alpha = _scalar_of(n)
        inner = n.inputs[0] if alpha is not None else n
        alpha = 1.0 if alpha is None else alpha
        if isinstance(inner.op, Sum) and len(inner.users) == 1 and inner.shape == total.shape:
            nested = True
            coeffs += [c * alpha * d for d in inner.op.coeffs]
            inputs += inner.inputs
        else:
            coeffs.append(c)
            inputs.append(n)
    return Sum(tuple(coeffs))(*inputs) if nested else None
