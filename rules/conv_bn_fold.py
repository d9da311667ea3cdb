from reparam.core import opmath
from reparam.core.ops import Affine, Conv, Linear
from reparam.core.pattern import P, X
from reparam.core.rule import require, rule


@rule(P(Affine, P((Conv, Linear), X("x"), name="conv"), name="bn"), phase="fold")
def conv_bn_fold(x, conv, bn):
    """a(conv(x)) = conv'(x), W' = W·s[out], b' = b·s + t (BatchNorm, layer scale, α·y, y + c after conv/Linear).

    Exact when the affine is per output channel (axis 1 of a conv, the last axis of a Linear) or a
    scalar, and the conv's output has no other consumer; any dims, groups, stride, padding.
    """
    channel_axis = (bn.rank or 2) - 1 if isinstance(conv.op, Linear) else 1
    require(bn.rank is not None or bn.op.is_scalar, "the tensor rank is unknown (pass example inputs)")
    require(bn.op.acts_on(channel_axis, bn.rank or 2), "the affine is not per output channel")
    require(bn.shape == conv.shape, "the affine broadcasts the conv output to a new shape")
    return opmath.affine_after(conv.op, bn.op)(x)
