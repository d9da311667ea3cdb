from reparam.core.ops import Affine, Conv, Linear, Sum
from reparam.core.pattern import Each, P
from reparam.core.rule import require, rule


@rule(P(Affine, P(Sum, Each(P((Conv, Linear), one_use=True)), name="total"), name="scale"), phase="fold")
def scale_fold(total, scale):
    """s·(Σ cᵢ·yᵢ) = Σ cᵢ·(s·yᵢ): a layer scale (or α) on a sum of conv branches moves into each branch.

    Exact always for a pure scale (no shift); fires only when every branch is a conv/linear that
    nothing else reads, so each scaled branch then folds into its weights (conv_bn_fold).
    """
    a = scale.op
    require(a.shift is None or not bool(a.shift.any()), "a shift cannot be split across branches")
    scaled = [Affine(a.scale, None, a.axis, dtype=a.dtype, device=a.device)(n) for n in total.inputs]
    return Sum(total.op.coeffs)(*scaled)
