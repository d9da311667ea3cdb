from reparam.core import opmath
from reparam.core.ops import Affine, Conv, Linear
from reparam.core.pattern import P, X
from reparam.core.rule import require, rule


@rule(P((Conv, Linear), P(Affine, X("x"), name="bn"), name="conv"), phase="forward-fold")
def bn_prefold(x, bn, conv):
    """conv(a(x)) = conv'(x), W' = W·s[in], b' = b + Σ W·t (BatchNorm before a 1×1 conv or a Linear).

    Exact when the affine is per input channel (or a scalar) and the conv never reads zero padding
    (a padded border would see 0 where the unfused graph sees t), unless the shift is zero. Reflect,
    replicate and circular padding copy pixels, and a per-channel affine commutes with copying.
    """
    op, a = conv.op, bn.op
    rank = bn.rank
    require(rank is not None or a.is_scalar, "the tensor rank is unknown (pass example inputs)")
    channel_axis = (rank or 2) - 1 if isinstance(op, Linear) else 1
    require(a.acts_on(channel_axis, rank or 2), "the affine is not per input channel")
    require(bn.shape == x.shape, "the affine broadcasts its input to a new shape")
    if isinstance(op, Conv) and op.padding_mode == "zeros":
        shift_free = a.shift is None or not bool(a.shift.any())
        require(shift_free or not op.is_padded, "the conv zero-pads, so the BatchNorm shift would reach "
                "the border as 0 instead of t")
    return opmath.affine_before(op, a)(x)
