from reparam.core.ops import Affine, Cat, Conv
from reparam.core.pattern import Each, P
from reparam.core.rule import require, rule


@rule(P(Affine, P(Cat, Each(P(Conv, one_use=True)), name="cat"), name="bn"), phase="fold")
def concat_affine_split(cat, bn):
    """a(cat(y₁, …, yₙ)) = cat(a₁(y₁), …, aₙ(yₙ)) with aᵢ the slice of the affine for yᵢ's channels.

    Exact always for a per-channel affine on the concatenated axis; fires only when every yᵢ is a
    conv whose output nothing else reads, so each slice then folds into its conv (conv_bn_fold).
    """
    a = bn.op
    rank = cat.rank
    require(rank is not None, "the tensor rank is unknown (pass example inputs)")
    require(a.is_scalar or (a.axis % rank == cat.op.dim % rank), "the affine is not on the concatenated axis")
    parts, start = [], 0
    for n in cat.inputs:
        size = n.shape[cat.op.dim % rank] if n.shape else None
        require(size is not None, "a concatenated tensor's size is unknown")
        take = (lambda t: t if t is None or t.ndim == 0 else t[start:start + size])
        parts.append(Affine(take(a.scale), take(a.shift), a.axis, dtype=a.dtype, device=a.device)(n))
        start += size
    return Cat(cat.op.dim)(*parts)
