import torch

from reparam.core.ops import Affine, Conv, Pad, as_float64
from reparam.core.pattern import P, X
from reparam.core.rule import require, rule

from reparam.rules.channel_pad import ChannelPad

# relative difference (to the largest value) up to which two float64 per-channel values are one value: the pad
# values and the bias are computed along different roundings of the same formula (DBB: β − μγ/√(σ²+ε) in the
# model, b·s + t in conv_bn_fold)
_SAME = 1e-12

_CONV = P(Conv, X("x"), name="conv", one_use=True)
_AFFINE = P(Affine, X("x"), name="affine", one_use=True)


@rule(P(ChannelPad, _CONV | _AFFINE, name="pad"), phase="fold")
def const_pad_commute(x, pad, conv=None, affine=None):
    """pad_v(f(x)) = f(pad₀(x)) for f a 1×1 stride-1 conv (or a per-channel affine): f maps a zero pixel to its
    bias b (its shift t), so zero-padding its input writes b into the border (DBB's "pad with the BN bias").

    Exact when v equals f's response to a zero input in every channel (the conv's bias, 0 without one; the
    affine's shift), f is a 1×1 conv with stride 1 and zero padding mode (any groups, dilation, own padding: its
    own padded border already holds b) or an affine per channel (axis 1) or scalar, and the pad touches only the
    spatial axes. Then pad_fold and serial_merge finish DBB's 1×1 → BN → pad → k×k branch. An affine whose input
    is a conv that nothing else reads is left to conv_bn_fold first.
    """
    op = pad.op
    f = conv if conv is not None else affine
    require(f.rank is not None, "the tensor rank is unknown (pass example inputs)")
    require(len(op.pads) <= f.rank - 2, "the pad touches the batch or channel axis")
    if conv is not None:
        c = conv.op
        require(all(k == 1 for k in c.kernel_size), f"the conv before the pad is {c.kernel_size}, not 1×1: its "
                "border outputs read the input's values, not only zeros")
        require(all(s == 1 for s in c.stride), f"the conv before the pad has stride {c.stride}: zero padding its "
                "input would pad its output by a different amount")
        require(c.padding_mode == "zeros", f"the conv pads with '{c.padding_mode}', not zeros")
        response = as_float64(c.bias) if c.bias is not None else torch.zeros(c.out_channels, dtype=torch.float64)
        what = "the conv's bias" if c.bias is not None else "zero (the conv has no bias)"
    else:
        a = affine.op
        if isinstance(x.op, Conv) and len(x.users) == 1:
            return None  # conv_bn_fold folds the affine into that conv first; then the conv commutes
        require(a.acts_on(1, affine.rank), "the affine before the pad is not per channel")
        channels = affine.channels
        require(channels is not None, "the channel count is unknown (pass example inputs)")
        response = torch.zeros((), dtype=torch.float64) if a.shift is None else as_float64(a.shift)
        response = response.expand(channels) if response.ndim == 0 else response
        what = "the affine's shift" if a.shift is not None else "zero (the affine has no shift)"
    v = op.channel_values(response.numel())
    scale = max(float(response.abs().max()), float(v.abs().max()), 1e-300)
    gap = float((v - response).abs().max()) / scale
    require(gap <= _SAME, f"the pad values differ from {what} (relative difference {gap:.3g}): the padded border is "
                          f"not what the {'conv' if conv is not None else 'affine'} gives for a zero input")
    return f.op(Pad(op.pads)(x))
