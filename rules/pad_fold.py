from reparam.core.ops import Conv, Pad
from reparam.core.pattern import P, X
from reparam.core.rule import require, rule


@rule(P(Conv, P(Pad, X("x"), name="pad"), name="conv"), phase="canonicalize")
def pad_fold(x, pad, conv):
    """conv(pad₀(x)) = conv'(x) with the explicit zero padding added to the conv's own (lo, hi) per axis.

    Exact when the pad is constant zero on the conv's spatial axes only and the conv pads with zeros.
    F.pad lists the last axis first; the IR has already put the pairs in axis order.
    """
    op = conv.op
    require(op.padding_mode == "zeros", f"the conv pads with '{op.padding_mode}', not zeros")
    require(len(pad.op.pads) <= op.nd, "the pad touches non-spatial axes")
    pads = ((0, 0),) * (op.nd - len(pad.op.pads)) + tuple(pad.op.pads)
    padding = tuple((a + c, b + d) for (a, b), (c, d) in zip(op.padding, pads))
    return op.with_(padding=padding)(x)
