from reparam.core.ops import Affine, Conv, Linear, Sum
from reparam.core.pattern import P
from reparam.core.rule import require, rule


@rule(P(Affine, P(Sum, name="total"), name="scale"))
def scale_fold(total, scale):
    """s·(Σ cᵢ·yᵢ) = Σ cᵢ·(s·yᵢ): a layer scale (or α) on a sum of conv branches moves into each branch.

    Exact always for a pure scale (no shift); fires only when every branch is a conv/linear that
    nothing else reads, so each scaled branch then folds into its weights (conv_bn_fold).
    """
    a = scale.op
    require(a.shift is None or not bool(a.shift.any()), "a shift cannot be split across branches")
    if not all(isinstance(n.op, (Conv, Linear)) and len(n.users) == 1 for n in total.inputs):
        return None
    scaled = [Affine(a.scale, None, a.axis, dtype=a.dtype, device=a.device)(n) for n in total.inputs]
    return Sum(total.op.coeffs)(*scaled)
