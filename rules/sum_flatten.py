from reparam.core.ops import Affine, Sum
from reparam.core.pattern import Many, P, SumOf
from reparam.core.rule import rule


def _pure_scalar(a: Affine) -> bool:
    return a.is_scalar and (a.shift is None or not bool(a.shift.any()))


_INNER = P(Sum, name=None, one_use=True)
_NESTED = _INNER | P(Affine, _INNER, one_use=True, where=_pure_scalar)


@rule(SumOf(Many(_NESTED, name="nested")), phase="canonicalize")
def sum_flatten(total, nested, rest):
    """Σ cᵢ·(α·Σ dⱼ·yⱼ) = Σ cᵢαdⱼ·yⱼ: nested (and scaled) sums become one, so branches of one input meet.

    Exact always (up to rounding order); the inner sum and its scale must have no other consumer, and the
    inner sum has the outer one's shape (it is not broadcast).
    """
    expand = {}
    for t in nested:
        inner, alpha = (t.node.inputs[0], float(t.node.op.scale)) if isinstance(t.node.op, Affine) else (t.node, 1.0)
        if inner.shape == total.shape:
            expand[t.index] = (inner, alpha)
    if not expand:
        return None
    coeffs, inputs = [], []
    for k, (c, n) in enumerate(zip(total.op.coeffs, total.inputs)):
        if k not in expand:
            coeffs.append(c)
            inputs.append(n)
            continue
        inner, alpha = expand[k]
        coeffs += [c * alpha * d for d in inner.op.coeffs]
        inputs += inner.inputs
    return Sum(tuple(coeffs))(*inputs)
