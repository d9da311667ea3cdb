from reparam.core import opmath
from reparam.core.ops import Linear, Sum
from reparam.core.pattern import P
from reparam.core.rule import rule
from reparam.core.terms import by_source, joins_outer_sum, rebuild, sum_terms


@rule(P(Sum, name="total"))
def linear_sum(total):
    """Σ cᵢ·linearᵢ(x) = linear(x) with W = Σ cᵢWᵢ, b = Σ cᵢbᵢ (averaged or weighted heads).

    Exact always, for Linears of the same input with the same output size.
    """
    if joins_outer_sum(total):  # merge once, at the root of the sum tree
        return None
    for group in by_source(sum_terms(total)):
        lins = [t for t in group if isinstance(t.node.op, Linear) and len(t.node.users) == 1]
        by_out: dict = {}
        for t in lins:
            by_out.setdefault(t.node.op.weight.shape, []).append(t)
        for same in by_out.values():
            if len(same) >= 2:
                merged = opmath.merge_linear([t.node.op for t in same], [t.coeff for t in same])
                first = same[0]
                return rebuild(total, {first.index: (merged(first.source), 1.0)}, {t.index for t in same[1:]})
    return None
