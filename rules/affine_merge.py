from reparam.core.ops import Affine
from reparam.core.pattern import P, X
from reparam.core.rule import require, rule


@rule(P(Affine, P(Affine, X("x"), name="inner"), name="outer"), phase="fold")
def affine_merge(x, inner, outer):
    """a₂(a₁(x)) = a(x) with s = s₁s₂, t = t₁s₂ + t₂ (two BatchNorms, BN then a layer scale).

    Exact when both act on the same axis (or either is a scalar).
    """
    a, b = inner.op, outer.op
    require(a.is_scalar or b.is_scalar or a.axis == b.axis, "the two affines act on different axes")
    axis = a.axis if not a.is_scalar else b.axis
    scale = a.scale * b.scale
    shift = None if a.shift is None else a.shift * b.scale
    if b.shift is not None:
        shift = b.shift if shift is None else shift + b.shift
    dtype = dict(dtype=b.dtype or a.dtype, device=b.device or a.device)
    return Affine(scale, shift, axis if scale.ndim or (shift is not None and shift.ndim) else None, **dtype)(x)
