import math

from reparam.core import opmath
from reparam.core.ops import Sum
from reparam.core.pattern import P
from reparam.core.rule import rule

from reparam.rules._mergeable import normalize_siblings


@rule(P(Sum, name="total"))
def groups_merge(total):
    """conv_g(x) beside conv_h(x) in a sum → both in gcd(g, h) groups (block-diagonal kernels).

    Exact always: a g-grouped kernel is a gcd(g, h)-grouped kernel with zeros off its blocks.
    Fires only when branches of one input differ in grouping and parallel_sum_pad then merges them
    (same stride, padding mode and channels, aligned kernels); otherwise regrouping would only enlarge
    the kernels, so it refuses.
    """
    return normalize_siblings(total, "groups", lambda groups: math.gcd(*groups), opmath.regroup, "regrouping")
