import math

from reparam.core import opmath
from reparam.core.rule import rule

from reparam.rules._mergeable import SIBLINGS, normalize_siblings


@rule(SIBLINGS, phase="normalize")
def dilated_to_dense(total, x, convs, rest):
    """conv_d(x) beside conv_e(x) in a sum → both re-expressed with dilation gcd(d, e), zeros between taps.

    Exact always (only the kernel is rewritten: tap j of a dilation-d kernel lands at j·d/g). Fires
    only when branches of one input differ in dilation and agree on all else a parallel sum of convs needs
    (stride, padding mode, channels, aligned kernels: terms.merge_key, terms.slack), so a dilated conv that
    stays apart keeps its small kernel; otherwise it refuses.
    """
    def common(dilations):  # per axis, the gcd of the dilations
        return tuple(math.gcd(*axis) for axis in zip(*dilations))

    return normalize_siblings(total, x, convs, "dilation", common, opmath.redilate, "densifying")
