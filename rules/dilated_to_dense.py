import math

from reparam.core import opmath
from reparam.core.ops import Sum
from reparam.core.pattern import P
from reparam.core.rule import rule

from reparam.rules._mergeable import normalize_siblings


@rule(P(Sum, name="total"))
def dilated_to_dense(total):
    """conv_d(x) beside conv_e(x) in a sum → both re-expressed with dilation gcd(d, e), zeros between taps.

    Exact always (only the kernel is rewritten: tap j of a dilation-d kernel lands at j·d/g). Fires
    only when branches of one input differ in dilation and parallel_sum_pad then merges them (same
    stride, padding mode and channels, aligned kernels), so a dilated conv that stays apart keeps its
    small kernel; otherwise it refuses.
    """
    def common(dilations):  # per axis, the gcd of the dilations
        return tuple(math.gcd(*axis) for axis in zip(*dilations))

    return normalize_siblings(total, "dilation", common, opmath.redilate, "densifying")
