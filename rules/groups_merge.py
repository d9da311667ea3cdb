import math

from reparam import opmath
from reparam.ops import Conv, Sum
from reparam.pattern import P
from reparam.rule import require, rule
from reparam.terms import by_source, joins_outer_sum, rebuild, sum_terms

from ._mergeable import apart, clusters, uneven_shapes


@rule(P(Sum, name="total"))
def groups_merge(total):
    """conv_g(x) beside conv_h(x) in a sum → both in gcd(g, h) groups (block-diagonal kernels).

    Exact always: a g-grouped kernel is a gcd(g, h)-grouped kernel with zeros off its blocks.
    Fires only when branches of one input differ in grouping and parallel_sum_pad then merges them
    (same stride, padding mode and channels, aligned kernels); otherwise regrouping would only enlarge
    the kernels, so it refuses.
    """
    if joins_outer_sum(total):  # normalized where parallel_sum_pad merges: at the root of the sum tree
        return None
    terms = sum_terms(total)
    unmerged = None
    for group in by_source(terms):
        convs = [t for t in group if isinstance(t.node.op, Conv) and len(t.node.users) == 1]
        if len({t.node.op.groups for t in convs}) < 2:
            continue
        for same in clusters(convs):
            groups = {t.node.op.groups for t in same}
            if len(groups) < 2:
                continue
            uneven = uneven_shapes(terms)
            require(uneven is None, f"regrouping would only enlarge the kernels: {uneven}")
            target = math.gcd(*groups)
            changed = {t.index: (opmath.regroup(t.node.op, target)(t.source), t.coeff)
                       for t in same if t.node.op.groups != target}
            return rebuild(total, changed)
        values = " vs ".join(map(str, sorted({t.node.op.groups for t in convs})))
        unmerged = unmerged or (f"sibling convs of one input differ in groups ({values}), but parallel_sum_pad "
                                f"cannot merge them: {apart(convs)}; regrouping would only enlarge the kernels")
    require(unmerged is None, unmerged or "")
    return None
