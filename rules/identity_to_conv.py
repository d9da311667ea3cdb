from reparam.core import opmath
from reparam.core.ops import Conv, Sum
from reparam.core.pattern import P
from reparam.core.rule import rule
from reparam.core.terms import affine_source, by_source, rebuild, sum_terms


@rule(P(Sum, name="total"))
def identity_to_conv(total):
    """x, a(x) or α·x beside conv(x) in a sum → a 1-tap conv: W[c, c mod (C/g)] = s_c, b = t (RepVGG/MobileOne skip).

    Exact when the sibling conv maps C channels to C with stride 1 (then the identity kernel exists
    in its grouping g and the sum's shapes agree). Residual x + conv(x) is the same rewrite.
    """
    terms = sum_terms(total)
    for group in by_source(terms):
        convs = [t for t in group if isinstance(t.node.op, Conv)]
        if not convs:
            continue
        like = convs[0].node.op
        src = convs[0].source
        # x itself as a term; x may be any op (even a conv: x = conv0(y); x + conv(x))
        for t in terms:
            if t.node is not src:
                continue
            ok = (like.in_channels == like.out_channels == src.channels and all(s == 1 for s in like.stride))
            if ok:
                ident = opmath.identity_conv(like.in_channels, like.groups, like.nd, like)
                return rebuild(total, {t.index: (ident(src), t.coeff)})
    # an affine branch a(x) whose x also feeds a conv branch of this sum
    conv_sources = {t.source.id: t.node.op for t in terms if isinstance(t.node.op, Conv)}
    for t in terms:
        x, a = affine_source(t.node)
        like = conv_sources.get(x.id) if a is not None else None
        if like is not None and like.in_channels == like.out_channels == x.channels \
                and all(s == 1 for s in like.stride) and len(t.node.users) == 1:
            ident = opmath.identity_conv(like.in_channels, like.groups, like.nd, like, affine=a)
            return rebuild(total, {t.index: (ident(x), t.coeff)})
    return None
