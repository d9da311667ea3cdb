import torch
import torch.nn.functional as F

from reparam.core.pattern import Many, P, SumOf, X
from reparam.core.rule import require, rule
from reparam.core.terms import merged
from reparam.rules.conv_transpose import ConvTranspose


def _key(op: ConvTranspose):
    return op.nd, op.stride, op.dilation, op.groups, op.in_channels, op.out_channels


def merge(ops: list[ConvTranspose], coeffs: list[float]) -> ConvTranspose:
    """Σ cᵢ·convTᵢ as one convT, or ValueError saying why the branches do not line up.

    Branch i's full output, its kernel padded in front by aᵢ taps, is shifted by aᵢ·d: its crop becomes
    loᵢ + aᵢ·d. So all branches line up iff LO = max loᵢ has LO − loᵢ divisible by d per axis (aᵢ = (LO − loᵢ)/d);
    the common kernel is K = max(aᵢ + kᵢ), and equal output sizes (checked by the caller) make the hi crops agree.
    """
    first = ops[0]
    taps, crops = [], []
    for axis in range(first.nd):
        d = first.dilation[axis]
        los = [o.crop[axis][0] for o in ops]
        lo = max(los)
        if any((lo - v) % d for v in los):
            raise ValueError(f"the output crops {sorted(set(los))} on axis {axis} differ by no multiple of the "
                             f"dilation {d}")
        front = [(lo - v) // d for v in los]
        size = max(a + o.kernel_size[axis] for a, o in zip(front, ops))
        taps.append((front, size))
        o0, a0 = ops[0], front[0]
        hi = o0.crop[axis][1] + d * (size - a0 - o0.kernel_size[axis])
        crops.append((lo, hi))
    weight = None
    for k, (o, c) in enumerate(zip(ops, coeffs)):
        pads = []
        for axis in reversed(range(first.nd)):
            front, size = taps[axis]
            pads += [front[k], size - front[k] - o.kernel_size[axis]]
        w = c * F.pad(o.weight, pads)
        weight = w if weight is None else weight + w
    biases = [c * o.bias for o, c in zip(ops, coeffs) if o.bias is not None]
    bias = torch.stack(biases).sum(0) if biases else None
    return first.with_(weight=weight, bias=bias, crop=tuple(crops))


@rule(SumOf(Many(P(ConvTranspose, X("x"), one_use=True), min=2, name="convs")), phase="merge")
def parallel_conv_transpose(total, x, convs, rest):
    """Σ cᵢ·convTᵢ(x) = convT(x): kernels zero-padded so their output alignment matches, summed; biases summed.

    Exact when the transposed convs read the same x with equal stride, dilation, groups and channels, give the
    same output shape, and their front crops differ by multiples of the dilation (see ``merge``).
    """
    groups: dict = {}
    for t in convs:
        if t.node.shape is not None:
            groups.setdefault((_key(t.node.op), t.node.shape), []).append(t)
    same = next((g for g in groups.values() if len(g) >= 2), None)
    require(same is not None, "sibling transposed convs of one input differ in stride, dilation, groups, channels or "
            "output size")
    try:
        one = merge([t.node.op for t in same], [t.coeff for t in same])
    except ValueError as err:
        require(False, f"transposed-conv branches are misaligned: {err}")
    require(one.output_shape([x.shape]) == same[0].node.shape, "the merged transposed conv would change the output size")
    return merged(total, same, one(x))
