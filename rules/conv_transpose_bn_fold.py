from reparam.core.ops import Affine
from reparam.core.pattern import P, X
from reparam.core.rule import require, rule
from reparam.rules.conv_transpose import ConvTranspose


@rule(P(Affine, P(ConvTranspose, X("x"), name="conv"), name="bn"), phase="fold")
def conv_transpose_bn_fold(x, conv, bn):
    """a(convT(x)) = convT'(x): W'[i, o, …] = W[i, o, …]·s[g·(out/g) + o] for i in group g, b' = b·s + t.

    The weight layout is [in, out/groups, k…], so the scale acts on axis 1 within each group. Exact when the
    affine is per output channel (axis 1) or a scalar and the convT output has no other consumer; any groups,
    stride, dilation, padding, output_padding (output positions beyond the kernel's reach carry the bias only,
    and b·s + t is what the affine makes of them).
    """
    op, a = conv.op, bn.op
    require(bn.rank is not None or a.is_scalar, "the tensor rank is unknown (pass example inputs)")
    require(a.acts_on(1, bn.rank or 2), "the affine is not per output channel")
    require(bn.shape == conv.shape, "the affine broadcasts the transposed conv output to a new shape")
    g, out = op.groups, op.out_channels
    s = a.scale.expand(out) if a.scale.ndim == 0 else a.scale
    W = op.weight.reshape(g, op.in_channels // g, out // g, *op.kernel_size)
    W = (W * s.reshape(g, 1, out // g, *[1] * op.nd)).reshape(op.weight.shape)
    b = op.bias * s if op.bias is not None else None
    if a.shift is not None:
        t = a.shift.expand(out) if a.shift.ndim == 0 else a.shift
        b = t.clone() if b is None else b + t
    return op.with_(weight=W.contiguous(), bias=b)(x)
