import math

from reparam.core import opmath
from reparam.core.rule import rule

from reparam.rules._mergeable import SIBLINGS, normalize_siblings


@rule(SIBLINGS, phase="normalize")
def groups_merge(total, x, convs, rest):
    """conv_g(x) beside conv_h(x) in a sum → both in gcd(g, h) groups (block-diagonal kernels).

    Exact always: a g-grouped kernel is a gcd(g, h)-grouped kernel with zeros off its blocks.
    Fires only when branches of one input differ in grouping and agree on all else a parallel sum of convs
    needs (stride, padding mode, channels, aligned kernels: terms.merge_key, terms.slack), so they can then be
    summed as one conv; otherwise regrouping would only enlarge the kernels, so it refuses.
    """
    return normalize_siblings(total, x, convs, "groups", lambda groups: math.gcd(*groups), opmath.regroup,
                              "regrouping")
