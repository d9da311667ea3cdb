import math

from reparam import opmath
from reparam.ops import Conv, Sum
from reparam.pattern import P
from reparam.rule import rule
from reparam.terms import by_source, rebuild, sum_terms


@rule(P(Sum, name="total"))
def dilated_to_dense(total):
    """conv_d(x) beside conv_e(x) in a sum → both re-expressed with dilation gcd(d, e), zeros between taps.

    Exact always (only the kernel is rewritten: tap j of a dilation-d kernel lands at j·d/g). Fires
    only when branches of one input differ in dilation, so a lone dilated conv stays cheap.
    """
    for group in by_source(sum_terms(total)):
        convs = [t for t in group if isinstance(t.node.op, Conv) and len(t.node.users) == 1]
        dilations = {t.node.op.dilation for t in convs}
        if len(dilations) < 2:
            continue
        target = tuple(math.gcd(*axis) for axis in zip(*dilations))
        changed = {t.index: (opmath.redilate(t.node.op, target)(t.source), t.coeff)
                   for t in convs if t.node.op.dilation != target}
        return rebuild(total, changed)
    return None
