import math

from reparam import opmath
from reparam.ops import Conv, Sum
from reparam.pattern import P
from reparam.rule import rule
from reparam.terms import by_source, rebuild, sum_terms


@rule(P(Sum, name="total"))
def groups_merge(total):
    """conv_g(x) beside conv_h(x) in a sum → both in gcd(g, h) groups (block-diagonal kernels).

    Exact always: a g-grouped kernel is a gcd(g, h)-grouped kernel with zeros off its blocks.
    Fires only when branches of one input differ in grouping.
    """
    for group in by_source(sum_terms(total)):
        convs = [t for t in group if isinstance(t.node.op, Conv) and len(t.node.users) == 1]
        groups = {t.node.op.groups for t in convs}
        if len(groups) < 2:
            continue
        target = math.gcd(*groups)
        changed = {t.index: (opmath.regroup(t.node.op, target)(t.source), t.coeff)
                   for t in convs if t.node.op.groups != target}
        return rebuild(total, changed)
    return None
