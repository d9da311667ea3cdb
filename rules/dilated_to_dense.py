import math

from reparam import opmath
from reparam.ops import Conv, Sum
from reparam.pattern import P
from reparam.rule import require, rule
from reparam.terms import by_source, joins_outer_sum, rebuild, sum_terms

from ._mergeable import apart, clusters, uneven_shapes


@rule(P(Sum, name="total"))
def dilated_to_dense(total):
    """conv_d(x) beside conv_e(x) in a sum → both re-expressed with dilation gcd(d, e), zeros between taps.

    Exact always (only the kernel is rewritten: tap j of a dilation-d kernel lands at j·d/g). Fires
    only when branches of one input differ in dilation and parallel_sum_pad then merges them (same
    stride, padding mode and channels, aligned kernels), so a dilated conv that stays apart keeps its
    small kernel; otherwise it refuses.
    """
    if joins_outer_sum(total):  # normalized where parallel_sum_pad merges: at the root of the sum tree
        return None
    terms = sum_terms(total)
    unmerged = None
    for group in by_source(terms):
        convs = [t for t in group if isinstance(t.node.op, Conv) and len(t.node.users) == 1]
        if len({t.node.op.dilation for t in convs}) < 2:
            continue
        for same in clusters(convs):
            dilations = {t.node.op.dilation for t in same}
            if len(dilations) < 2:
                continue
            uneven = uneven_shapes(terms)
            require(uneven is None, f"densifying would only enlarge the kernels: {uneven}")
            target = tuple(math.gcd(*axis) for axis in zip(*dilations))
            changed = {t.index: (opmath.redilate(t.node.op, target)(t.source), t.coeff)
                       for t in same if t.node.op.dilation != target}
            return rebuild(total, changed)
        values = " vs ".join(map(str, sorted({t.node.op.dilation for t in convs})))
        unmerged = unmerged or (f"sibling convs of one input differ in dilation ({values}), but parallel_sum_pad "
                                f"cannot merge them: {apart(convs)}; densifying would only enlarge the kernels")
    require(unmerged is None, unmerged or "")
    return None
