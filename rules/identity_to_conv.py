from reparam.core import opmath
from reparam.core.ops import Affine, Conv
from reparam.core.pattern import One, P, SumOf, X
from reparam.core.rule import rule
from reparam.core.terms import rebuild

_CONV = P(Conv, X("x"), name="conv")
# x itself as a term (x may be any op, even a conv: x = conv0(y); x + conv(x)), or a(x) that only the sum reads
_PLAIN = SumOf(_CONV, One(X("x"), name="skip"))
_AFFINE = SumOf(_CONV, One(P(Affine, X("x"), name="a", one_use=True), name="skip"))


@rule(_PLAIN | _AFFINE, phase="normalize")
def identity_to_conv(total, x, conv, skip, rest, a=None):
    """x, a(x) or α·x beside conv(x) in a sum → a 1-tap conv: W[c, c mod (C/g)] = s_c, b = t (RepVGG/MobileOne skip).

    Exact when the sibling conv maps C channels to C with stride 1 (then the identity kernel exists
    in its grouping g and the sum's shapes agree). Residual x + conv(x) is the same rewrite.
    """
    like = conv.op
    if not (like.in_channels == like.out_channels == x.channels and all(s == 1 for s in like.stride)):
        return None
    affine = None
    if a is not None:
        if not (a.rank and a.op.acts_on(1, a.rank)):  # per channel (axis 1) or a scalar
            return None
        affine = a.op
    ident = opmath.identity_conv(like.in_channels, like.groups, like.nd, like, affine=affine)
    return rebuild(total, {skip.index: (ident(x), skip.coeff)})
