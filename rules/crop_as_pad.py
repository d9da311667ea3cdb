from reparam.core.ops import Conv, Slice, as_float64
from reparam.core.pattern import One, P, SumOf, X
from reparam.core.rule import require, rule
from reparam.core.terms import merge_key, rebuild, slack
from reparam.math import kernels

# a conv of a crop (a spatial slice, maybe of another crop) that only the conv reads, beside a conv of x in a sum
_CROPPED = P(Conv, P(Slice, name="crop", one_use=True), name="conv", one_use=True)
_BESIDE_CONV = SumOf(P(Conv, X("x"), name="sibling"), One(_CROPPED, name="term"))


def _crops(node, x):
    """The (lo, hi) crop per axis of the chain of spatial Slices from ``node`` down to ``x``; None if the chain
    does not reach x through spatial slices that only the next reads."""
    crops: dict[int, tuple[int, int]] = {}
    while node is not x:
        if not isinstance(node.op, Slice) or node.rank is None or node.inputs[0].shape is None:
            return None
        if node is not None and len(node.users) != 1:
            return None
        dim = node.op.dim % node.rank
        n = node.inputs[0].shape[dim]
        if dim < 2 or dim in crops or not 0 <= node.op.start <= node.op.stop <= n:
            return None
        crops[dim] = (node.op.start, n - node.op.stop)
        node = node.inputs[0]
    return crops


@rule(_BESIDE_CONV, phase="normalize")
def crop_as_pad(total, x, sibling, term, conv, crop, rest):
    """conv(crop_c(x)) = conv'(x): a crop (c_lo, c_hi) on an axis is padding −c there, i.e. the kernel zero-extended
    by c_lo/d taps before and c_hi/d after on that axis (d its dilation), padding unchanged (ACNet with
    padding < k//2 crops before its k×1 / 1×k convs so their windows line up with the k×k branch).

    Exact when, on every cropped side, the conv does not zero-pad (crop c then pad p on one side puts p zeros where
    x has values: the identity "pad p − c" holds for no p > 0, c > 0), and d divides c. Fires only beside a conv of
    x that the rewritten conv then lines up with (same stride, dilation, groups, channels, padding slack) and
    whose kernel covers it, since on its own a zero-extended kernel costs more than the crop.
    """
    crops = _crops(crop, x)
    if crops is None:
        return None
    op, like = conv.op, sibling.op
    before, after = [0] * op.nd, [0] * op.nd
    for dim, (c_lo, c_hi) in crops.items():
        a = dim - 2
        d, (lo, hi) = op.dilation[a], op.padding[a]
        require((c_lo == 0 or lo == 0) and (c_hi == 0 or hi == 0),
                f"the conv pads axis {dim} by {(lo, hi)} after a crop of {(c_lo, c_hi)}: zeros where the uncropped "
                f"input has values, which no conv of the uncropped input reads")
        require(c_lo % d == 0 and c_hi % d == 0, f"the crop {(c_lo, c_hi)} on axis {dim} is not a multiple of the "
                                                 f"conv's dilation {d}")
        before[a], after[a] = c_lo // d, c_hi // d
    new = op.with_(weight=kernels.pad_kernel(as_float64(op.weight), before, after))  # rewrites hold float64
    require(merge_key(new) == merge_key(like) and slack(new) == slack(like),
            "the uncropped conv would not line up with its sibling conv of the same input (stride, dilation, "
            "groups, channels or padding slack differ)")
    require(all(e <= f for e, f in zip(new.extent, like.extent)),
            f"the uncropped kernel (extent {new.extent}) would be larger than its sibling's ({like.extent})")
    return rebuild(total, {term.index: (new(x), term.coeff)})
