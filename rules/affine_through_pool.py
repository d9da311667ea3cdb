from reparam.core.ops import Affine, Conv, Flatten, Linear, Mean
from reparam.core.pattern import P, X
from reparam.core.rule import require, rule


@rule(P((Mean, Flatten), P(Affine, X("x"), name="bn"), name="pool", one_use=True,
        only_used_by=(Linear, Conv, Mean, Flatten)), phase="forward-fold")
def affine_through_pool(x, bn, pool):
    """mean(a(x)) = a(mean(x)), flatten(a(x)) = a'(flatten(x)): a BatchNorm moves past pooling and flattening.

    It moves toward the Linear that will absorb it (bn_prefold). Exact when the affine's axis is not reduced
    by the mean (per-channel scale commutes with averaging over other axes); for flatten, the affine is
    repeated over the merged axes.
    """
    a = bn.op
    rank = x.rank
    require(rank is not None and pool.rank is not None, "the tensor rank is unknown (pass example inputs)")
    if a.is_scalar:
        return Affine(a.scale, a.shift, None, dtype=a.dtype, device=a.device)(pool.op(x))
    axis = a.axis % rank
    if isinstance(pool.op, Mean):
        dims = {d % rank for d in pool.op.dims}
        require(axis not in dims, "the mean reduces the affine's axis")
        new_axis = axis if pool.op.keepdim else axis - sum(d < axis for d in dims)
        return Affine(a.scale, a.shift, new_axis, dtype=a.dtype, device=a.device)(pool.op(x))
    start, end = pool.op.start_dim % rank, pool.op.end_dim % rank
    if not start <= axis <= end:
        new_axis = axis if axis < start else axis - (end - start)
        return Affine(a.scale, a.shift, new_axis, dtype=a.dtype, device=a.device)(pool.op(x))
    require(axis == start, "the affine's axis is not the slowest of the flattened axes")
    repeat = 1
    for d in range(start + 1, end + 1):
        repeat *= x.shape[d]
    rep = (lambda t: t if t is None else t.repeat_interleave(repeat))
    return Affine(rep(a.scale), rep(a.shift), start, dtype=a.dtype, device=a.device)(pool.op(x))
