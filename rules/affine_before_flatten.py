from reparam.core.ops import Affine, Conv, Flatten, Linear
from reparam.core.pattern import P
from reparam.core.rule import require, rule


@rule(P(Affine, P(Flatten, P((Conv, Linear), name="y", one_use=True), name="flat"), name="bn"), phase="fold")
def affine_before_flatten(y, flat, bn):
    """a(flatten(y)) = flatten(a'(y)): an affine after flattening moves before it, onto the conv or Linear
    that computed y (a BatchNorm1d over flattened tokens, as in LeViT's Linear → BN).

    Exact when the affine's axis names one axis of y: it is not the merged axis, or the axes merged into it
    all have size 1 but one (a conv's [N, C, 1, 1] output flattened to [N, C]); or the affine is a scalar.
    Fires only when y comes from a conv or Linear, which then absorbs it (conv_bn_fold).
    """
    a = bn.op
    require(y.rank is not None and bn.rank is not None, "the tensor rank is unknown (pass example inputs)")
    if a.is_scalar:
        return flat.op(Affine(a.scale, a.shift, None, dtype=a.dtype, device=a.device)(y))
    start, end = flat.op.start_dim % y.rank, flat.op.end_dim % y.rank
    axis = a.axis % bn.rank
    if axis == start:  # the merged axis: one axis of y only if the others merged into it have size 1
        wide = [k for k in range(start, end + 1) if y.shape[k] != 1]
        require(len(wide) <= 1, "the affine acts along the flattened axis, which mixes several axes of the input")
        source_axis = wide[0] if wide else start
    else:
        source_axis = axis if axis < start else axis + (end - start)
    return flat.op(Affine(a.scale, a.shift, source_axis, dtype=a.dtype, device=a.device)(y))
