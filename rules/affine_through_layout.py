from reparam.core.ops import Affine, Conv, Linear, Permute
from reparam.core.pattern import P, X
from reparam.core.rule import require, rule


@rule(P(Affine, P(Permute, X("y"), name="perm"), name="bn"), phase="fold")
def affine_through_layout(y, perm, bn):
    """a(permute(y)) = permute(a'(y)): a per-channel affine after a permute (or transpose) moves before it, onto
    the axis it came from, a' acting on axis dims[k] of y when a acts on axis k of permute(y)
    (ConvNeXt / UniRepLKNet's Linear → permute(0, 3, 1, 2) → BatchNorm / layer scale).

    Always exact (a permute only moves values); fires only when y comes from a conv or Linear that nothing else
    reads and the affine lands on its channel axis (axis 1 of a conv, the last of a Linear), which then absorbs
    it (conv_bn_fold), so the affine never moves back and forth.
    """
    if not isinstance(y.op, (Conv, Linear)) or len(y.users) != 1:
        return None
    a = bn.op
    if a.is_scalar:
        return perm.op(Affine(a.scale, a.shift, None, dtype=a.dtype, device=a.device)(y))
    require(bn.rank is not None and bn.rank == len(perm.op.dims), "the tensor rank is unknown (pass example inputs)")
    require(bn.shape == perm.shape, "the affine broadcasts the permuted tensor to a new shape")
    source = perm.op.dims[a.axis % bn.rank]
    channels = bn.rank - 1 if isinstance(y.op, Linear) else 1
    require(source == channels, f"the affine acts on axis {source} of the {type(y.op).__name__.lower()} output, not its channel "
                                f"axis {channels}: the {type(y.op).__name__.lower()} could not absorb it")
    return perm.op(Affine(a.scale, a.shift, source, dtype=a.dtype, device=a.device)(y))
